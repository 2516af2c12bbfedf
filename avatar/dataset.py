"""Video → NerFace dataset, and the one reader of that dataset.

A dataset directory holds ``frames/*.png`` (square crops around the head, one fixed crop for the whole
video), ``background.png`` (the static background in the same crop), ``transforms_{train,val,test}.json``
and ``report.json``. The transforms files follow the NerFace layout (``frames[*].file_path``,
``transform_matrix``, ``expression``, ``bbox``; top-level ``intrinsics``) with our fields added:
``expression_names``, ``image_size``, ``head_bounds``, ``camera_convention``, and ``full_frame``: where the
square crop sits in the recording (``crop`` = x0, y0, side in source pixels; ``source_size``) and
``plate.png``, the empty scene at the recording's own framing (≤ :data:`MAX_PLATE_SIDE` px), which the live
loop composites the rendered head into (a camera-shaped output instead of the square crop).

``transform_matrix`` is the head pose: canonical face space (cm) → camera, OpenGL camera looking down −z
(see :mod:`avatar.camera`); the camera itself is fixed. ``bbox`` is the face box ``[x0, y0, x1, y1]``
in pixels of the written frame.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from tqdm import tqdm

from avatar import camera
from avatar.errors import UserError
from avatar.fileio import atomic_directory, read_json, write_json_atomic
from avatar.tracking import (BLENDSHAPE_NAMES, NUM_FACE_VERTICES, REGION_NAMES, FaceTracker, load_canonical_face,
                             region_boxes, rigid_landmark_weights)
from avatar.video import iter_frames, probe_video

DATASET_FORMAT = "nerface-avatar-dataset/1"
SPLITS = ("train", "val", "test")
PLATE_FILE = "plate.png"
MAX_PLATE_SIDE = 1920  # the full-frame plate's longer side at most (a 4K recording's plate is stored at 1080p)
MAX_BACKGROUND_SAMPLES = 48  # frames kept in memory to estimate an automatic background plate
MAX_SHAPE_FRAMES = 600  # frames used to fit the subject's face shape (all frames get a refined pose)
MEDIAPIPE_ROTATION_WEIGHT = 0.5  # share of MediaPipe's own head rotation in the final one (0: rigid PnP only)


@dataclass
class PrepareConfig:
    video: str
    out: str
    background: str | None = None  # an image of the empty scene, "auto", or None (auto)
    size: int = 512
    test_fraction: float = 0.17
    val_fraction: float = 0.05
    landmarker: str | None = None
    overwrite: bool = False


@dataclass
class Track:
    """Tracking of one video, frames without a face left out."""

    frame_indices: np.ndarray  # [t] int, index in the video
    landmarks_px: np.ndarray  # [t, 478, 2] pixels of the full frame
    poses: np.ndarray  # [t, 4, 4] MediaPipe head poses
    expressions: np.ndarray  # [t, 52]
    skipped: list[int]  # frames with no face
    total: int
    width: int
    height: int
    fps: float


def track_video(path: str | Path, landmarker: str | None = None, progress: bool = True) -> Track:
    """Run the face tracker over every frame (VIDEO mode), streaming the video."""
    info = probe_video(path)
    indices, lms, poses, exprs, skipped = [], [], [], [], []
    total = 0
    with FaceTracker("video", landmarker) as tracker:
        # Bars only on a terminal (disable=None), and erased when done, so errors stay one clean line.
        bar = tqdm(iter_frames(path), total=info.frame_count, desc="tracking", unit="frame", leave=False,
                   disable=None if progress else True)
        for i, rgb in enumerate(bar):
            total += 1
            obs = tracker.track(rgb, int(round(i * 1000.0 / info.fps)))
            if obs is None:
                skipped.append(i)
                continue
            indices.append(i)
            lms.append(obs.landmarks_px.astype(np.float32))
            poses.append(obs.head_pose)
            exprs.append(obs.blendshapes)
    if total == 0:
        raise UserError(f"{path} contains no decodable video frames")
    if len(indices) < 2:
        raise UserError(f"no face found in {path} ({len(indices)} of {total} frames tracked); "
                        "record a video with the face clearly visible")
    return Track(np.array(indices), np.stack(lms), np.stack(poses), np.stack(exprs), skipped, total,
                 info.width, info.height, info.fps)


def fixed_crop(boxes: np.ndarray, width: int, height: int) -> tuple[int, int, int]:
    """One square crop ``(x0, y0, side)`` holding the head in every frame; boxes ``[t, 4]`` face boxes."""
    union = np.concatenate([boxes[:, :2].min(0), boxes[:, 2:].max(0)])
    face = np.median(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]))
    side = int(round(min(max(union[2] - union[0], union[3] - union[1]) + 1.1 * face, width, height)))
    cx = (union[0] + union[2]) / 2
    cy = (union[1] + union[3]) / 2 - 0.08 * face  # hair takes more room above the face than the chin below
    x0 = int(round(np.clip(cx - side / 2, 0, width - side)))
    y0 = int(round(np.clip(cy - side / 2, 0, height - side)))
    return x0, y0, side


def head_mask(landmarks_px: np.ndarray, size: int, rows: int | None = None) -> np.ndarray:
    """``[rows, size] bool`` (square when ``rows`` is None): where head, hair, neck and body may be
    (generous: for background estimation)."""
    pts = landmarks_px[:NUM_FACE_VERTICES]
    centre = pts.mean(0)
    height = pts[:, 1].max() - pts[:, 1].min()
    hull = (pts - centre) * [1.8, 1.9] + centre - [0, 0.25 * height]  # hair: mostly above the face mesh
    mask = np.zeros((size if rows is None else rows, size), np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(hull.astype(np.int32)), 1)
    width = pts[:, 0].max() - pts[:, 0].min()
    chin = pts[:, 1].max()
    x0, x1 = int(centre[0] - 0.9 * width), int(centre[0] + 0.9 * width)
    mask[int(max(chin - 0.2 * width, 0)):, max(x0, 0):max(x1, 0)] = 1
    return mask.astype(bool)


def estimate_background(samples: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Median of the pixels the head leaves uncovered over the video, never-seen holes inpainted.

    samples ``[k, S, S, 3] uint8``, masks ``[k, S, S] bool`` (True = head) → ``[S, S, 3] uint8``.
    """
    data = samples.astype(np.float32)
    data[masks] = np.nan
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            plate = np.nanmedian(data, axis=0)
    holes = np.isnan(plate[..., 0])
    plate = np.nan_to_num(plate).clip(0, 255).astype(np.uint8)
    if holes.any():
        plate = cv2.inpaint(plate, holes.astype(np.uint8), 7, cv2.INPAINT_TELEA)
    return plate


