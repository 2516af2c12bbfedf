"""The live loop's core, ``step(frame) -> frame``: track → filter → retarget → render → compose.

Threads and sinks live around it (see :mod:`streamer.app`); this module has no I/O of its own.

Composition: the head crop is rendered over black (premultiplied colour + alpha), scaled to where the crop sits
in the output frame (:class:`FrameLayout`) and laid over the base picture with a feathered edge
(:class:`Compositor`). The base is the recording's full-frame plate for a bundle that has one (a camera-shaped
picture, as a webcam sends), the bundle's square plate for an older one, or ``--backdrop IMAGE`` / ``blur``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from avatar.base.errors import UserError
from avatar.bundle.bundle import LoadedAvatar
from avatar.capture.retarget import clamp_pose, relative_expression, relative_pose
from avatar.capture.tracking import FaceObservation
from avatar.engines.base import BLACK, RenderEngine  # (BLACK: imported from here by the live bench too)
from streamer.filters import OneEuroFilter, PoseFilter, pose_to_vector, vector_to_pose


@dataclass
class Controls:
    """What a viewer can change while running (web page, window hotkeys). Thread-safe enough: plain fields."""

    recalibrate: bool = False
    pose_lock: bool = False
    gain: float = 1.0
    quit: bool = False


@dataclass
class RetargetConfig:
    mode: str = "relative"  # relative: source changes from its neutral drive the target's neutral; absolute: as is
    calibration_frames: int = 8  # tracked frames averaged into the source's neutral
    hold_seconds: float = 0.5  # no face: keep the last state this long …
    ease_seconds: float = 1.0  # … then ease back to the target's neutral over this long
    components: int = 0  # >0: project expressions onto this many principal components of the training expressions
    filter_min_cutoff: float = 1.5  # One Euro filter (Hz) for the blendshapes
    filter_beta: float = 0.5
    pose_min_cutoff: float = 0.8  # … and for the head pose
    smoothing: float = 1.0  # divides both cutoffs: 2 = steadier but slower to follow, 0 = no filtering at all


class Retargeter:
    """Source observations → the target's (expression, head pose), with calibration, clamping, hold and ease."""

    def __init__(self, meta: dict, cfg: RetargetConfig, controls: Controls):
        stats = meta["expression_stats"]
        self.cfg, self.controls = cfg, controls
        self.neutral = np.asarray(stats["neutral"], np.float32)
        self.lo, self.hi = np.asarray(stats["min"], np.float32), np.asarray(stats["max"], np.float32)
        self.reference = np.asarray(meta["reference_head_pose"], np.float64)
        self.limits = meta.get("pose_range")
        self.basis = None
        if cfg.components > 0:
            if "expression_components" not in meta:
                raise UserError("--components: this avatar bundle has no expression components (made before they "
                                "were stored); retrain it or leave --components out")
            self.basis = np.asarray(meta["expression_components"], np.float32)[: cfg.components]
        scale = math.inf if cfg.smoothing <= 0 else 1.0 / cfg.smoothing  # an infinite cutoff passes the signal as is
        self.expr_filter = OneEuroFilter(cfg.filter_min_cutoff * scale, cfg.filter_beta)
        self.pose_filter = PoseFilter(cfg.pose_min_cutoff * scale)
        self._calib_expr: list[np.ndarray] = []
        self._calib_pose: list[np.ndarray] = []
        self.source_neutral: np.ndarray | None = None
        self.source_neutral_pose: np.ndarray | None = None
        self.last = (self.neutral.copy(), self.reference.copy())
        self.last_seen: float | None = None
        self.state = "waiting for a face"

    def recalibrate(self) -> None:
        self._calib_expr, self._calib_pose = [], []
        self.source_neutral = self.source_neutral_pose = None

    def __call__(self, obs: FaceObservation | None, t: float) -> tuple[np.ndarray, np.ndarray]:
        if self.controls.recalibrate:
            self.controls.recalibrate = False
            self.recalibrate()
        if obs is None:
            return self._no_face(t)
        self.last_seen = t
        expr = self.expr_filter(obs.blendshapes, t).astype(np.float32)
        pose = self.pose_filter(obs.head_pose, t)
        if self.cfg.mode == "relative" and self.source_neutral is None:
            self._calib_expr.append(expr)
            self._calib_pose.append(pose_to_vector(pose))
            if len(self._calib_expr) < self.cfg.calibration_frames:
                self.state = f"calibrating {len(self._calib_expr)}/{self.cfg.calibration_frames} (keep a neutral face)"
                return self.last
            self.source_neutral = np.mean(self._calib_expr, 0)
            self.source_neutral_pose = vector_to_pose(np.mean(self._calib_pose, 0))
        if self.cfg.mode == "relative":
            target_expr = relative_expression(expr, self.source_neutral, self.neutral, self.lo, self.hi,
                                              self.controls.gain)
            target_pose = relative_pose(pose, self.source_neutral_pose, self.reference)
        else:  # absolute: the source's own blendshapes; its head rotation (facing the camera = reference)
            target_expr = np.clip(expr * self.controls.gain, self.lo, self.hi).astype(np.float32)
            target_pose = self.reference.copy()
            target_pose[:3, :3] = pose[:3, :3] @ self.reference[:3, :3]
        if self.basis is not None:  # stay in the span of what the avatar was trained on
            centred = target_expr - self.neutral
            target_expr = np.clip(self.neutral + (centred @ self.basis.T) @ self.basis, self.lo, self.hi)
        if self.controls.pose_lock:
            target_pose = self.reference.copy()
        target_pose = clamp_pose(target_pose, self.reference, self.limits)
        self.state = "tracking" + (" (pose locked)" if self.controls.pose_lock else "")
        self.last = (target_expr.astype(np.float32), target_pose)
        return self.last

    def _no_face(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        if self.last_seen is None:
            self.state = "waiting for a face"
            return self.last
        gone = t - self.last_seen
        if gone <= self.cfg.hold_seconds:
            self.state = "no face: holding"
            return self.last
        s = min(1.0, (gone - self.cfg.hold_seconds) / max(self.cfg.ease_seconds, 1e-6))
        expr = self.last[0] + s * (self.neutral - self.last[0])
        pose = vector_to_pose(pose_to_vector(self.last[1]) * (1 - s) + pose_to_vector(self.reference) * s)
        self.state = "no face: easing to neutral" if s < 1 else "no face: neutral"
        if s >= 1:  # the filters restart from the next face instead of gliding from a stale state
            self.expr_filter.reset()
            self.pose_filter.reset()
        return expr.astype(np.float32), pose


class RenderSizeController:
    """Adapts the head render to hold a frame-rate target (the output size stays fixed; frames are scaled to it).

    With a learned upsampler (``factor`` > 0) the head is shown at its full size as long as possible: when the
    native render at the largest size misses the budget, the controller switches to rendering at 1/factor and
    upsampling (the same output size) before it shrinks anything; it tries native again after ``retry`` frames
    when the upsampled frames leave room. Without one, it shrinks and grows the render size in ``step`` pixels.
    """

    def __init__(self, size: int, fps: float, minimum: int = 64, step: int = 16, factor: int = 0, retry: int = 150):
        self.size, self.max, self.min, self.step_px = size, size, min(minimum, size), step
        self.budget = 1.0 / fps if fps > 0 else 0.0
        self.factor, self.retry = factor, retry
        self.upsampled = False
        self._avg: float | None = None
        self._since_switch = 0

    def update(self, seconds: float) -> int:
        if self.budget <= 0:
            return self.size
        self._since_switch += 1
        self._avg = seconds if self._avg is None else 0.8 * self._avg + 0.2 * seconds
        if self._avg > self.budget * 1.05:
            if self.factor and not self.upsampled:
                self.upsampled, self._since_switch = True, 0  # the same size, rendered at 1/factor
            elif self.size > self.min:
                self.size = max(self.min, self.size - self.step_px)
            self._avg = None
        else:
            grown = min(self.max, self.size + self.step_px)
            # a frame's cost grows with the pixels: grow when the larger size should still leave 15 % of the budget
            if self.size < self.max and self._avg * (grown / self.size) ** 2 < self.budget * 0.85:
                self.size = grown
                self._avg = None
            elif (self.size == self.max and self.upsampled and self._since_switch >= self.retry
                  and self._avg < self.budget * 0.6):  # native costs several times more: only with much room
                self.upsampled, self._since_switch = False, 0
                self._avg = None
        return self.size


MAX_OUTPUT = (1280, 720)  # the default output fits in this (a video call's largest common size)
FEATHER_FRACTION = 0.06  # of the head box's side: the blend ramp where the crop meets the plate


def _even(v: float) -> int:
    return max(2, int(round(v / 2)) * 2)


def default_output(source_size: tuple[int, int], limit: tuple[int, int] = MAX_OUTPUT) -> tuple[int, int]:
    """The recording's own size, scaled down (never up) to fit in ``limit``; even sides (video codecs need them)."""
    sw, sh = source_size
    s = min(1.0, limit[0] / sw, limit[1] / sh)
    return _even(sw * s), _even(sh * s)


@dataclass(frozen=True)
class FrameLayout:
    """Where the head crop lands in the output frame. Recording pixels map to output pixels as
    ``p * scale - offset`` (the recording scaled to cover the output, centred: a 4:3 recording in a 16:9
    output loses some of its top and bottom, never gets bars)."""

    width: int
    height: int
    source_size: tuple[int, int]
    scale: float
    offset: tuple[float, float]
    box: tuple[float, float, float]  # head crop x0, y0, side in output pixels (may reach past the edges)

    @property
    def head_side(self) -> int:
        """The head crop's side in output pixels: rendering bigger than this is wasted."""
        return int(round(self.box[2]))


def frame_layout(full_frame: dict | None, output: tuple[int, int] | None, square: int) -> FrameLayout:
    """The layout for a bundle's ``full_frame`` (None: a square-crop bundle, whose crop is the whole recording)
    at ``output`` (None: :func:`default_output` of the recording, or ``square``² without a full frame)."""
    if full_frame is None:
        crop, source = (0, 0, 1), (1, 1)
        output = output or (square, square)
    else:
        crop, source = full_frame["crop"], tuple(full_frame["source_size"])
        output = output or default_output(source)
    w, h = output
    scale = max(w / source[0], h / source[1])
    offset = ((source[0] * scale - w) / 2, (source[1] * scale - h) / 2)
    box = (crop[0] * scale - offset[0], crop[1] * scale - offset[1], crop[2] * scale)
    return FrameLayout(w, h, (int(source[0]), int(source[1])), scale, offset, box)


def cover(image: np.ndarray, layout: FrameLayout) -> np.ndarray:
    """``[h, w, 3] uint8`` picture of the recording's framing (any resolution) → ``[H, W, 3]`` as the layout
    places the recording in the output."""
    ih, iw = image.shape[:2]
    k = layout.scale * layout.source_size[0] / iw  # image pixels → output pixels
    big = (max(layout.width, int(np.ceil(iw * k))), max(layout.height, int(np.ceil(ih * k))))
    resized = cv2.resize(image, big, interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR)
    x, y = int(round(layout.offset[0] * big[0] / (iw * k))), int(round(layout.offset[1] * big[1] / (ih * k)))
    x, y = min(max(x, 0), big[0] - layout.width), min(max(y, 0), big[1] - layout.height)
    return np.ascontiguousarray(resized[y:y + layout.height, x:x + layout.width])


def feather_mask(side: int, width: int, edges: tuple[bool, bool, bool, bool]) -> np.ndarray:
    """``[side, side] float32``: 1 inside, easing to 0 over ``width`` px at each of the (left, top, right,
    bottom) ``edges`` that is True (edges on the frame's border stay hard: nothing beyond them to blend with)."""
    ramp = np.ones(side, np.float32)
    if width > 0:
        x = (np.arange(side, dtype=np.float32) + 0.5) / width
        ramp = np.clip(x, 0, 1) ** 2 * (3 - 2 * np.clip(x, 0, 1))  # smoothstep
    one = np.ones(side, np.float32)
    left, top, right, bottom = edges
    cols = (ramp if left else one) * (ramp[::-1] if right else one)
    rows = (ramp if top else one) * (ramp[::-1] if bottom else one)
    return rows[:, None] * cols[None, :]


class Compositor:
    """Premultiplied head render ``[s, s, 3]`` + alpha ``[s, s]`` → the output frame ``[H, W, 3] uint8``:
    the render is scaled to the head box, feathered at the box's inner edges and laid over ``base``."""

    def __init__(self, layout: FrameLayout, base: np.ndarray):
        if base.shape[:2] != (layout.height, layout.width):
            raise ValueError(f"base {base.shape} does not match the layout {layout.width}x{layout.height}")
        self.layout, self.base = layout, np.ascontiguousarray(base, dtype=np.uint8)
        x0, y0, side = layout.box
        self.x0, self.y0, self.side = int(round(x0)), int(round(y0)), max(1, int(round(side)))
        # the visible part of the box: output rows/cols [vy0, vy1) × [vx0, vx1), box-local from (bx, by)
        self.vx0, self.vy0 = max(self.x0, 0), max(self.y0, 0)
        self.vx1, self.vy1 = min(self.x0 + self.side, layout.width), min(self.y0 + self.side, layout.height)
        self.bx, self.by = self.vx0 - self.x0, self.vy0 - self.y0
        edges = (self.x0 > 0, self.y0 > 0, self.x0 + self.side < layout.width, self.y0 + self.side < layout.height)
        self.feather = feather_mask(self.side, int(round(FEATHER_FRACTION * self.side)), edges)
        self._visible = (slice(self.by, self.by + self.vy1 - self.vy0), slice(self.bx, self.bx + self.vx1 - self.vx0))
        self._feather_visible = self.feather[self._visible][..., None]  # [vh, vw, 1], once, not per frame

    def __call__(self, rgb: torch.Tensor, alpha: torch.Tensor) -> np.ndarray:
        rgba = torch.cat([rgb.clamp(0, 1), alpha.clamp(0, 1)[..., None]], -1).float().cpu().numpy()
        if rgba.shape[0] != self.side:
            rgba = cv2.resize(rgba, (self.side, self.side), interpolation=cv2.INTER_LINEAR)
        frame = self.base.copy()
        if self.vx1 <= self.vx0 or self.vy1 <= self.vy0:
            return frame
        visible = rgba[self._visible]
        a = visible[..., 3:] * self._feather_visible
        color = visible[..., :3] * self._feather_visible
        region = frame[self.vy0:self.vy1, self.vx0:self.vx1].astype(np.float32)
        frame[self.vy0:self.vy1, self.vx0:self.vx1] = np.clip(color * 255 + (1 - a) * region + 0.5, 0, 255
                                                              ).astype(np.uint8)
        return frame


def make_compositor(loaded: LoadedAvatar, output: tuple[int, int] | None, size: int,
                    background: np.ndarray | str | None = None) -> Compositor:
    """The live loop's compositor for ``loaded``: its full-frame plate (or square plate) as the base, or
    ``background``: an image ``[h, w, 3] uint8`` (covering the output), or ``"blur"`` (the plate, blurred)."""
    layout = frame_layout(loaded.full_frame, output, size)
    plate = loaded.plate if loaded.full_frame is not None else (
        loaded.background.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    if isinstance(background, np.ndarray):
        # the image covers the output in its own framing, not the recording's
        own = frame_layout({"crop": [0, 0, 1], "source_size": [background.shape[1], background.shape[0]]},
                           (layout.width, layout.height), size)
        base = cover(background, own)
    else:
        base = cover(plate, layout)
        if background == "blur":
            base = cv2.GaussianBlur(base, (0, 0), max(2.0, 0.015 * max(layout.width, layout.height)))
    return Compositor(layout, base)


@dataclass
class LiveFrame:
    rgb: np.ndarray  # [H, W, 3] uint8: the output frame
    captured: float
    expression: np.ndarray
    head_pose: np.ndarray
    render_size: int
    state: str
    timings: dict = field(default_factory=dict)  # seconds per stage
    upsampled: bool = False  # rendered at 1/factor of render_size and brought to it by the learned upsampler




def render_cap(size: int, layout: FrameLayout) -> int:
    """The head render's largest side: ``size``, but no bigger than the head box in the output (even, ≥ 32)."""
    return max(32, min(size, _even(layout.head_side)))


class LivePipeline:
    """``step(rgb, captured) -> LiveFrame``. Owns the tracker, the retargeter and the render engine."""

    def __init__(self, loaded: LoadedAvatar, engine: RenderEngine, tracker, size: int, fps: float,
                 retarget: RetargetConfig, controls: Controls, compositor: Compositor | None = None,
                 latent_index: int = 0):
        """``size``: the largest head render (pixels a side); never more than the head box in the output."""
        self.loaded, self.engine, self.tracker = loaded, engine, tracker
        self.compositor = compositor or make_compositor(loaded, None, size)
        self.size, self.controls = render_cap(size, self.compositor.layout), controls
        self.retargeter = Retargeter(loaded.meta, retarget, controls)
        upsampler = getattr(loaded, "upsampler", None)
        self.sizer = RenderSizeController(self.size, fps, factor=upsampler.factor if upsampler is not None else 0)
        self.latent = loaded.latent(latent_index)

    def step(self, rgb: np.ndarray, captured: float, tracked: tuple[FaceObservation | None, float] | None = None
             ) -> LiveFrame:
        """One frame. ``tracked``: (observation, seconds) when the frame was tracked already (on another thread,
        :class:`avatar.sources.TrackingStage`); then this frame's time budget is the render's alone."""
        t0 = time.monotonic()
        if tracked is None:
            obs = self.tracker.track(rgb, int(captured * 1000)) if rgb is not None else None
            track_seconds = time.monotonic() - t0
        else:
            obs, track_seconds = tracked
        t1 = time.monotonic()
        expr, pose = self.retargeter(obs, captured)
        t2 = time.monotonic()
        render_size, upsampled = self.sizer.size, self.sizer.upsampled
        render = self.engine.render_upsampled if upsampled else self.engine.render
        out = render(expr, pose, self.latent, render_size, BLACK)  # premultiplied: over black
        frame = self.compositor(out["rgb"], out["alpha"])
        t3 = time.monotonic()
        # overlapped: the frame rate is the slower stage's; in sequence: both together
        self.sizer.update(max(t3 - t1, track_seconds) if tracked is not None else t3 - t0)
        return LiveFrame(frame, captured, expr, pose, render_size, self.retargeter.state,
                         {"track": track_seconds, "retarget": t2 - t1, "render": t3 - t2}, upsampled)
