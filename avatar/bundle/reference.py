"""The avatar's reference, written into ``avatar.json``: the neutral (least active) training frame, the resting
head pose, the trained expression range and its principal components.
"""

from __future__ import annotations

import numpy as np

from avatar.capture import camera


def expression_activity(expressions: np.ndarray) -> np.ndarray:
    """``[t]``: how much each frame of ``[t, e]`` expresses (entry 0 is MediaPipe's `_neutral` score, not one)."""
    return expressions[:, 1:].sum(1)


def neutral_index(expressions: np.ndarray) -> int:
    """The training frame with the least expression: the avatar's neutral."""
    return int(expression_activity(expressions).argmin())


def expression_stats(expressions: np.ndarray) -> dict[str, list[float]]:
    """min, max, mean and a neutral expression (the training frame with the least expression) of ``[t, e]``."""
    return {"min": expressions.min(0).tolist(), "max": expressions.max(0).tolist(),
            "mean": expressions.mean(0).tolist(), "neutral": expressions[neutral_index(expressions)].tolist()}


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
