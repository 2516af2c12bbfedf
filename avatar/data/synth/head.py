"""The synthetic head from a portrait photo (default: scikit-image's astronaut): every photo pixel of the head
(found by GrabCut seeded with the tracked face) is lifted to 3-D — the face from the tracked canonical mesh's
depth, hair and neck from a head ellipsoid — and expressed in MediaPipe's canonical face space.
"""

from __future__ import annotations

import cv2
import numpy as np

from avatar.capture import camera
from avatar.capture.tracking import CanonicalFace, FaceObservation
from avatar.data.synth.deform import (
    HEAD_ELLIPSOID_CENTER,
    HEAD_ELLIPSOID_RADII,
    SMILE_GAIN,
    SMILE_REST,
    SynthHead,
    _blink_field,
    _brow_field,
    _corner_pull,
    _jaw_weight,
    _mouth_interior,
    _smile_field,
    _smoothstep,
)


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
    h, w = photo.shape[:2]
    k_photo = camera.mediapipe_intrinsics(w, h)
    x0, y0, x1, y1 = obs.bbox
    fh = y1 - y0

    head_mask = _segment_head(photo, obs)
    neck_cut = y1 + 0.12 * fh  # below this the neck belongs to the (static) body in the plate
    rows = np.arange(h)[:, None].repeat(w, 1)
    head_mask &= rows < neck_cut + 8

    face_depth = -camera.transform_points(obs.head_pose, face.vertices)[:, 2]  # [468] cm in front of the camera
    pix, depth_map = _photo_depth(obs, head_mask, face_depth, k_photo)
    points, colors, alpha, jaw_w, shape = _lift_texture(photo, obs, head_mask, pix, depth_map, face_depth, k_photo,
                                                        neck_cut, supersample)
    head = _assemble_head(points, colors, alpha, jaw_w, shape, width, height, supersample)
    _place_in_frame(head, photo, obs, head_mask & (rows < neck_cut), crop, shape)
    return head


def _photo_depth(obs: FaceObservation, head_mask: np.ndarray, face_depth: np.ndarray,
                 k_photo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Depth of every head pixel of the photo: the face from the tracked canonical mesh (``face_depth [468]``),
    hair, ears and neck from the head ellipsoid, with the face's offset from the ellipsoid fading out beyond the
    face outline. Returns the head pixels' centres ``[m, 2]`` and the depth map ``[H, W] float32`` (0 outside
    ``head_mask [H, W]``)."""
    from scipy.interpolate import LinearNDInterpolator

    h, w = head_mask.shape
    pose_photo = obs.head_pose
    px = obs.landmarks_px[:468]
    fw = obs.bbox[2] - obs.bbox[0]
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
    return pix, np.where(head_mask, depth_map, 0).astype(np.float32)


def _lift(pts2d: np.ndarray, depth_filled: np.ndarray, photo: np.ndarray, pose_photo: np.ndarray,
          k_photo: np.ndarray, neck_cut: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Photo positions ``[m, 2]`` → canonical points ``[m, 3]``, colours ``[m, 3]`` (0–255), alpha ``[m]``
    (fading out towards the neck cut); ``depth_filled [H, W]``: the depth map with no holes."""
    depths = _bilinear(depth_filled[..., None], pts2d)[:, 0]
    cam_pts = camera.backproject(pts2d.astype(np.float64), depths.astype(np.float64), k_photo)
    return (camera.transform_points(camera.invert_pose(pose_photo), cam_pts),
            _bilinear(photo.astype(np.float32), pts2d), _smoothstep((neck_cut + 8 - pts2d[:, 1]) / 16.0))