def _load_background(path: str, width: int, height: int) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"background image {p}: no such file")
    bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
    if bgr is None:
        raise UserError(f"background {p} is not a readable image")
    h, w = bgr.shape[:2]
    if (w, h) != (width, height):
        if abs(w / h - width / height) > 0.01:
            raise UserError(f"background {p} is {w}x{h} but the video is {width}x{height}; "
                            "use a still from the same camera")
        bgr = cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA)
    return bgr[..., ::-1].copy()


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_CUBIC
    return cv2.resize(img, (size, size), interpolation=interp)


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


def split_indices(count: int, test_fraction: float, val_fraction: float) -> dict[str, np.ndarray]:
    """Time-ordered split: the last ``test_fraction`` is test; val is spread evenly over the rest."""
    n_test = int(round(count * test_fraction))
    if test_fraction > 0 and count >= 3:
        n_test = max(n_test, 1)
    n_test = min(n_test, count - 1)
    rest = np.arange(count - n_test)
    n_val = int(round(len(rest) * val_fraction))
    if val_fraction > 0 and len(rest) >= 10:
        n_val = max(n_val, 1)
    val = rest[np.linspace(0, len(rest) - 1, n_val + 2).astype(int)[1:-1]] if n_val else np.array([], int)
    train = np.setdiff1d(rest, val)
    return {"train": train, "val": val, "test": np.arange(count - n_test, count)}


