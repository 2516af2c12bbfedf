"""The synthetic head's deformation fields (jaw rotation onto a mouth interior, smile from a neutral rest
mouth, per-eye blink, inner-brow raise), its head pose, and the z-buffered point-splat renderer (2× resolution,
downsampled).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from avatar.capture import camera

EXPRESSION_NAMES = ("jaw_open", "smile", "blink_left", "blink_right", "brow_raise")
NECK_PIVOT = np.array([0.0, -7.0, -6.0])  # canonical cm: heads turn about the neck, not the nose
HEAD_ELLIPSOID_CENTER = np.array([0.0, 1.0, -3.5])  # canonical cm
HEAD_ELLIPSOID_RADII = np.array([8.0, 12.5, 9.5])


@dataclass
class SynthHead:
    """Points of the head in canonical space with their colours and expression deformation weights."""

    points: np.ndarray  # [n, 3] float32 canonical cm
    colors: np.ndarray  # [n, 3] float32 in [0, 1]
    alpha: np.ndarray  # [n] float32 coverage (feathered at the neck cut)
    jaw_weight: np.ndarray  # [n] how much of the jaw rotation a point follows
    jaw_disp: np.ndarray  # [n, 3] displacement at jaw_open = 1 before the rotation (lip corners draw in)
    smile_disp: np.ndarray  # [n, 3] displacement at smile = 1
    blink_disp: np.ndarray  # [2, n, 3] displacement at blink = 1 (left, right eye; the subject's sides)
    brow_disp: np.ndarray  # [n, 3] displacement at brow raise = 1
    jaw_hinge: np.ndarray  # [3] canonical point the jaw rotates about (x axis through it)
    background: np.ndarray  # [H, W, 3] uint8 room plate with the head removed
    intrinsics: np.ndarray  # [4] camera of the output frames
    base_pose: np.ndarray  # [4, 4] pose at which the head sits where it was in the photo
    width: int  # output frame size: square (tests) or camera-shaped (640×480, as a webcam sees a person)
    height: int
    shape: np.ndarray = field(repr=False, default=None)  # [468, 3] subject landmarks in canonical cm


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)




JAW_MAX_DEG = 32.0  # jaw_open = 1: a wide-open mouth


CORNER_HOLD = 0.65  # how much the lip corners stay put as the jaw drops (1 = pinned)


CORNER_PULL_CM = 0.6


BLINK_WIDTH, BLINK_TRAVEL = 1.05, 1.8  # of the eye's half-width and opening (see _blink_field)


SMILE_SIGMA_CM = 1.3


SMILE_REST, SMILE_GAIN = -1.8, 2.4  # in units of _smile_field: the photo's smile is at smile = 0.75


def _mouth_interior(shape: np.ndarray, supersample: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A dark mouth cavity with upper teeth and a tongue, recessed behind the lips (canonical cm).

    A bowl deep enough that the chin and lower lip stay in front of it when they swing back at full jaw
    opening.
    """
    left, right = shape[61], shape[291]
    top = shape[13]
    mid_x, half_w = (left[0] + right[0]) / 2, (right[0] - left[0]) / 2
    step = 0.05 / supersample * 3
    xs = np.arange(left[0] - 0.6, right[0] + 0.6, step)  # the rest mouth (corners drawn in): no wider, or
    # it shows through the cheeks where the jaw and the neutral-mouth offset stretch them
    ys = np.arange(top[1] - 4.8, top[1] + 0.3, step)  # above the chin: hidden by it when the jaw is shut
    gx, gy = np.meshgrid(xs, ys)
    across = (gx.ravel() - mid_x) / half_w  # 0 mid-mouth, ±1 at the corners
    z = top[2] - 4.0 + 1.2 * np.minimum(across**2, 1)  # side walls come forward: no view past them
    pts = np.stack([gx.ravel(), gy.ravel(), z], 1)
    drop = top[1] + 0.3 - pts[:, 1]  # cm below the top of the cavity
    # Rounded below (half an ellipse): square lower corners would poke out under the jaw line.
    keep = (drop < 2.5) | ((across / 1.25) ** 2 + ((drop - 2.5) / 2.6) ** 2 <= 1)
    pts, across, drop = pts[keep], across[keep], drop[keep]
    cols = np.tile([0.22, 0.05, 0.07], (len(pts), 1))  # throat
    cols[drop < 0.7] = [0.92, 0.90, 0.84]  # upper teeth
    cols[drop > 3.6] = [0.36, 0.12, 0.13]  # tongue, dark: a bright one reads as the lower lip
    shade = 1.0 - 0.6 * np.minimum(np.abs(across), 1.3) ** 2 / 1.69
    # The roof stays with the skull; the floor (tongue) goes down with the jaw, so the opening stays filled.
    return pts, cols * shade[:, None], _smoothstep((drop - 0.7) / 4.1)


