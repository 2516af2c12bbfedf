"""What a recording shows: which expression groups were performed (and how strongly), jaw openings as in speech,
head turn and nod spread — and, for the synthetic subject, how far the tracked poses are from its truth.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from avatar.capture import camera
from avatar.capture.tracking import (
    BLENDSHAPE_NAMES,
)

# Expression groups a video should show for the avatar to learn them: (blendshapes averaged per frame,
# what the warning says the video never does).
COVERAGE_GROUPS: dict[str, tuple[tuple[str, ...], str]] = {
    "jawOpen": (("jawOpen",), "opens the mouth wide"),
    "mouthSmile": (("mouthSmileLeft", "mouthSmileRight"), "smiles"),
    "eyeBlinkLeft": (("eyeBlinkLeft",), "closes the left eye (eyeBlinkLeft)"),
    "eyeBlinkRight": (("eyeBlinkRight",), "closes the right eye (eyeBlinkRight)"),
    "browRaise": (("browInnerUp", "browOuterUpLeft", "browOuterUpRight"), "raises the brows"),
    "mouthPucker": (("mouthPucker",), "purses the lips (pucker, as in a kiss)"),
    "mouthFunnel": (("mouthFunnel",), "rounds the lips (funnel, as in 'oo')"),
}


COVERAGE_MIN_MAX = 0.2  # a group whose largest score stays below this was never really performed


COVERAGE_MIN_FRAMES = 3  # …or reached half its maximum in fewer frames than this (a glitch, not a take)


def expression_coverage(expressions: np.ndarray) -> tuple[dict, list[str]]:
    """Per expression group: its largest score over the video and how many frames reach half of it.

    expressions ``[t, 52]`` (MediaPipe blendshapes) → (``{group: {max, frames_above_half_max, missing}}``,
    one warning line per missing group).
    """
    coverage, warnings = {}, []
    for group, (names, action) in COVERAGE_GROUPS.items():
        value = expressions[:, [BLENDSHAPE_NAMES.index(n) for n in names]].mean(1)  # [t]
        peak = float(value.max()) if len(value) else 0.0
        above = int((value > 0.5 * peak).sum()) if peak > 0 else 0
        missing = peak < COVERAGE_MIN_MAX or above < COVERAGE_MIN_FRAMES
        coverage[group] = {"blendshapes": list(names), "max": round(peak, 4), "frames_above_half_max": above,
                           "missing": bool(missing)}
        if missing:
            warnings.append(f"the video never {action} (max {peak:.2f}, {above} frames above half): "
                            "the avatar will not be able to")
    return coverage, warnings


# What a recording should show besides the expression groups: the head turning and nodding (spread between the
# 5th and 95th percentile of the rotation about the recording's mean pose), and talking (jaw openings).
HEAD_MOTION_GROUPS: dict[str, tuple[int, float, str]] = {
    "headTurn": (0, 25.0, "turns the head left and right"),  # (Euler axis: 0 yaw, 1 pitch; degrees; action)
    "headNod": (1, 15.0, "nods (looks up and down)"),
}


TALK_MIN_OPENINGS = 5  # jawOpen rising past 0.15 from below 0.05 this often: the mouth moved as in speech


COVERAGE_ORDER = ("talk", "jawOpen", "mouthSmile", "eyeBlinkLeft", "eyeBlinkRight", "browRaise", "mouthPucker",
                  "mouthFunnel", "headTurn", "headNod")  # the order a guided recording asks for them


def jaw_openings(jaw: np.ndarray, low: float = 0.05, high: float = 0.15) -> int:
    """How many times ``jaw [t]`` rises past ``high`` after being below ``low`` (a hysteresis count)."""
    count, closed = 0, True
    for v in jaw:
        if closed and v > high:
            count, closed = count + 1, False
        elif v < low:
            closed = True
    return count


def head_motion_spread(poses: np.ndarray) -> np.ndarray:
    """``[3]`` yaw, pitch, roll spread (5th–95th percentile, degrees) of ``poses [t, 4, 4]`` about their mean."""
    if len(poses) < 2:
        return np.zeros(3)
    rot = poses[:, :3, :3]
    mean = camera.align_canonical_rotations(rot, np.broadcast_to(np.eye(3), rot.shape))  # chordal mean
    angles = np.array([camera.matrix_to_euler(mean.T @ r) for r in rot])  # [t, 3]
    return np.percentile(angles, 95, 0) - np.percentile(angles, 5, 0)


def recording_coverage(expressions: np.ndarray, poses: np.ndarray) -> dict:
    """What a recording performs, per group of :data:`COVERAGE_ORDER`: expressions ``[t, 52]`` and head poses
    ``[t, 4, 4]`` → ``{"groups": {name: {..., "performed", "action", "progress"}}, "performed": [...],
    "missing": [...], "warnings": [...]}``. ``progress`` in [0, 1] fills the guided recorder's bars."""
    expr_cov, _ = expression_coverage(expressions)
    groups = {}
    jaw = expressions[:, BLENDSHAPE_NAMES.index("jawOpen")] if len(expressions) else np.zeros(0)
    openings = jaw_openings(jaw)
    groups["talk"] = {"jaw_openings": openings, "performed": openings >= TALK_MIN_OPENINGS,
                      "action": "talks (the mouth opens and closes as in speech)",
                      "progress": min(1.0, openings / TALK_MIN_OPENINGS)}
    for name, (names, action) in COVERAGE_GROUPS.items():
        c = expr_cov[name]
        progress = min(1.0, c["max"] / (2 * COVERAGE_MIN_MAX)) * min(1.0, c["frames_above_half_max"] / COVERAGE_MIN_FRAMES)
        groups[name] = {**c, "performed": not c["missing"], "action": action, "progress": round(progress, 3)}
        del groups[name]["missing"]
    spread = head_motion_spread(poses)
    for name, (axis, needed, action) in HEAD_MOTION_GROUPS.items():
        groups[name] = {"spread_deg": round(float(spread[axis]), 2), "needed_deg": needed,
                        "performed": bool(spread[axis] >= needed), "action": action,
                        "progress": round(min(1.0, float(spread[axis]) / needed), 3)}
    groups = {k: groups[k] for k in COVERAGE_ORDER}
    missing = [k for k, g in groups.items() if not g["performed"]]
    return {"frames": int(len(expressions)), "groups": groups,
            "performed": [k for k in groups if k not in missing], "missing": missing,
            "warnings": [f"the recording never {groups[k]['action']}: the avatar will not be able to" for k in missing]}