def prepare_dataset(cfg: PrepareConfig, progress: bool = True,
                    log: Callable[[str], None] = print) -> dict:
    """Track, fit the camera, crop, and write a dataset directory atomically. Returns the report."""
    start = time.perf_counter()
    if cfg.size < 16:
        raise UserError("--size must be at least 16")
    if not 0 <= cfg.test_fraction < 1:
        raise UserError("--test-fraction must be in [0, 1)")
    info = probe_video(cfg.video)  # fails early, before anything is written
    if Path(cfg.out).exists() and not cfg.overwrite:
        raise UserError(f"{cfg.out} already exists (pass --overwrite to replace it)")
    plate_full = None
    if cfg.background not in (None, "auto"):
        plate_full = _load_background(cfg.background, info.width, info.height)

    track = track_video(cfg.video, cfg.landmarker, progress)
    t = len(track.frame_indices)

    # Camera: MediaPipe's, with the subject's own face shape fitted so the pose explains the landmarks.
    face = load_canonical_face(cfg.landmarker)
    k_full = camera.mediapipe_intrinsics(track.width, track.height)
    pixels = track.landmarks_px[:, :NUM_FACE_VERTICES].astype(np.float64)
    err_before = camera.reprojection_errors(face.vertices, track.poses, pixels, k_full)
    # Poses from the rigid points only (no lips, jaw, cheeks, brows, eyelids): otherwise opening the mouth
    # tilts the tracked head. The shape is fitted on frames spread over the whole video: fitting it on the
    # least expressive 30 % only (the rigid points hardly move with expression anyway) gave a median
    # rotation error of 1.94° instead of 1.79° over five synthetic subjects (fewer poses to triangulate).
    rigid = rigid_landmark_weights()
    subset = np.linspace(0, t - 1, min(t, MAX_SHAPE_FRAMES)).astype(int)
    shape, _ = camera.refine_subject(pixels[subset], track.poses[subset], k_full, face.vertices,
                                     face.procrustes_weights, rigid,
                                     calibrate_depth=True)
    poses = camera.solve_poses_weighted(shape, pixels, k_full, rigid, track.poses)
    # Two estimates of each head rotation that err in opposite directions: the landmarks' 2-D positions
    # under-report nods (−0.15° per degree of true pitch on the synthetic subjects), MediaPipe's own pose,
    # fitted to its 3-D mesh, over-reports them (+0.13°/°). Their midpoint cut the median rotation error
    # from ~2.5° to ~1.6° on four synthetic subjects at 256² (see report.json's head_pose_vs_truth).
    poses[:, :3, :3] = camera.blend_rotations(poses[:, :3, :3], track.poses[:, :3, :3], MEDIAPIPE_ROTATION_WEIGHT)
    poses = camera.solve_poses_weighted(shape, pixels, k_full, rigid, poses, fix_rotation=True)
    err_after = camera.reprojection_errors(shape, poses, pixels, k_full)
    face_width = pixels[..., 0].max(1) - pixels[..., 0].min(1)  # [t]

    boxes = np.concatenate([pixels.min(1), pixels.max(1)], 1)
    x0, y0, side = fixed_crop(boxes, track.width, track.height)
    scale = cfg.size / side
    intrinsics = camera.crop_intrinsics(k_full, x0, y0, scale)
    crop_px = (track.landmarks_px - [x0, y0]) * scale  # [t, 478, 2] in the written frames

    splits = split_indices(t, cfg.test_fraction, cfg.val_fraction)
    sample_rows = set(np.linspace(0, t - 1, min(t, MAX_BACKGROUND_SAMPLES)).astype(int).tolist())
    row_of_frame = {int(f): r for r, f in enumerate(track.frame_indices)}

    plate_scale = min(1.0, MAX_PLATE_SIDE / max(track.width, track.height))
    plate_wh = (int(round(track.width * plate_scale)), int(round(track.height * plate_scale)))

    with atomic_directory(cfg.out, cfg.overwrite) as tmp:
        (tmp / "frames").mkdir()
        samples, masks, full_samples, full_masks = [], [], [], []
        bar = tqdm(iter_frames(cfg.video), total=track.total, desc="writing frames", unit="frame", leave=False,
                   disable=None if progress else True)
        for i, rgb in enumerate(bar):
            row = row_of_frame.get(i)
            if row is None:
                continue
            crop = resize_square(rgb[y0:y0 + side, x0:x0 + side], cfg.size)
            cv2.imwrite(str(tmp / "frames" / f"{i:06d}.png"), crop[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1])
            if plate_full is None and row in sample_rows:
                samples.append(crop)
                masks.append(head_mask(crop_px[row], cfg.size))
                full = rgb if plate_scale == 1 else cv2.resize(rgb, plate_wh, interpolation=cv2.INTER_AREA)
                full_samples.append(full)
                full_masks.append(head_mask(track.landmarks_px[row] * plate_scale, *plate_wh))
        # The empty scene at the recording's framing: what the live loop puts around the rendered head.
        full_plate = (estimate_background(np.stack(full_samples), np.stack(full_masks)) if plate_full is None else
                      cv2.resize(plate_full, plate_wh, interpolation=cv2.INTER_AREA) if plate_scale < 1 else plate_full)
        cv2.imwrite(str(tmp / PLATE_FILE), np.ascontiguousarray(full_plate[..., ::-1]))
        if plate_full is not None:
            plate = resize_square(plate_full[y0:y0 + side, x0:x0 + side], cfg.size)
            background_source = str(cfg.background)
        else:
            plate = estimate_background(np.stack(samples), np.stack(masks))
            background_source = "auto"
        cv2.imwrite(str(tmp / "background.png"), plate[..., ::-1])

        bounds_lo = shape.min(0) - [4.0, 7.0, 11.0]  # neck below, back of the head behind the face mesh
        bounds_hi = shape.max(0) + [4.0, 9.0, 3.0]  # hair above and to the sides (big hair too)
        common = {
            "format": DATASET_FORMAT,
            "camera_convention": "opengl: transform_matrix maps canonical face space (cm) to camera, "
                                 "camera looks down -z, pixel origin top-left",
            "intrinsics": intrinsics,
            "image_size": [cfg.size, cfg.size],
            "expression_names": list(BLENDSHAPE_NAMES),
            "background": "background.png",
            "head_bounds": {"min": bounds_lo, "max": bounds_hi},
            "fps": track.fps,
            "full_frame": {"crop": [x0, y0, side], "source_size": [track.width, track.height],
                           "plate": PLATE_FILE},
        }
        for name in SPLITS:
            frames = []
            for row in splits[name]:
                i = int(track.frame_indices[row])
                px = crop_px[row, :NUM_FACE_VERTICES]
                frames.append({
                    "file_path": f"frames/{i:06d}.png",
                    "frame_index": i,
                    "time": i / track.fps,
                    "transform_matrix": poses[row],
                    "expression": track.expressions[row],
                    "bbox": np.concatenate([px.min(0), px.max(0)]).round(2),
                    "regions": region_boxes(crop_px[row]),
                })
            write_json_atomic(tmp / f"transforms_{name}.json", {**common, "frames": frames})

        coverage, coverage_warnings = expression_coverage(track.expressions)
        truth_path = Path(cfg.video).parent / "truth.json"  # beside a synthetic subject's video
        pose_check = None
        if truth_path.is_file():
            truth = read_json(truth_path)
            truth_frames = truth.get("frames") if isinstance(truth, dict) else None
            if isinstance(truth_frames, list) and truth_frames and all(
                    isinstance(f, dict) and "head_pose" in f for f in truth_frames):
                # MediaPipe's own head pose beside ours: the baseline any refinement has to beat.
                pose_check = {"truth": str(truth_path),
                              **pose_error_vs_truth(poses, track.frame_indices, truth),
                              "mediapipe_pose": pose_error_vs_truth(track.poses, track.frame_indices, truth)}
        per_frame_before = np.median(err_before, 1) / face_width
        per_frame_after = np.median(err_after, 1) / face_width
        report = {
            "video": str(cfg.video),
            "frames_total": track.total,
            "frames_tracked": t,
            "frames_without_face": track.skipped,
            "splits": {k: int(len(v)) for k, v in splits.items()},
            "reprojection_error_px": float(np.median(err_after) * scale),
            "reprojection_error_face_width": float(np.median(per_frame_after)),
            "reprojection_error_face_width_mediapipe_canonical": float(np.median(per_frame_before)),
            "face_width_px": float(np.median(face_width) * scale),
            "crop": {"x0": x0, "y0": y0, "side": side, "source_size": [track.width, track.height]},
            "size": cfg.size,
            "background": background_source,
            "face_shape_frames": int(len(subset)),
            "expression_coverage": coverage,
            "expression_coverage_warnings": coverage_warnings,
            "head_pose_vs_truth": pose_check,
            "seconds": round(time.perf_counter() - start, 2),
        }
        write_json_atomic(tmp / "report.json", report)
    log(f"{t}/{track.total} frames tracked ({len(track.skipped)} without a face); "
        f"reprojection error {report['reprojection_error_px']:.2f} px = "
        f"{100 * report['reprojection_error_face_width']:.2f}% of the face width "
        f"(MediaPipe's canonical face: {100 * report['reprojection_error_face_width_mediapipe_canonical']:.2f}%); "
        f"splits {report['splits']}; {report['seconds']:.1f} s → {cfg.out}")
    if pose_check and "median_rotation_error_deg" in pose_check:
        line = (f"head rotation vs {truth_path.name}: median {pose_check['median_rotation_error_deg']:.2f}°, "
                f"mean {pose_check['mean_rotation_error_deg']:.2f}°")
        jaw = pose_check.get("jaw")
        if jaw and jaw["mean_pitch_error_open_deg"] is not None and jaw["mean_pitch_error_closed_deg"] is not None:
            line += (f"; mean pitch error jaw open {jaw['mean_pitch_error_open_deg']:+.2f}° "
                     f"({jaw['open_frames']} frames) vs closed {jaw['mean_pitch_error_closed_deg']:+.2f}° "
                     f"({jaw['closed_frames']}), correlation with the jaw {jaw['pitch_error_jaw_correlation']}")
        line += f" (MediaPipe's own pose: median {pose_check['mediapipe_pose']['median_rotation_error_deg']:.2f}°)"
        log(line)
    for warning in coverage_warnings:
        log(f"warning: {warning}")
    return report