def _jaw_weight(points: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """1 for the chin and lower lip, 0 for the upper face: a sharp split between the lips, soft elsewhere.

    Along the lips the weight tapers to 0 at the corners, so the mouth opens as a lens (corners stay joined)
    rather than as a box the width of the mouth.
    """
    mouth_y = (shape[13, 1] + shape[14, 1]) / 2
    half_width = (shape[291, 0] - shape[61, 0]) / 2
    mid_x = (shape[291, 0] + shape[61, 0]) / 2
    lateral = np.maximum(np.abs(points[:, 0] - mid_x) - half_width, 0)
    softness = 1e-3 + 0.6 * lateral  # a clean split between the lips (no smeared points); cheeks stretch
    w = 0.5 * (1 + np.tanh((mouth_y - points[:, 1]) / (2 * softness)))
    across = np.clip(np.abs(points[:, 0] - mid_x) / half_width, 0, 1)  # 0 mid-mouth, 1 at the corners
    below = _smoothstep((mouth_y - points[:, 1]) / 3.0)  # the chin moves whole; the lower lip bends
    w *= 1 - CORNER_HOLD * (1 - below) * across**2
    w *= np.exp(-0.5 * (lateral / 2.5) ** 2)
    chin_y = shape[152, 1]
    w *= np.where(points[:, 1] < chin_y, np.exp(-((chin_y - points[:, 1]) / 2.5) ** 2), 1.0)  # neck stretches
    w *= _smoothstep((points[:, 2] + 3.0) / 4.0)  # not the back of the head
    return w


def _corner_pull(points: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """The lip corners draw in towards the middle as the mouth opens wide (an oval, not a wedge)."""
    disp = np.zeros_like(points)
    for idx, sign in ((61, 1), (291, -1)):
        g = np.exp(-0.5 * (np.linalg.norm(points - shape[idx], axis=1) / 1.2) ** 2)
        disp[:, 0] += CORNER_PULL_CM * sign * g
    return disp


def _smile_field(points: np.ndarray, shape: np.ndarray) -> np.ndarray:
    disp = np.zeros_like(points)
    for idx, sign in ((61, -1), (291, 1)):
        g = np.exp(-0.5 * (np.linalg.norm(points - shape[idx], axis=1) / SMILE_SIGMA_CM) ** 2)
        disp += g[:, None] * np.array([0.35 * sign, 0.45, -0.15])
    return disp


def _blink_field(points: np.ndarray, shape: np.ndarray, side: str) -> np.ndarray:
    """The upper lid slides down over the eye (and a touch forward, so it covers it)."""
    outer, inner, upper, lower = (263, 362, 386, 374) if side == "left" else (33, 133, 159, 145)
    centre = (shape[outer] + shape[inner]) / 2
    half_w = abs(shape[outer, 0] - shape[inner, 0]) / 2 * BLINK_WIDTH
    lid_y = shape[upper, 1]
    # Past the lower lid: no white left, and MediaPipe reads the eye as firmly shut (max eyeBlink over the
    # 300-frame clip 0.68/0.61 at 1.8× the opening, 0.53/0.55 at 1.5×).
    travel = (shape[upper, 1] - shape[lower, 1]) * BLINK_TRAVEL
    dx = np.abs(points[:, 0] - centre[0]) / half_w
    # The lid drops most mid-eye and not at all at the corners, where the lids already meet: the closed
    # lash line lies along the lower lid instead of dragging the corners down.
    lateral = np.sqrt(np.clip(1 - dx**2, 0, 1))
    above = points[:, 1] - lid_y
    vertical = np.where(above >= -0.05, np.exp(-np.maximum(above, 0) / 1.0), 0.0)
    w = lateral * vertical * (np.abs(points[:, 2] - centre[2]) < 2.0)
    disp = np.zeros_like(points)
    disp[:, 1] = -travel * w
    disp[:, 2] = 0.12 * w
    return disp


def _brow_field(points: np.ndarray, shape: np.ndarray) -> np.ndarray:
    disp = np.zeros_like(points)
    for brow, inner in (((70, 63, 105, 66, 107), (107, 55, 65)), ((300, 293, 334, 296, 336), (336, 285, 295))):
        c = shape[list(brow)].mean(0)
        g = np.exp(-0.5 * (np.linalg.norm((points - c) * [0.7, 1.0, 1.0], axis=1) / 1.8) ** 2)
        disp[:, 1] += 0.6 * g
        # The inner ends rise most (the raised, "surprised" brow MediaPipe calls browInnerUp).
        c = shape[list(inner)].mean(0)
        g = np.exp(-0.5 * (np.linalg.norm((points - c) * [1.0, 0.8, 1.0], axis=1) / 1.2) ** 2)
        disp[:, 1] += 0.8 * g
    return disp


def deform(head: SynthHead, expression: np.ndarray) -> np.ndarray:
    """Canonical points ``[n, 3]`` of the head with ``expression [5]`` (order of EXPRESSION_NAMES) applied."""
    jaw, smile, blink_l, blink_r, brow = expression
    pts = head.points + smile * head.smile_disp + blink_l * head.blink_disp[0] + blink_r * head.blink_disp[1]
    pts = pts + brow * head.brow_disp + jaw * head.jaw_disp
    angle = np.radians(JAW_MAX_DEG) * jaw * head.jaw_weight  # [n]
    rel = pts - head.jaw_hinge
    c, s = np.cos(angle), np.sin(angle)
    y = rel[:, 1] * c - rel[:, 2] * s  # rotate about −x: the chin goes down and back
    z = rel[:, 1] * s + rel[:, 2] * c
    return np.stack([pts[:, 0], y + head.jaw_hinge[1], z + head.jaw_hinge[2]], 1)


def head_pose(head: SynthHead, yaw: float, pitch: float, roll: float, translation_cm: np.ndarray) -> np.ndarray:
    """Pose with the head turned (degrees) about the neck pivot and shifted, relative to the base pose."""
    rot = camera.make_pose(camera.euler_to_matrix(yaw, pitch, roll), np.zeros(3))
    to_pivot = camera.make_pose(np.eye(3), NECK_PIVOT)
    from_pivot = camera.make_pose(np.eye(3), -NECK_PIVOT)
    shift = camera.make_pose(np.eye(3), np.asarray(translation_cm, float))
    return shift @ head.base_pose @ to_pivot @ rot @ from_pivot


def render(head: SynthHead, pose: np.ndarray, expression: np.ndarray, supersample: int = 2) -> np.ndarray:
    """Render one RGB frame ``[H, W, 3] uint8``: z-buffered splats at ``supersample``× then area-downsampled."""
    wide, high = head.width * supersample, head.height * supersample
    k = head.intrinsics * np.array([supersample, supersample, supersample, supersample])
    cam = camera.transform_points(pose, deform(head, expression))
    uv = camera.project(cam, k)
    depth = -cam[:, 2]
    ui, vi = np.floor(uv[:, 0]).astype(np.int64), np.floor(uv[:, 1]).astype(np.int64)
    valid = (ui >= 0) & (ui < wide) & (vi >= 0) & (vi < high) & (depth > 1e-3)
    idx = np.nonzero(valid)[0]
    pix = torch.from_numpy(vi[idx] * wide + ui[idx])
    # Nearest point per pixel: one scatter-min over (quantised depth, point index) packed into int64.
    key = torch.from_numpy((np.round(depth[idx] * 1000).astype(np.int64) << 24) | np.arange(len(idx)))
    zbuf = torch.full((high * wide,), torch.iinfo(torch.int64).max, dtype=torch.int64)
    zbuf.scatter_reduce_(0, pix, key, reduce="amin")
    hit = zbuf != torch.iinfo(torch.int64).max
    winner = idx[(zbuf[hit] & ((1 << 24) - 1)).numpy()]
    color = np.zeros((high * wide, 3), np.float32)
    cover = np.zeros(high * wide, np.float32)
    hit_np = hit.numpy()
    color[hit_np] = head.colors[winner] * head.alpha[winner, None]
    cover[hit_np] = head.alpha[winner]
    color, cover = color.reshape(high, wide, 3), cover.reshape(high, wide)
    # Fill pinholes (stretched skin) from their neighbours; leave the silhouette alone.
    got = hit_np.reshape(high, wide).astype(np.float32)
    for _ in range(2):
        n = cv2.boxFilter(got, -1, (3, 3), normalize=False)
        hole = (got == 0) & (n >= 4)
        if not hole.any():
            break
        csum = cv2.boxFilter(color, -1, (3, 3), normalize=False)
        asum = cv2.boxFilter(cover, -1, (3, 3), normalize=False)
        color[hole] = csum[hole] / n[hole, None]
        cover[hole] = asum[hole] / n[hole]
        got[hole] = 1
    color = cv2.resize(color, (head.width, head.height), interpolation=cv2.INTER_AREA)
    cover = cv2.resize(cover, (head.width, head.height), interpolation=cv2.INTER_AREA)
    bg = head.background.astype(np.float32) / 255.0
    out = color + (1 - cover[..., None]) * bg
    return np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)
