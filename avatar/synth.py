"""The synthetic talking head: our ground truth for tests, benchmarks and the demo.

A real portrait photo (default: scikit-image's astronaut) becomes a textured 2.5-D head: every photo pixel
of the head (found by GrabCut seeded with the tracked face) is lifted to 3-D — the face from the tracked
canonical mesh's depth, hair and neck from a head ellipsoid — and expressed in MediaPipe's canonical face
space. Expressions are deformation fields on those points (jaw rotation that opens onto a mouth interior,
smile from a neutral rest mouth, per-eye blink, inner-brow raise), each strong enough at 1 that MediaPipe
reads it (``bench/synth_check.py`` measures that). Frames are rendered by z-buffered point splatting at 2×
resolution and downsampled, over the photo's own room with the head inpainted out (the static background plate).

The performance (:func:`make_motion`) shows every expression channel alone over its full range and in pairs
with independent timing, in rounds of ~2 s, with head motion chosen uncorrelated with any channel: a field
trained on it cannot explain one channel by another or by the pose.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from avatar import camera
from avatar.tracking import CanonicalFace, FaceObservation

EXPRESSION_NAMES = ("jaw_open", "smile", "blink_left", "blink_right", "brow_raise")
NECK_PIVOT = np.array([0.0, -7.0, -6.0])  # canonical cm: heads turn about the neck, not the nose
HEAD_ELLIPSOID_CENTER = np.array([0.0, 1.0, -3.5])  # canonical cm
HEAD_ELLIPSOID_RADII = np.array([8.0, 12.5, 9.5])
JAW_MAX_DEG = 32.0  # jaw_open = 1: a wide-open mouth
CORNER_HOLD = 0.65  # how much the lip corners stay put as the jaw drops (1 = pinned)
CORNER_PULL_CM = 0.6
BLINK_WIDTH, BLINK_TRAVEL = 1.05, 1.8  # of the eye's half-width and opening (see _blink_field)
SMILE_SIGMA_CM = 1.3
SMILE_REST, SMILE_GAIN = -1.8, 2.4  # in units of _smile_field: the photo's smile is at smile = 0.75


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


def _segment_head(photo: np.ndarray, obs: FaceObservation) -> np.ndarray:
    """GrabCut mask ``[H, W] bool`` of head, hair and neck, seeded by the tracked face."""
    h, w = photo.shape[:2]
    px = obs.landmarks_px[:468]
    x0, y0, x1, y1 = obs.bbox
    fw, fh = x1 - x0, y1 - y0
    mask = np.full((h, w), cv2.GC_BGD, np.uint8)
    mask[int(max(0, y0 - 0.9 * fh)):, int(max(0, x0 - 0.8 * fw)):int(min(w, x1 + 0.8 * fw))] = cv2.GC_PR_BGD
    cv2.ellipse(mask, (int((x0 + x1) / 2), int((y0 + y1) / 2 - 0.15 * fh)), (int(0.75 * fw), int(0.85 * fh)),
                0, 0, 360, cv2.GC_PR_FGD, -1)
    cv2.fillConvexPoly(mask, cv2.convexHull(px.astype(np.int32)), cv2.GC_FGD)
    bgd, fgd = np.zeros((1, 65)), np.zeros((1, 65))
    cv2.setRNGSeed(0)
    cv2.grabCut(np.ascontiguousarray(photo[..., ::-1]), mask, None, bgd, fgd, 5, cv2.GC_INIT_WITH_MASK)
    fg = ((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)).astype(np.uint8)
    # Keep the component that holds the face; smooth its outline.
    n, labels = cv2.connectedComponents(fg)
    nose = px[4].astype(int)
    fg = (labels == labels[nose[1], nose[0]]).astype(np.uint8)
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, np.ones((7, 7), np.uint8))
    return fg.astype(bool)


def _bilinear(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Sample ``image [H, W, C]`` at continuous pixel positions ``xy [n, 2]`` (pixel centres at +0.5)."""
    h, w = image.shape[:2]
    x = np.clip(xy[:, 0] - 0.5, 0, w - 1.001)
    y = np.clip(xy[:, 1] - 0.5, 0, h - 1.001)
    x0, y0 = x.astype(np.int64), y.astype(np.int64)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    return ((image[y0, x0] * (1 - fx) + image[y0, x0 + 1] * fx) * (1 - fy)
            + (image[y0 + 1, x0] * (1 - fx) + image[y0 + 1, x0 + 1] * fx) * fy)


