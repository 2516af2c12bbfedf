"""The live loop's core, ``step(frame) -> frame``: track → filter → retarget → render → compose.

Threads and sinks live around it (see :mod:`streamer.app`); this module has no I/O of its own.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from avatar.bundle import LoadedAvatar
from avatar.errors import UserError
from avatar.engines import RenderEngine
from avatar.retarget import clamp_pose, relative_expression, relative_pose
from avatar.tracking import FaceObservation
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
    """Adapts the render resolution to hold a frame-rate target (output size stays fixed; frames are upscaled)."""

    def __init__(self, size: int, fps: float, minimum: int = 64, step: int = 16):
        self.size, self.max, self.min, self.step_px = size, size, min(minimum, size), step
        self.budget = 1.0 / fps if fps > 0 else 0.0
        self._avg: float | None = None

    def update(self, seconds: float) -> int:
        if self.budget <= 0:
            return self.size
        self._avg = seconds if self._avg is None else 0.8 * self._avg + 0.2 * seconds
        if self._avg > self.budget * 1.05 and self.size > self.min:
            self.size = max(self.min, self.size - self.step_px)
            self._avg = None
        elif self._avg < self.budget * 0.6 and self.size < self.max:
            self.size = min(self.max, self.size + self.step_px)
            self._avg = None
        return self.size


def compose(rgb: torch.Tensor, out_size: int) -> np.ndarray:
    """Rendered ``[s, s, 3]`` float → the output frame ``[out, out, 3]`` uint8 RGB (bilinear when sizes differ)."""
    frame = (rgb.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
    if frame.shape[0] != out_size:
        frame = cv2.resize(frame, (out_size, out_size), interpolation=cv2.INTER_LINEAR)
    return frame


@dataclass
class LiveFrame:
    rgb: np.ndarray  # [size, size, 3] uint8
    captured: float
    expression: np.ndarray
    head_pose: np.ndarray
    render_size: int
    state: str
    timings: dict = field(default_factory=dict)  # seconds per stage


class LivePipeline:
    """``step(rgb, captured) -> LiveFrame``. Owns the tracker, the retargeter and the render engine."""

    def __init__(self, loaded: LoadedAvatar, engine: RenderEngine, tracker, size: int, fps: float,
                 retarget: RetargetConfig, controls: Controls, background: torch.Tensor | None = None,
                 latent_index: int = 0):
        self.loaded, self.engine, self.tracker = loaded, engine, tracker
        self.size, self.controls = size, controls
        self.retargeter = Retargeter(loaded.meta, retarget, controls)
        self.sizer = RenderSizeController(size, fps)
        self.background = background
        self.latent = loaded.latent(latent_index)

    def step(self, rgb: np.ndarray, captured: float, tracked: tuple[FaceObservation | None, float] | None = None
             ) -> LiveFrame:
        """One frame. ``tracked``: (observation, seconds) when the frame was tracked already (on another thread,
        :class:`streamer.sources.TrackingStage`); then this frame's time budget is the render's alone."""
        t0 = time.monotonic()
        if tracked is None:
            obs = self.tracker.track(rgb, int(captured * 1000)) if rgb is not None else None
            track_seconds = time.monotonic() - t0
        else:
            obs, track_seconds = tracked
        t1 = time.monotonic()
        expr, pose = self.retargeter(obs, captured)
        t2 = time.monotonic()
        render_size = self.sizer.size
        out = self.engine.render(expr, pose, self.latent, render_size, self.background)
        frame = compose(out["rgb"], self.size)
        t3 = time.monotonic()
        # overlapped: the frame rate is the slower stage's; in sequence: both together
        self.sizer.update(max(t3 - t1, track_seconds) if tracked is not None else t3 - t0)
        return LiveFrame(frame, captured, expr, pose, render_size, self.retargeter.state,
                         {"track": track_seconds, "retarget": t2 - t1, "render": t3 - t2})
