"""Retargeting a source face's motion onto an avatar's conditioning (pure functions).

Relative by default: the source's change from its own neutral is added to the target's neutral, and its
head motion relative to its neutral pose is applied to the target's reference pose — so a different face
shape or a different seat in front of the camera does not leak into the avatar. Expressions are clamped to
the range the avatar was trained on: expressions it never saw render badly.
"""

from __future__ import annotations

import numpy as np

from avatar.capture import camera


def relative_expression(source: np.ndarray, source_neutral: np.ndarray, target_neutral: np.ndarray,
                        target_min: np.ndarray, target_max: np.ndarray, gain: np.ndarray | float = 1.0) -> np.ndarray:
    """``[e]``: target neutral + gain × (source − source neutral), clamped to the trained range."""
    expr = np.asarray(target_neutral) + np.asarray(gain) * (np.asarray(source) - np.asarray(source_neutral))
    return np.clip(expr, target_min, target_max).astype(np.float32)


def relative_pose(source_pose: np.ndarray, source_neutral_pose: np.ndarray, target_reference: np.ndarray) -> np.ndarray:
    """``[4, 4]``: the target's reference pose moved the way the source moved since its neutral pose.

    The source motion is taken in its own canonical (head) frame, ``inv(P0) · Pt``, so it composes on the
    right of the target's reference pose.
    """
    delta = camera.invert_pose(source_neutral_pose) @ source_pose
    return target_reference @ delta


def rotate_about(pose: np.ndarray, pivot: np.ndarray, yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """The head pose turned by yaw/pitch/roll (degrees) about a canonical-space pivot (e.g. the head centre)."""
    to_pivot = camera.make_pose(np.eye(3), pivot)
    rot = camera.make_pose(camera.euler_to_matrix(yaw, pitch, roll), np.zeros(3))
    return pose @ to_pivot @ rot @ camera.invert_pose(to_pivot)


def pose_range(poses: np.ndarray, reference: np.ndarray) -> dict[str, list[float]]:
    """The training head motion relative to the reference pose: min/max of yaw, pitch, roll (degrees) and of
    the translation (cm, in the head's frame). Stored in the bundle; the live loop clamps to it."""
    deltas = [camera.invert_pose(reference) @ p for p in poses]
    euler = np.array([camera.matrix_to_euler(d[:3, :3]) for d in deltas])
    trans = np.array([d[:3, 3] for d in deltas])
    return {"euler_min": euler.min(0).tolist(), "euler_max": euler.max(0).tolist(),
            "translation_min": trans.min(0).tolist(), "translation_max": trans.max(0).tolist()}


def clamp_pose(pose: np.ndarray, reference: np.ndarray, limits: dict | None, margin_deg: float = 5.0,
               margin_cm: float = 1.0) -> np.ndarray:
    """``[4, 4]``: the pose with its motion relative to the reference clamped to the trained range (plus a margin)."""
    if not limits:
        return pose
    delta = camera.invert_pose(reference) @ pose
    euler = np.clip(camera.matrix_to_euler(delta[:3, :3]), np.asarray(limits["euler_min"]) - margin_deg,
                    np.asarray(limits["euler_max"]) + margin_deg)
    trans = np.clip(delta[:3, 3], np.asarray(limits["translation_min"]) - margin_cm,
                    np.asarray(limits["translation_max"]) + margin_cm)
    return reference @ camera.make_pose(camera.euler_to_matrix(*euler), trans)