def read_transforms(directory: str | Path, split: str) -> dict:
    """Read and check one ``transforms_<split>.json`` of a dataset directory."""
    path = Path(directory) / f"transforms_{split}.json"
    if not path.is_file():
        raise UserError(f"{path} not found: is {directory} a dataset made by trainer/prepare.py?")
    meta = read_json(path)
    if meta.get("format") != DATASET_FORMAT:
        raise UserError(f"{path} has format {meta.get('format')!r}, expected {DATASET_FORMAT!r}; "
                        "re-run trainer/prepare.py")
    for key in ("intrinsics", "image_size", "expression_names", "frames"):
        if key not in meta:
            raise UserError(f"{path} lacks {key!r}")
    return meta


@dataclass
class FrameSet:
    """One split of a dataset in memory."""

    directory: Path
    images: np.ndarray | None  # [t, h, w, 3] uint8, or None when loaded without images
    poses: np.ndarray  # [t, 4, 4]
    expressions: np.ndarray  # [t, 52] float32
    bboxes: np.ndarray  # [t, 4] face boxes x0, y0, x1, y1 in pixels
    regions: np.ndarray | None  # [t, 3, 4] mouth, right-eye, left-eye boxes in pixels (None: older dataset)
    frame_indices: np.ndarray  # [t] index in the source video
    file_paths: list[str]
    intrinsics: np.ndarray  # [4]
    image_size: tuple[int, int]  # (width, height)
    expression_names: list[str]
    head_bounds: tuple[np.ndarray, np.ndarray]  # canonical cm min, max

    def __len__(self) -> int:
        return len(self.poses)

    def read_image(self, i: int) -> np.ndarray:
        return read_rgb(self.directory / self.file_paths[i])