def _ellipsoid_depth(pixels: np.ndarray, pose: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    """Distance along −z where each pixel's ray meets the head ellipsoid (closest approach if it misses)."""
    fx, fy, cx, cy = intrinsics
    dirs = np.stack([(pixels[:, 0] - cx) / fx, -(pixels[:, 1] - cy) / fy, -np.ones(len(pixels))], 1)
    inv = camera.invert_pose(pose)
    o = inv[:3, 3] - HEAD_ELLIPSOID_CENTER  # camera centre in canonical space, relative to the centre
    d = dirs @ inv[:3, :3].T
    o_s, d_s = o / HEAD_ELLIPSOID_RADII, d / HEAD_ELLIPSOID_RADII
    a = (d_s**2).sum(1)
    b = 2 * d_s @ o_s
    c = (o_s**2).sum() - 1
    disc = b * b - 4 * a * c
    t_hit = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
    t_miss = -b / (2 * a)
    return np.where(disc > 0, t_hit, t_miss)  # dirs have z = −1, so t is the distance along −z


def _frame_crop(photo_wh: tuple[int, int], bbox: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """The photo region ``(x0, y0, w, h)`` a ``width``×``height`` frame shows. A square frame is ~3.3 face widths
    tall (a head crop); a camera-shaped one ~4 (a webcam's view of a person), at most the photo."""
    w, h = photo_wh
    x0, y0, x1, y1 = bbox
    fw, fh = x1 - x0, y1 - y0
    aspect = width / height
    crop_h = min(h, 3.3 * fw if width == height else 4.0 * fw)
    crop_h = int(round(min(crop_h, w / aspect)))
    crop_w = int(round(min(w, crop_h * aspect)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 + (0.2 if width == height else 0.45) * fh
    return (int(np.clip(cx - crop_w / 2, 0, w - crop_w)), int(np.clip(cy - crop_h / 2, 0, h - crop_h)),
            crop_w, crop_h)


def build_head(photo: np.ndarray, obs: FaceObservation, face: CanonicalFace, width: int, height: int | None = None,
               supersample: int | None = None) -> SynthHead:
    """Lift the tracked photo into a :class:`SynthHead` rendered into ``width``×``height`` frames (square when
    ``height`` is None). ``supersample``: points per photo pixel along each axis (default: enough for the
    frame's magnification of the photo)."""
    height = width if height is None else height
    crop = _frame_crop((photo.shape[1], photo.shape[0]), obs.bbox, width, height)
    if supersample is None:
        # ~2 points per pixel of render()'s 2× buffer where the skin is not stretched: 3 for the 256² head crop
        # (the photo shown at 0.78×); a 640×480 frame shows it at 1.25× and 3 left holes where the skin stretches
        # (a closed eyelid came out as a dotted veil and MediaPipe read the blink at 0.16 instead of ~0.6).
        supersample = max(3, int(round(3.85 * width / crop[2])))
    from scipy.interpolate import LinearNDInterpolator

    h, w = photo.shape[:2]
    k_photo = camera.mediapipe_intrinsics(w, h)
    pose_photo = obs.head_pose
    px = obs.landmarks_px[:468]
    x0, y0, x1, y1 = obs.bbox
    fw, fh = x1 - x0, y1 - y0

    head_mask = _segment_head(photo, obs)
    neck_cut = y1 + 0.12 * fh  # below this the neck belongs to the (static) body in the plate
    rows = np.arange(h)[:, None].repeat(w, 1)
    head_mask &= rows < neck_cut + 8

    # Depth of the face from the tracked canonical mesh; hair, ears and neck from the head ellipsoid,
    # with the face's offset from the ellipsoid fading out beyond the face outline.
    face_depth = -camera.transform_points(pose_photo, face.vertices)[:, 2]
    ys, xs = np.nonzero(head_mask)
    pix = np.stack([xs, ys], 1).astype(np.float64) + 0.5
    ell = _ellipsoid_depth(pix, pose_photo, k_photo)
    ell_at_landmarks = _ellipsoid_depth(px, pose_photo, k_photo)
    offset = LinearNDInterpolator(px, face_depth - ell_at_landmarks)(pix)
    offset_map = np.zeros((h, w), np.float32)
    inside = np.zeros((h, w), np.float32)
    ok = ~np.isnan(offset)
    offset_map[ys[ok], xs[ok]] = offset[ok]
    inside[ys[ok], xs[ok]] = 1
    blur_num = cv2.GaussianBlur(offset_map * inside, (0, 0), 6)
    blur_den = cv2.GaussianBlur(inside, (0, 0), 6)
    dist = cv2.distanceTransform((1 - inside).astype(np.uint8), cv2.DIST_L2, 5)
    extrap = np.where(blur_den > 1e-3, blur_num / np.maximum(blur_den, 1e-6), 0) * np.exp(-dist / (0.1 * fw))
    depth_offset = np.where(inside > 0, offset_map, extrap)
    depth_map = np.zeros((h, w), np.float32)
    depth_map[ys, xs] = ell + depth_offset[ys, xs]
    # Smooth away the seam between face and ellipsoid: a depth cliff would tear open when the head turns.
    m = head_mask.astype(np.float32)
    sigma = 0.04 * fw
    depth_map = cv2.GaussianBlur(depth_map * m, (0, 0), sigma) / np.maximum(cv2.GaussianBlur(m, (0, 0), sigma), 1e-6)
    depth_map = np.where(head_mask, depth_map, 0).astype(np.float32)

    # Supersampled points: each photo pixel gives supersample² points with bilinear colour and depth.
    offs = (np.arange(supersample) + 0.5) / supersample - 0.5
    sub = np.stack(np.meshgrid(offs, offs), -1).reshape(-1, 2)
    pts2d = (pix[:, None, :] + sub[None]).reshape(-1, 2).astype(np.float32)
    depth_filled = cv2.inpaint(depth_map, (~head_mask).astype(np.uint8), 3, cv2.INPAINT_NS)

    def lift(pts2d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Photo positions ``[m, 2]`` → canonical points ``[m, 3]``, colours ``[m, 3]`` (0–255), alpha ``[m]``."""
        depths = _bilinear(depth_filled[..., None], pts2d)[:, 0]
        cam_pts = camera.backproject(pts2d.astype(np.float64), depths.astype(np.float64), k_photo)
        return (camera.transform_points(camera.invert_pose(pose_photo), cam_pts),
                _bilinear(photo.astype(np.float32), pts2d), _smoothstep((neck_cut + 8 - pts2d[:, 1]) / 16.0))

    canon, colors, alpha = lift(pts2d)
    # The subject's own landmark positions in canonical space (lifted the same way as the texture).
    shape = camera.transform_points(camera.invert_pose(pose_photo),
                                    camera.backproject(px, face_depth, k_photo))
    # Skin beside the lips, from their corners to the chin, stretches up to ~3× when the jaw opens wide:
    # there, twice the points (offset by half a sub-step), so it stays closed instead of showing the mouth
    # cavity through (a few thousand points; the neck and cheeks stretch less and get none).
    jaw_w = _jaw_weight(canon, shape)
    mid_x, half_mouth = (shape[291, 0] + shape[61, 0]) / 2, (shape[291, 0] - shape[61, 0]) / 2
    stretched = ((jaw_w > 0.01) & (jaw_w < 0.99) & (np.abs(canon[:, 0] - mid_x) < half_mouth + 2.0)
                 & (canon[:, 1] > shape[152, 1]) & (canon[:, 1] < shape[13, 1] + 1.0))
    half = 0.5 / supersample
    extra = (pts2d[stretched] + [half, half]).astype(np.float32)
    more = lift(extra)
    canon, colors, alpha = (np.concatenate([x, y]) for x, y in zip((canon, colors, alpha), more))
    jaw_w = np.concatenate([jaw_w, _jaw_weight(more[0], shape)])

    mouth_pts, mouth_cols, mouth_jaw = _mouth_interior(shape, supersample)
    points = np.concatenate([canon, mouth_pts])
    # The photo smiles; the rest expression is a neutral mouth (the smile field run backwards), so that
    # smile = 0 … 1 spans neutral … a broad smile.
    smile_field = _smile_field(points, shape)
    head = SynthHead(
        points=(points + SMILE_REST * smile_field).astype(np.float32),
        colors=np.concatenate([colors / 255.0, mouth_cols]).astype(np.float32),
        alpha=np.concatenate([alpha, np.ones(len(mouth_pts))]).astype(np.float32),
        jaw_weight=np.concatenate([jaw_w, mouth_jaw]).astype(np.float32),
        jaw_disp=_corner_pull(points, shape).astype(np.float32),
        smile_disp=(SMILE_GAIN * smile_field).astype(np.float32),
        blink_disp=np.stack([_blink_field(points, shape, side) for side in ("left", "right")]).astype(np.float32),
        brow_disp=_brow_field(points, shape).astype(np.float32),
        jaw_hinge=np.array([0.0, shape[13, 1] + 1.5, -5.0]),
        background=None,  # set below
        intrinsics=camera.mediapipe_intrinsics(width, height),
        base_pose=np.eye(4),
        width=width,
        height=height,
        shape=shape + SMILE_REST * _smile_field(shape, shape),
    )

    # Frame = a crop of the photo of the frame's shape around head and shoulders (_frame_crop); the plate is
    # that crop with the head inpainted out, and the base pose puts the rendered head where the photo had it.
    cx0, cy0, crop_w, crop_h = crop
    hole = cv2.dilate(head_mask.astype(np.uint8) * (rows < neck_cut), np.ones((9, 9), np.uint8))
    plate = cv2.inpaint(photo, hole, 9, cv2.INPAINT_TELEA)
    crop = plate[cy0:cy0 + crop_h, cx0:cx0 + crop_w]
    head.background = cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA if crop_w >= width
                                 else cv2.INTER_CUBIC)
    scale = width / crop_w
    target_px = (px - [cx0, cy0]) * scale
    head.base_pose = camera.solve_pose_pnp(shape, target_px, head.intrinsics, None)
    return head


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


@dataclass(frozen=True)
class Segment:
    """A stretch of the performance ``[start, end)``: rest, one channel alone, or a combination."""

    start: int
    end: int
    kind: str  # "rest" | "alone" | "combination"
    channels: tuple[str, ...]


@dataclass(frozen=True)
class Motion:
    """Per-frame ground truth of a synthetic clip."""

    angles_deg: np.ndarray  # [t, 3] yaw, pitch, roll
    translation_cm: np.ndarray  # [t, 3]
    expression: np.ndarray  # [t, 5] in EXPRESSION_NAMES order, each in [0, 1]
    segments: tuple[Segment, ...] = ()  # how the expression schedule was built, in time order


ROUND_SECONDS = 2.0  # one round shows every channel alone and two pairs; 300 frames at 25 fps = 6 rounds


def _smooth_noise(rng: np.random.Generator, t: np.ndarray, n_waves: int = 3) -> np.ndarray:
    """Sum of a few random sinusoids over phase ``t`` in [0, 1], scaled to [-1, 1]."""
    out = np.zeros_like(t)
    for _ in range(n_waves):
        out += np.sin(2 * np.pi * (rng.uniform(0.7, 3.0) * t + rng.uniform()))
    return out / n_waves


def _pulse(length: int, start: int, stop: int, ramp: int) -> np.ndarray:
    """``[length]`` 0 outside ``[start, stop)``, rising to 1 over ``ramp`` frames, held, falling likewise."""
    i = np.arange(length, dtype=float)
    up = (i - start + 1) / (ramp + 1)
    down = (stop - i) / (ramp + 1)
    return _smoothstep(np.minimum(up, down))


def _beat_lengths(frames: int, beats: int) -> np.ndarray:
    edges = np.round(np.linspace(0, frames, beats + 1)).astype(int)
    return np.diff(edges)


def expression_schedule(frames: int, fps: float,
                        rng: np.random.Generator) -> tuple[np.ndarray, tuple[Segment, ...]]:
    """``[frames, 5]`` expression values and the segments they were built from.

    The clip is cut into rounds of about ROUND_SECONDS; each round shows every channel alone (to its
    full value, held, others at rest) and two combinations of two channels, each with its own onset, hold
    and amplitude, in a shuffled order. Pairs cycle so that every pair occurs over a long clip. Channels are
    thus seen alone and together with independent timing (low cross-correlation), and any stretch of a round
    or more (the held-out tail of a prepared dataset, the 48-frame test clip) covers every channel.
    """
    names = EXPRESSION_NAMES
    expression = np.zeros((frames, len(names)))
    segments: list[Segment] = []
    rounds = max(1, int(round(frames / (ROUND_SECONDS * fps))))
    pairs = [(a, b) for a in range(len(names)) for b in range(a + 1, len(names))]
    pair_order = [pairs[i] for i in rng.permutation(len(pairs))]
    starts = np.round(np.linspace(0, frames, rounds + 1)).astype(int)
    for r in range(rounds):
        beats = [("alone", (k,)) for k in range(len(names))]
        beats += [("combination", pair_order.pop(0) if pair_order else tuple(rng.choice(len(names), 2, False)))
                  for _ in range(2)]
        if not pair_order:
            pair_order = [pairs[i] for i in rng.permutation(len(pairs))]
        beats = [beats[i] for i in rng.permutation(len(beats))]
        t0 = starts[r]
        for (kind, chans), length in zip(beats, _beat_lengths(starts[r + 1] - t0, len(beats))):
            # One frame of rest opens each beat: neutral frames all along the clip.
            if length > 2:
                segments.append(Segment(int(t0), int(t0 + 1), "rest", ()))
                a, n = t0 + 1, length - 1
            else:
                a, n = t0, length
            ramp = 2 if n >= 6 else 1  # ramps pass through the middle of the range; holds at its ends
            for k in chans:
                if kind == "alone":
                    on, off, amp = 0, n, 1.0  # to the channel's full value, held
                else:  # each channel of a pair on its own clock and to its own value
                    on = int(rng.integers(0, max(1, n // 3)))
                    off = int(n - rng.integers(0, max(1, n // 3)))
                    amp = float(rng.uniform(0.35, 1.0))
                expression[a:a + n, k] = amp * _pulse(n, on, off, ramp)
            segments.append(Segment(int(a), int(a + n), kind, tuple(names[k] for k in chans)))
            t0 += length
    return expression, tuple(segments)


def make_motion(frames: int, fps: float, seed: int = 0) -> Motion:
    """A performance for the camera: head turns and nods within ±25° and small shifts, and an expression
    schedule (:func:`expression_schedule`) that is drawn independently of the head motion.

    Head motion is defined over the clip's phase, so a short clip still covers the whole pose range.
    """
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, frames, endpoint=False)
    expression, segments = expression_schedule(frames, fps, np.random.default_rng([seed, 1]))
    # Slow sinusoids correlate with a few-second schedule by chance (|r| ≈ 0.2 over 300 frames): each angle
    # takes, of 256 random phases and rates, the one least correlated with every channel, so that no head
    # pose predicts an expression.
    angles = []
    for amplitude, cycles in ((24.0, 2.0), (14.0, 2.7), (9.0, 1.3)):  # yaw, pitch, roll
        rate = cycles * rng.uniform(0.85, 1.15, size=(256, 1))
        candidates = amplitude * np.sin(2 * np.pi * (rate * t[None] + rng.uniform(size=(256, 1))))  # [256, t]
        angles.append(candidates[np.argmin(_max_abs_correlation(candidates, expression))])
    trans = np.stack([1.2 * _smooth_noise(rng, t), 0.8 * _smooth_noise(rng, t), 1.5 * _smooth_noise(rng, t)], 1)
    return Motion(np.stack(angles, 1), trans, expression, segments)


def _max_abs_correlation(series: np.ndarray, expression: np.ndarray) -> np.ndarray:
    """``[k]`` largest |Pearson r| of each of ``series [k, t]`` with any column of ``expression [t, c]``."""
    a = series - series.mean(1, keepdims=True)
    b = expression - expression.mean(0)
    cov = a @ b  # [k, c]
    norm = np.linalg.norm(a, axis=1)[:, None] * np.linalg.norm(b, axis=0)[None] + 1e-12
    return np.abs(cov / norm).max(1)


def novel_poses(motion: Motion, count: int, seed: int = 0, min_distance_deg: float = 8.0) -> np.ndarray:
    """``[count, 3]`` yaw/pitch/roll within the clip's range but ≥ ``min_distance_deg`` from every clip pose."""
    rng = np.random.default_rng(seed + 1)
    lo, hi = motion.angles_deg.min(0), motion.angles_deg.max(0)
    chosen: list[np.ndarray] = []
    for _ in range(20000):
        cand = rng.uniform(lo * 0.9, hi * 0.9)
        if np.linalg.norm(motion.angles_deg - cand, axis=1).min() >= min_distance_deg:
            chosen.append(cand)
            if len(chosen) == count:
                break
    return np.array(chosen).reshape(-1, 3)
