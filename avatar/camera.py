"""Camera and head-pose math (pure functions on NumPy arrays).

Conventions (the same as MediaPipe's face geometry): a head pose is a 4×4 matrix mapping points of the
canonical face space (centimetres) into camera space; the camera looks down −z with +y up (OpenGL).
Pixels have their origin at the top-left corner with v pointing down. Intrinsics are ``[fx, fy, cx, cy]``.
"""

from __future__ import annotations

import numpy as np

MEDIAPIPE_VERTICAL_FOV_DEG = 63.0  # the perspective camera MediaPipe's transformation matrix assumes

# OpenGL camera (y up, looking down −z) ↔ OpenCV camera (y down, looking down +z).
GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


def mediapipe_intrinsics(width: int, height: int, vfov_deg: float = MEDIAPIPE_VERTICAL_FOV_DEG) -> np.ndarray:
    """Intrinsics ``[fx, fy, cx, cy]`` of the camera that MediaPipe's head pose assumes for a W×H image."""
    f = (height / 2.0) / np.tan(np.radians(vfov_deg) / 2.0)
    return np.array([f, f, width / 2.0, height / 2.0])


def crop_intrinsics(intrinsics: np.ndarray, x0: float, y0: float, scale: float) -> np.ndarray:
    """Intrinsics after cropping at pixel ``(x0, y0)`` and resizing by ``scale`` (pose is unchanged)."""
    fx, fy, cx, cy = intrinsics
    return np.array([fx * scale, fy * scale, (cx - x0) * scale, (cy - y0) * scale])