def read_rgb(path: str | Path) -> np.ndarray:
    """RGB ``[h, w, 3] uint8`` from an image file, or a :class:`UserError`."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise UserError(f"cannot read image {path}")
    return bgr[..., ::-1].copy()


def load_split(directory: str | Path, split: str, with_images: bool = True) -> FrameSet:
    """The one loader of a prepared dataset split (frames, poses, expressions, boxes, camera)."""
    directory = Path(directory)
    meta = read_transforms(directory, split)
    frames = meta["frames"]
    w, h = meta["image_size"]
    images = None
    if with_images:
        images = np.zeros((len(frames), h, w, 3), np.uint8)
        for i, f in enumerate(frames):
            img = read_rgb(directory / f["file_path"])
            if img.shape[:2] != (h, w):
                raise UserError(f"{f['file_path']} is {img.shape[1]}x{img.shape[0]}, the dataset says {w}x{h}")
            images[i] = img
    bounds = meta.get("head_bounds") or {"min": [-12, -17, -15], "max": [12, 15, 10]}
    return FrameSet(
        directory=directory,
        images=images,
        poses=np.array([f["transform_matrix"] for f in frames], dtype=np.float64).reshape(-1, 4, 4),
        expressions=np.array([f["expression"] for f in frames], dtype=np.float32).reshape(len(frames), -1),
        bboxes=np.array([f["bbox"] for f in frames], dtype=np.float32).reshape(-1, 4),
        regions=_regions(frames, directory / f"transforms_{split}.json"),
        frame_indices=np.array([f.get("frame_index", i) for i, f in enumerate(frames)], dtype=np.int64),
        file_paths=[f["file_path"] for f in frames],
        intrinsics=np.asarray(meta["intrinsics"], dtype=np.float64),
        image_size=(int(w), int(h)),
        expression_names=list(meta["expression_names"]),
        head_bounds=(np.asarray(bounds["min"], float), np.asarray(bounds["max"], float)),
    )


def _regions(frames: list[dict], path: Path) -> np.ndarray | None:
    """``[t, 3, 4]`` region boxes (:data:`REGION_NAMES` order), or None for a dataset made before they existed."""
    if not frames or not all("regions" in f for f in frames):
        return None
    try:
        boxes = np.array([[f["regions"][k] for k in REGION_NAMES] for f in frames], dtype=np.float32)
    except (KeyError, TypeError, ValueError):
        boxes = None
    if boxes is None or boxes.shape != (len(frames), len(REGION_NAMES), 4):
        raise UserError(f"{path}: malformed frame regions; prepare the dataset again with trainer/prepare.py")
    return boxes


def load_full_frame(directory: str | Path) -> tuple[dict, np.ndarray] | None:
    """The recording's framing: ``({"crop": [x0, y0, side], "source_size": [w, h]}, plate [H, W, 3] uint8)``,
    or None for a dataset prepared before it was kept (its avatars output the square crop)."""
    info = read_transforms(directory, "train").get("full_frame")
    if not info:
        return None
    try:
        x0, y0, side = (int(v) for v in info["crop"])
        sw, sh = (int(v) for v in info["source_size"])
        name = str(info.get("plate", PLATE_FILE))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{directory}: malformed 'full_frame' in its transforms; prepare it again") from None
    if side <= 0 or sw <= 0 or sh <= 0 or Path(name).name != name:
        raise UserError(f"{directory}: malformed 'full_frame' in its transforms; prepare it again")
    plate = read_rgb(Path(directory) / name)
    return {"crop": [x0, y0, side], "source_size": [sw, sh]}, plate


def load_background(directory: str | Path) -> np.ndarray:
    path = Path(directory) / "background.png"
    if not path.is_file():
        raise UserError(f"{directory} lacks background.png: is it a dataset made by trainer/prepare.py?")
    return read_rgb(path)
