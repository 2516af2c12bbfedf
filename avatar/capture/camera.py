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


def _skew(v: np.ndarray) -> np.ndarray:
    """Cross-product matrices ``[..., 3, 3]`` of vectors ``[..., 3]``."""
    z = np.zeros(v.shape[:-1])
    return np.stack([np.stack([z, -v[..., 2], v[..., 1]], -1), np.stack([v[..., 2], z, -v[..., 0]], -1),
                     np.stack([-v[..., 1], v[..., 0], z], -1)], -2)


def _exp_so3(w: np.ndarray) -> np.ndarray:
    """Rotations ``[..., 3, 3]`` from axis × angle vectors ``[..., 3]`` (Rodrigues)."""
    angle = np.linalg.norm(w, axis=-1)[..., None, None]
    k = _skew(w / np.maximum(angle[..., 0], 1e-12))
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def solve_poses_weighted(points: np.ndarray, pixels: np.ndarray, intrinsics: np.ndarray, weights: np.ndarray,
                         initial_poses: np.ndarray, iterations: int = 15, huber: float = 1.5,
                         fix_rotation: bool = False) -> np.ndarray:
    """Weighted, robust PnP for many frames at once (Levenberg–Marquardt on rotation and translation).

    points ``[n, 3]`` canonical, pixels ``[t, n, 2]``, weights ``[n]`` (0 = ignore the point),
    initial_poses ``[t, 4, 4]`` → poses ``[t, 4, 4]``. A point's weight says how much it is trusted to move
    with the skull; on top of it, residuals beyond ``huber`` × the frame's median residual are
    down-weighted (Huber), so a few mistracked points cannot tilt the head. With ``fix_rotation`` only the
    translation moves.
    """
    fx, fy, _, _ = intrinsics
    keep = np.asarray(weights, float) > 0
    x, px, w0 = points[keep], pixels[:, keep], np.asarray(weights, float)[keep]  # [n,3], [t,n,2], [n]
    rot, trans = initial_poses[:, :3, :3].copy(), initial_poses[:, :3, 3].copy()  # [t,3,3], [t,3]

    def residuals(rot, trans):
        cam = np.einsum("tij,nj->tni", rot, x) + trans[:, None]  # [t, n, 3]
        return px - project(cam, intrinsics), cam  # [t, n, 2]

    def robust(res):
        norm = np.linalg.norm(res, axis=-1)  # [t, n]
        scale = huber * 1.4826 * np.median(norm, axis=1, keepdims=True) + 1e-6
        return w0 * np.minimum(1.0, scale / np.maximum(norm, 1e-12))  # [t, n]

    res, cam = residuals(rot, trans)
    wts = robust(res)
    damping = np.full(len(rot), 1e-3)
    for _ in range(iterations):
        d = -cam[..., 2]  # [t, n] depth
        zero = np.zeros_like(d)
        ju = np.stack([fx / d, zero, fx * cam[..., 0] / d**2], -1)  # ∂u/∂P [t, n, 3]
        jv = np.stack([zero, -fy / d, -fy * cam[..., 1] / d**2], -1)  # ∂v/∂P
        dp_dw = -_skew(cam - trans[:, None])  # ∂P/∂ω for R ← exp(ω) R: [t, n, 3, 3]
        jac = np.stack([np.concatenate([np.einsum("tni,tnij->tnj", j, dp_dw), j], -1) for j in (ju, jv)],
                       -2)  # [t, n, 2, 6]
        hess = np.einsum("tn,tnki,tnkj->tij", wts, jac, jac)  # [t, 6, 6]
        grad = np.einsum("tn,tnki,tnk->ti", wts, jac, res)  # [t, 6]
        diag = np.einsum("tii->ti", hess)
        lhs = hess + (damping[:, None] * diag + 1e-9)[..., None] * np.eye(6)
        if fix_rotation:
            lhs[:, :3, :] = lhs[:, :, :3] = 0.0
            lhs[:, :3, :3] = np.eye(3)
            grad = grad.copy()
            grad[:, :3] = 0.0
        step = np.linalg.solve(lhs, grad[..., None])[..., 0]  # [t, 6]
        rot_new = _exp_so3(step[:, :3]) @ rot
        trans_new = trans + step[:, 3:]
        res_new, cam_new = residuals(rot_new, trans_new)
        ok = (wts * (res_new**2).sum(-1)).sum(1) < (wts * (res**2).sum(-1)).sum(1)  # [t]
        rot[ok], trans[ok], res[ok], cam[ok] = rot_new[ok], trans_new[ok], res_new[ok], cam_new[ok]
        damping = np.where(ok, damping / 3, damping * 4)
        wts = robust(res)
    out = initial_poses.copy()
    out[:, :3, :3], out[:, :3, 3] = rot, trans
    return out