def pose_error_vs_truth(poses: np.ndarray, frame_indices: np.ndarray, truth: dict,
                        jaw_open_above: float = 0.3, jaw_closed_below: float = 0.05) -> dict:
    """Head-rotation error of fitted ``poses [t, 4, 4]`` against a synthetic subject's ``truth.json``.

    The fitted canonical frame is carried onto the true one by the one rotation that best aligns them
    (:func:`camera.align_canonical_rotations`), then per frame: the angle of the remaining rotation and its
    pitch/yaw/roll parts about the true head's axes. The pitch error is split by the true jaw opening: a
    pose that leaks expression nods when the mouth opens. Because a performance may nod and talk at the
    same time, the jaw's effect is also given at a fixed pose (regression of the pitch error on the jaw
    opening and the true head rotation) together with how much of the true nod the fit reports.
    """
    by_index = {int(f.get("index", i)): f for i, f in enumerate(truth["frames"])}
    rows = [r for r, i in enumerate(frame_indices) if int(i) in by_index]
    if len(rows) < 3:
        return {"frames": len(rows), "note": "fewer than 3 tracked frames have a true pose"}
    frames = [by_index[int(frame_indices[r])] for r in rows]
    true_rot = np.array([f["head_pose"] for f in frames], dtype=np.float64)[:, :3, :3]  # [t, 3, 3]
    err = camera.head_rotation_errors(poses[rows, :3, :3], true_rot)  # [t, 3] pitch, yaw, roll
    angle = np.linalg.norm(err, axis=1)
    # The true head rotation about its own axes relative to the clip's mean: regressor for the gain.
    mean_rot = camera.align_canonical_rotations(true_rot, np.broadcast_to(np.eye(3), true_rot.shape))
    true_turn = np.degrees(camera.rotation_vectors(np.einsum("ij,tjk->tik", mean_rot.T, true_rot)))  # [t, 3]
    out = {
        "frames": len(rows),
        "alignment": "fitted canonical frame rotated onto the true one by the best single rotation",
        "median_rotation_error_deg": round(float(np.median(angle)), 3),
        "mean_rotation_error_deg": round(float(angle.mean()), 3),
        "mean_abs_error_deg": {k: round(float(np.abs(err[:, j]).mean()), 3)
                               for j, k in enumerate(("pitch", "yaw", "roll"))},
    }
    names = [n.lower().replace("_", "") for n in truth.get("expression_names", [])]
    if "jawopen" in names:
        jaw = np.array([f["expression"][names.index("jawopen")] for f in frames], dtype=np.float64)  # [t]
        opened, closed = jaw > jaw_open_above, jaw < jaw_closed_below
        pitch = err[:, 0]

        def mean(x: np.ndarray) -> float | None:
            return round(float(x.mean()), 3) if len(x) else None

        design = np.c_[np.ones(len(jaw)), jaw, true_turn]  # [t, 5]
        coef = np.linalg.lstsq(design, pitch, rcond=None)[0]
        varies = jaw.std() > 1e-6 and pitch.std() > 1e-9
        out["jaw"] = {
            "open_frames": int(opened.sum()), "closed_frames": int(closed.sum()),
            "open_above": jaw_open_above, "closed_below": jaw_closed_below,
            "mean_pitch_error_open_deg": mean(pitch[opened]),
            "mean_pitch_error_closed_deg": mean(pitch[closed]),
            "mean_abs_pitch_error_open_deg": mean(np.abs(pitch[opened])),
            "mean_abs_pitch_error_closed_deg": mean(np.abs(pitch[closed])),
            "pitch_error_jaw_correlation": round(float(np.corrcoef(pitch, jaw)[0, 1]), 3) if varies else None,
            "pitch_error_per_unit_jaw_at_fixed_pose_deg": round(float(coef[1]), 3),
            "pitch_error_per_degree_of_true_pitch": round(float(coef[2]), 3),
            "true_jaw_pitch_correlation": round(float(np.corrcoef(jaw, true_turn[:, 0])[0, 1]), 3)
            if varies and true_turn[:, 0].std() > 1e-9 else None,
        }
    return out


_SAID: set[str] = set()


def synthetic_truth(path: str | Path) -> dict | None:
    """A synthetic subject's ``truth.json`` (trainer/synth.py: ``expression_names`` and ``frames``, each with its
    ``head_pose`` and ``expression``), or None: no such file, or a file of another format. A real recording may
    carry a truth.json of its own; it is ignored, and said once on stderr instead of failing a long run later."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        truth = json.loads(path.read_text())
    except (OSError, ValueError):
        truth = None
    frames = truth.get("frames") if isinstance(truth, dict) else None
    if (isinstance(frames, list) and frames and isinstance(truth.get("expression_names"), list)
            and all(isinstance(f, dict) and "head_pose" in f and "expression" in f for f in frames)):
        return truth
    if str(path) not in _SAID:
        _SAID.add(str(path))
        print(f"note: {path} is not a synthetic subject's truth.json (frames with head_pose and expression): "
              "ignored", file=sys.stderr)
    return None
