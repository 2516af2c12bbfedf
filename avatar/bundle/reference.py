"""The avatar's reference, written into ``avatar.json``: the neutral (calmest held) training frame, the resting
head pose, the trained expression range and its principal components.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float

from avatar.capture import camera
from avatar.capture.tracking import BLENDSHAPE_NAMES


def expression_activity(expressions: np.ndarray) -> np.ndarray:
    """``[t]``: how much each frame of ``[t, e]`` expresses (entry 0 is MediaPipe's `_neutral` score, not one)."""
    return expressions[:, 1:].sum(1)


# Where the eyes look is no expression: a calm face glancing aside is calm. Real people's calm frames carry
# eyeLook* scores of 0.3–0.9 (MediaPipe reads a slight squint of the gaze), which made a squint with a bitten
# lip the least active frame of a real recording (a face-pulling phone clip); gaze counts a quarter.
GAZE_WEIGHT = 0.25
# A neutral is a state held for a moment, not a transient between two expressions (a frame where every score
# passes low on its way from one face to another): the activity is averaged over this many neighbouring frames.
CALM_WINDOW = 7


def _calm_weights(names: list[str] | tuple[str, ...] | None, count: int) -> np.ndarray:
    """``[e]`` weight of each score in a face's activity: gaze ``GAZE_WEIGHT``, MediaPipe's ``_neutral`` 0."""
    names = list(names) if names is not None else list(BLENDSHAPE_NAMES) if count == len(BLENDSHAPE_NAMES) else []
    if not names:
        weight = np.ones(count)
        weight[0] = 0.0  # entry 0 is MediaPipe's `_neutral` score (as expression_activity assumes)
        return weight
    return np.array([0.0 if n == "_neutral" else GAZE_WEIGHT if n.startswith("eyeLook") else 1.0 for n in names])


def calm_activity(expressions: Float[np.ndarray, "t e"], names: list[str] | tuple[str, ...] | None = None
                  ) -> Float[np.ndarray, " t"]:
    """How far each frame of ``[t, e]`` (in time order) is from a held calm face: the summed scores (gaze
    weighted ``GAZE_WEIGHT``, MediaPipe's ``_neutral`` left out), averaged over ``CALM_WINDOW`` frames."""
    e = np.asarray(expressions, np.float64)
    activity = e @ _calm_weights(names, e.shape[1])
    k = min(CALM_WINDOW, len(activity))
    padded = np.pad(activity, (k // 2, k - 1 - k // 2), mode="edge")
    return np.convolve(padded, np.ones(k) / k, mode="valid")


def neutral_index(expressions: Float[np.ndarray, "t e"], names: list[str] | tuple[str, ...] | None = None) -> int:
    """The avatar's neutral: in the calmest held stretch of ``CALM_WINDOW`` training frames (``[t, e]`` in time
    order, :func:`calm_activity`), its calmest frame — so that a stretch that is calm on average does not hand
    over a frame that squints."""
    e = np.asarray(expressions, np.float64)
    centre = int(calm_activity(e, names).argmin())
    lo, hi = max(0, centre - CALM_WINDOW // 2), min(len(e), centre + CALM_WINDOW // 2 + 1)
    return lo + int((e[lo:hi] @ _calm_weights(names, e.shape[1])).argmin())


def expression_stats(expressions: Float[np.ndarray, "t e"], names: list[str] | tuple[str, ...] | None = None
                     ) -> dict[str, list[float]]:
    """min, max, mean and a neutral expression (:func:`neutral_index`) of ``[t, e]``."""
    return {"min": expressions.min(0).tolist(), "max": expressions.max(0).tolist(),
            "mean": expressions.mean(0).tolist(), "neutral": expressions[neutral_index(expressions, names)].tolist()}


def expression_components(expressions: np.ndarray, count: int = 8) -> list[list[float]]:
    """The main directions ``[count, e]`` (unit rows) in which the training expressions vary (PCA)."""
    centred = expressions - expressions.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return vt[:count].tolist()


def reference_pose(poses: np.ndarray, expressions: np.ndarray | None = None, calm_fraction: float = 0.2) -> np.ndarray:
    """The recording's resting head pose: among the calmest ``calm_fraction`` of the training frames (least total
    blendshape activity; all frames without ``expressions [t, e]``), the pose whose rotation is closest to
    their mean rotation.

    Edits (``render.py --set``), the live loop's resting pose and the controllability check start here, from the
    neutral expression. The pose that faces the camera most directly (the previous choice) can be one the video
    holds only in passing: on the synthetic subject it was 21° from every neutral frame, seen only while smiling,
    and MediaPipe read a smile of 0.44 on the avatar's neutral face there (0.13 at the neutral frame's own pose).
    """
    rows = np.arange(len(poses))
    if expressions is not None and len(expressions) == len(poses):
        rows = np.argsort(expression_activity(expressions))[: max(1, int(np.ceil(calm_fraction * len(poses))))]
    rot = poses[rows, :3, :3]
    mean = camera.align_canonical_rotations(rot, np.broadcast_to(np.eye(3), rot.shape))  # their chordal mean
    angles = np.arccos(np.clip((np.einsum("ij,tij->t", mean, rot) - 1) / 2, -1, 1))
    return poses[int(rows[angles.argmin()])]