def calibrate_depth_relief(shape: np.ndarray, pixels: np.ndarray, poses: np.ndarray, intrinsics: np.ndarray,
                           weights: np.ndarray, scales: np.ndarray = np.linspace(0.5, 1.3, 17)) -> float:
    """The depth scale of ``shape``'s relief that best explains the landmarks across frames.

    How deep a face is and how far it turns trade off against each other in the image (the bas-relief
    ambiguity), and the triangulation cannot leave the depth of its prior. Landmark detectors also see
    faces flatter than they are: with the subject's true depth, PnP on MediaPipe's landmarks under-reports
    nods by ~25 % on the synthetic subject. So the face's depth (canonical z, about the weighted centre
    of the points) is scaled by each of ``scales``, every frame's pose re-solved, and the scale with the
    least weighted reprojection error is returned (refined by a parabola through its neighbours).

    shape ``[n, 3]``, pixels ``[t, n, 2]``, poses ``[t, 4, 4]``, weights ``[n]`` → scale.
    """
    costs = np.array([np.mean(reprojection_errors(scale_depth(shape, s, weights),
                                                  solve_poses_weighted(scale_depth(shape, s, weights), pixels,
                                                                       intrinsics, weights, poses),
                                                  pixels, intrinsics) @ weights) for s in scales])
    best = int(np.argmin(costs))
    if 0 < best < len(scales) - 1:  # vertex of the parabola through the best grid point and its neighbours
        c0, c1, c2 = costs[best - 1:best + 2]
        curvature = c0 - 2 * c1 + c2
        if curvature > 0:
            return float(scales[best] + 0.5 * (c0 - c2) / curvature * (scales[1] - scales[0]))
    return float(scales[best])


def scale_depth(shape: np.ndarray, scale: float, weights: np.ndarray) -> np.ndarray:
    """``shape [n, 3]`` with its depth (z) relief scaled by ``scale`` about the ``weights``-weighted centre."""
    out = shape.copy()
    centre = weights @ shape[:, 2] / weights.sum()
    out[:, 2] = centre + scale * (shape[:, 2] - centre)
    return out