def K_matrix(intrinsics: np.ndarray) -> np.ndarray:
    fx, fy, cx, cy = intrinsics
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def transform_points(pose: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4×4 pose to points ``[..., 3]``."""
    return points @ pose[:3, :3].T + pose[:3, 3]


def project(points_cam: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    """Camera-space points ``[..., 3]`` (OpenGL) → pixel coordinates ``[..., 2]``."""
    fx, fy, cx, cy = intrinsics
    depth = -points_cam[..., 2]
    u = cx + fx * points_cam[..., 0] / depth
    v = cy - fy * points_cam[..., 1] / depth
    return np.stack([u, v], axis=-1)


def backproject(pixels: np.ndarray, depth: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    """Pixels ``[..., 2]`` at distance ``depth [...]`` along −z → camera-space points ``[..., 3]``."""
    fx, fy, cx, cy = intrinsics
    x = (pixels[..., 0] - cx) / fx * depth
    y = -(pixels[..., 1] - cy) / fy * depth
    return np.stack([x, y, -depth], axis=-1)


def invert_pose(pose: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4×4 transform (exact for rotation + translation)."""
    inv = np.eye(4)
    rot = pose[:3, :3]
    inv[:3, :3] = rot.T
    inv[:3, 3] = -rot.T @ pose[:3, 3]
    return inv


def euler_to_matrix(yaw_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    """3×3 rotation: yaw about +y, pitch about +x, roll about +z, applied roll → pitch → yaw."""
    y, p, r = np.radians([yaw_deg, pitch_deg, roll_deg])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return ry @ rx @ rz


def matrix_to_euler(rot: np.ndarray) -> tuple[float, float, float]:
    """Inverse of :func:`euler_to_matrix` (degrees), valid away from ±90° pitch."""
    pitch = np.arcsin(np.clip(-rot[1, 2], -1.0, 1.0))
    yaw = np.arctan2(rot[0, 2], rot[2, 2])
    roll = np.arctan2(rot[1, 0], rot[1, 1])
    return tuple(float(v) for v in np.degrees([yaw, pitch, roll]))


def make_pose(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3] = rotation
    pose[:3, 3] = translation
    return pose


def rotation_angle_deg(rot_a: np.ndarray, rot_b: np.ndarray) -> float:
    """Angle of the relative rotation between two 3×3 rotations, in degrees."""
    cos = (np.trace(rot_a.T @ rot_b) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def similarity_align(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None,
                     with_scale: bool = True) -> tuple[float, np.ndarray, np.ndarray]:
    """Weighted Umeyama fit: ``s, R, t`` minimising Σ w‖s R src + t − dst‖² for points ``[n, 3]``."""
    w = np.ones(len(src)) if weights is None else np.asarray(weights, float)
    w = w / w.sum()
    mu_s, mu_d = w @ src, w @ dst
    a, b = src - mu_s, dst - mu_d
    cov = (b * w[:, None]).T @ a
    u, sig, vt = np.linalg.svd(cov)
    d = np.sign(np.linalg.det(u @ vt))
    fix = np.diag([1.0, 1.0, d])
    rot = u @ fix @ vt
    scale = float((sig * np.diag(fix)).sum() / (w @ (a**2).sum(1))) if with_scale else 1.0
    return scale, rot, mu_d - scale * rot @ mu_s


def solve_pose_pnp(points: np.ndarray, pixels: np.ndarray, intrinsics: np.ndarray,
                   initial_pose: np.ndarray | None = None) -> np.ndarray:
    """Head pose (OpenGL convention) that best projects canonical ``points [n, 3]`` onto ``pixels [n, 2]``."""
    import cv2

    K = K_matrix(intrinsics)
    obj = np.ascontiguousarray(points, dtype=np.float64)
    img = np.ascontiguousarray(pixels, dtype=np.float64)
    if initial_pose is not None:
        cv_pose = GL_TO_CV @ initial_pose
        rvec, _ = cv2.Rodrigues(cv_pose[:3, :3])
        tvec = cv_pose[:3, 3].reshape(3, 1).copy()
        ok, rvec, tvec = cv2.solvePnP(obj, img, K, None, rvec, tvec, True, cv2.SOLVEPNP_ITERATIVE)
    else:
        ok, rvec, tvec = cv2.solvePnP(obj, img, K, None, flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok:
        return initial_pose if initial_pose is not None else np.eye(4)
    rot, _ = cv2.Rodrigues(rvec)
    return GL_TO_CV @ make_pose(rot, tvec.ravel())


def triangulate_shape(pixels: np.ndarray, poses: np.ndarray, intrinsics: np.ndarray,
                      prior: np.ndarray, prior_weight: float | np.ndarray) -> np.ndarray:
    """Per-vertex linear triangulation of a rigid shape seen by posed frames.

    pixels ``[t, n, 2]``, poses ``[t, 4, 4]``, prior ``[n, 3]`` (the canonical shape) → shape ``[n, 3]``.
    Each frame gives two equations per vertex, linear in the vertex, scaled to be in pixels; the prior
    pulls every vertex towards the canonical one with ``prior_weight`` pixels per centimetre, which keeps
    depth sensible when the head barely turns.
    """
    fx, fy, cx, cy = intrinsics
    rot, trans = poses[:, :3, :3], poses[:, :3, 3]  # [t,3,3], [t,3]
    # Current depth of each vertex in each frame, to express the residuals in pixels.
    depth = -(np.einsum("tij,nj->tni", rot, prior) + trans[:, None, :])[..., 2]  # [t, n]
    du = pixels[..., 0] - cx  # [t, n]
    dv = pixels[..., 1] - cy
    # (u−cx)(−Zc) − fx Xc = 0  and  (v−cy)(−Zc) + fy Yc = 0, with Xc = r1·X + t1, etc.
    r1, r2, r3 = rot[:, 0, :], rot[:, 1, :], rot[:, 2, :]  # [t, 3]
    a_u = -du[..., None] * r3[:, None, :] - fx * r1[:, None, :]  # [t, n, 3]
    b_u = du * trans[:, None, 2] + fx * trans[:, None, 0]  # [t, n]
    a_v = -dv[..., None] * r3[:, None, :] + fy * r2[:, None, :]
    b_v = dv * trans[:, None, 2] - fy * trans[:, None, 1]
    scale = 1.0 / np.maximum(depth, 1e-6)
    a = np.concatenate([a_u * scale[..., None], a_v * scale[..., None]], 0)  # [2t, n, 3]
    b = np.concatenate([b_u * scale, b_v * scale], 0)  # [2t, n]
    w2 = np.broadcast_to(np.asarray(prior_weight, dtype=np.float64) ** 2, (3,))
    ata = np.einsum("kni,knj->nij", a, a) + np.diag(w2)
    atb = np.einsum("kni,kn->ni", a, b) + w2 * prior
    return np.linalg.solve(ata, atb[..., None])[..., 0]


def reprojection_errors(shape: np.ndarray, poses: np.ndarray, pixels: np.ndarray,
                        intrinsics: np.ndarray) -> np.ndarray:
    """Pixel distance ``[t, n]`` between ``shape [n, 3]`` projected with ``poses [t, 4, 4]`` and ``pixels [t, n, 2]``."""
    cam = np.einsum("tij,nj->tni", poses[:, :3, :3], shape) + poses[:, None, :3, 3]
    return np.linalg.norm(project(cam, intrinsics) - pixels, axis=-1)


def refine_subject(pixels: np.ndarray, poses: np.ndarray, intrinsics: np.ndarray, canonical: np.ndarray,
                   anchor_weights: np.ndarray, iterations: int = 4,
                   prior_px_per_cm: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Fit the subject's own face shape and re-solve every head pose against it.

    MediaPipe's pose is fitted to a generic canonical face, which lands a few % of the face width off
    the detected landmarks. Alternating (a) per-vertex triangulation across frames with (b) per-frame PnP
    brings the projected shape onto the landmarks. The shape is re-anchored to the canonical face by a
    weighted similarity on MediaPipe's own Procrustes landmarks so the canonical space keeps its meaning.

    pixels ``[t, n, 2]``, poses ``[t, 4, 4]``, canonical ``[n, 3]``, anchor_weights ``[n]``
    → (shape ``[n, 3]``, poses ``[t, 4, 4]``).
    """
    shape = canonical.copy()
    poses = poses.copy()
    for _ in range(iterations):
        poses = np.stack([solve_pose_pnp(shape, px, intrinsics, p) for px, p in zip(pixels, poses)])
        shape = triangulate_shape(pixels, poses, intrinsics, shape, prior_px_per_cm * np.sqrt(len(poses)))
        s, rot, t = similarity_align(shape, canonical, anchor_weights)
        shape = s * shape @ rot.T + t
    poses = np.stack([solve_pose_pnp(shape, px, intrinsics, p) for px, p in zip(pixels, poses)])
    return shape, poses