def _lift_texture(photo: np.ndarray, obs: FaceObservation, head_mask: np.ndarray, pix: np.ndarray,
                  depth_map: np.ndarray, face_depth: np.ndarray, k_photo: np.ndarray, neck_cut: float,
                  supersample: int) -> tuple[np.ndarray, ...]:
    """Supersampled points: each head pixel (``pix [m, 2]``) gives supersample² points with bilinear colour and
    depth, and twice as many where the skin beside the lips stretches. Returns the points ``[p, 3]`` (canonical
    cm), colours ``[p, 3]`` (0–255), alpha ``[p]``, jaw weight ``[p]`` and the subject's landmarks ``[468, 3]``."""
    pose_photo = obs.head_pose
    px = obs.landmarks_px[:468]
    offs = (np.arange(supersample) + 0.5) / supersample - 0.5
    sub = np.stack(np.meshgrid(offs, offs), -1).reshape(-1, 2)
    pts2d = (pix[:, None, :] + sub[None]).reshape(-1, 2).astype(np.float32)
    depth_filled = cv2.inpaint(depth_map, (~head_mask).astype(np.uint8), 3, cv2.INPAINT_NS)

    canon, colors, alpha = _lift(pts2d, depth_filled, photo, pose_photo, k_photo, neck_cut)
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
    more = _lift(extra, depth_filled, photo, pose_photo, k_photo, neck_cut)
    canon, colors, alpha = (np.concatenate([x, y]) for x, y in zip((canon, colors, alpha), more))
    jaw_w = np.concatenate([jaw_w, _jaw_weight(more[0], shape)])
    return canon, colors, alpha, jaw_w, shape


def _assemble_head(canon: np.ndarray, colors: np.ndarray, alpha: np.ndarray, jaw_w: np.ndarray, shape: np.ndarray,
                   width: int, height: int, supersample: int) -> SynthHead:
    """The head from its lifted skin points (``canon [p, 3]``, ``colors [p, 3]`` 0–255, ``alpha [p]``, ``jaw_w
    [p]``) and the mouth interior, with every expression's displacement field; background and base pose are
    placeholders until :func:`_place_in_frame`."""
    mouth_pts, mouth_cols, mouth_jaw = _mouth_interior(shape, supersample)
    points = np.concatenate([canon, mouth_pts])
    # The photo smiles; the rest expression is a neutral mouth (the smile field run backwards), so that
    # smile = 0 … 1 spans neutral … a broad smile.
    smile_field = _smile_field(points, shape)
    return SynthHead(
        points=(points + SMILE_REST * smile_field).astype(np.float32),
        colors=np.concatenate([colors / 255.0, mouth_cols]).astype(np.float32),
        alpha=np.concatenate([alpha, np.ones(len(mouth_pts))]).astype(np.float32),
        jaw_weight=np.concatenate([jaw_w, mouth_jaw]).astype(np.float32),
        jaw_disp=_corner_pull(points, shape).astype(np.float32),
        smile_disp=(SMILE_GAIN * smile_field).astype(np.float32),
        blink_disp=np.stack([_blink_field(points, shape, side) for side in ("left", "right")]).astype(np.float32),
        brow_disp=_brow_field(points, shape).astype(np.float32),
        jaw_hinge=np.array([0.0, shape[13, 1] + 1.5, -5.0]),
        background=None,  # set by _place_in_frame
        intrinsics=camera.mediapipe_intrinsics(width, height),
        base_pose=np.eye(4),
        width=width,
        height=height,
        shape=shape + SMILE_REST * _smile_field(shape, shape),
    )


def _place_in_frame(head: SynthHead, photo: np.ndarray, obs: FaceObservation, moving: np.ndarray,
                    crop: tuple[int, int, int, int], shape: np.ndarray) -> None:
    """Frame = a crop of the photo of the frame's shape around head and shoulders (:func:`_frame_crop`); the
    plate is that crop with the head (``moving [H, W] bool``: the head above the neck cut) inpainted out, and the
    base pose puts the rendered head where the photo had it. Sets ``head.background`` and ``head.base_pose``."""
    width, height = head.width, head.height
    cx0, cy0, crop_w, crop_h = crop
    hole = cv2.dilate(moving.astype(np.uint8), np.ones((9, 9), np.uint8))
    plate = cv2.inpaint(photo, hole, 9, cv2.INPAINT_TELEA)
    crop = plate[cy0:cy0 + crop_h, cx0:cx0 + crop_w]
    head.background = cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA if crop_w >= width
                                 else cv2.INTER_CUBIC)
    scale = width / crop_w
    target_px = (obs.landmarks_px[:468] - [cx0, cy0]) * scale
    head.base_pose = camera.solve_pose_pnp(shape, target_px, head.intrinsics, None)