def refine_subject(pixels: np.ndarray, poses: np.ndarray, intrinsics: np.ndarray, canonical: np.ndarray,
                   anchor_weights: np.ndarray, pose_weights: np.ndarray | None = None, iterations: int = 4,
                   prior_px_per_cm: float = 2.0, calibrate_depth: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Fit the subject's own face shape and re-solve every head pose against it.

    MediaPipe's pose is fitted to a generic canonical face, which lands a few % of the face width off
    the detected landmarks. Alternating (a) per-vertex triangulation across frames with (b) per-frame
    weighted robust PnP (:func:`solve_poses_weighted` with ``pose_weights``, e.g. only the rigid points)
    brings the projected shape onto the landmarks. The shape is one rigid face: with rigid ``pose_weights``
    only its expression-free part steers the poses. The shape is re-anchored to the canonical
    face by a weighted similarity on ``anchor_weights`` so the canonical space keeps its meaning. With
    ``calibrate_depth`` the depth of the face is then chosen by :func:`calibrate_depth_relief`.

    pixels ``[t, n, 2]``, poses ``[t, 4, 4]``, canonical ``[n, 3]``, anchor_weights ``[n]``,
    pose_weights ``[n]`` (default: all points alike) → (shape ``[n, 3]``, poses ``[t, 4, 4]``).
    """
    pose_weights = np.ones(len(canonical)) if pose_weights is None else pose_weights
    shape = canonical.copy()
    poses = poses.copy()
    for _ in range(iterations):
        poses = solve_poses_weighted(shape, pixels, intrinsics, pose_weights, poses)
        shape = triangulate_shape(pixels, poses, intrinsics, shape, prior_px_per_cm * np.sqrt(len(poses)))
        s, rot, t = similarity_align(shape, canonical, anchor_weights)
        shape = s * shape @ rot.T + t
    if calibrate_depth:
        shape = scale_depth(shape, calibrate_depth_relief(shape, pixels, poses, intrinsics, pose_weights),
                            pose_weights)
    poses = solve_poses_weighted(shape, pixels, intrinsics, pose_weights, poses)
    return shape, poses


def rotation_vectors(rot: np.ndarray) -> np.ndarray:
    """Axis × angle (radians) ``[..., 3]`` of rotations ``[..., 3, 3]`` (log map; fine away from 180°)."""
    cos = np.clip((np.trace(rot, axis1=-2, axis2=-1) - 1.0) / 2.0, -1.0, 1.0)
    angle = np.arccos(cos)
    axis = np.stack([rot[..., 2, 1] - rot[..., 1, 2], rot[..., 0, 2] - rot[..., 2, 0],
                     rot[..., 1, 0] - rot[..., 0, 1]], -1)
    sin = np.sin(angle)
    # angle / (2 sin angle) → 1/2 as the angle → 0
    factor = np.where(sin > 1e-8, angle / (2.0 * np.maximum(sin, 1e-12)), 0.5)
    return axis * factor[..., None]


def align_canonical_rotations(fitted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The one rotation ``A`` that best carries a fitted canonical frame onto the true one.

    Two trackers of one head agree up to their choice of canonical frame: ``fitted_i ≈ truth_i @ A`` for
    head rotations ``fitted, truth [t, 3, 3]`` (canonical → camera). ``A [3, 3]`` minimises
    Σ‖truth_i A − fitted_i‖_F (the chordal mean of ``truthᵢᵀ fittedᵢ``, projected onto SO(3) by SVD); it
    is the rotation part of the similarity between the canonical frames (scale and shift leave rotations
    alone).
    """
    m = np.einsum("tji,tjk->ik", truth, fitted)  # Σ truth_iᵀ fitted_i
    u, _, vt = np.linalg.svd(m)
    fix = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    return u @ fix @ vt


def head_rotation_errors(fitted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-frame rotation error ``[t, 3]`` (degrees, about the true head's x = pitch, y = yaw, z = roll).

    ``fitted, truth [t, 3, 3]`` head rotations; the fitted ones are first carried into the true canonical
    frame with :func:`align_canonical_rotations`. The error rotation is expressed in the head's own frame,
    so its x component is a nod the tracker added (positive: about +x), whatever the head's yaw.
    """
    a = align_canonical_rotations(fitted, truth)
    err = np.einsum("tji,tjk,lk->til", truth, fitted, a)  # truth_iᵀ fitted_i Aᵀ
    return np.degrees(rotation_vectors(err))


def blend_rotations(primary: np.ndarray, other: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """Per frame, the rotation ``weight`` of the way from ``primary`` to ``other`` along the geodesic.

    primary, other ``[t, 3, 3]`` head rotations of the same frames by two trackers, possibly in different
    canonical frames: ``other`` is first carried into ``primary``'s frame with
    :func:`align_canonical_rotations`. → ``[t, 3, 3]``.
    """
    a = align_canonical_rotations(other, primary)  # other_i ≈ primary_i @ a
    towards = rotation_vectors(np.einsum("tji,tjk,lk->til", primary, other, a))  # primary_iᵀ other_i aᵀ
    return primary @ _exp_so3(weight * towards)
