"""Opening the engine a user asked for (``auto``: the fastest that ``export/build.py`` measured here, falling back
one line at a time; never an export made from other weights), and timing an engine over frames.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from avatar.base.errors import DamagedFile, UserError
from avatar.bundle.bundle import LoadedAvatar
from avatar.bundle.files import (
    ONNX_BLEND,
    ONNX_MODEL,
    ONNX_SHADE,
    TRT_MODEL,
    check_engine_files,
    current_export,
    engines_record,
    stale_export_reason,
)
from avatar.engines.base import RenderEngine, _reason, _stderr
from avatar.engines.fused import FusedEngine
from avatar.engines.onnx import OnnxEngine
from avatar.engines.tensorrt import TensorRTEngine
from avatar.engines.torch_engine import TorchEngine

ENGINE_NAMES = ("torch", "fused", "onnxruntime", "tensorrt")






def _measured(directory: str | Path, log: Callable[[str], None]) -> dict:
    """The engines record for ``auto``: ``{}`` when there is none or when it is stale (saying so via ``log``)."""
    record = engines_record(directory)
    reason = stale_export_reason(directory, record) if record else None
    if reason:
        log(f"not using the exported ONNX/TensorRT engines: they are stale ({reason}); "
            f"re-run python export/build.py {directory}")
        return {}
    return record


def open_engine(loaded: LoadedAvatar, directory: str | Path, name: str = "auto", device: str | torch.device = "cpu",
                log: Callable[[str], None] = _stderr) -> RenderEngine:
    """The engine called ``name`` on ``device``; ``auto`` takes the fastest one measured by export/build.py that
    opens here (when nothing was measured, or the export is stale: fused on a CPU, else torch), saying in one line
    via ``log`` why each faster one did not. ``onnxruntime`` and ``tensorrt`` need a current export.
    A damaged file in the bundle (:class:`DamagedFile`) is fatal whichever engine would run: falling back past
    it would hide a broken bundle."""
    device = torch.device(device)
    if name == "auto":
        ranked = sorted(_measured(directory, log).get("fps", {}).items(), key=lambda kv: -kv[1])
        if not ranked and device.type == "cpu":
            ranked = [("fused", 1.0)]  # nothing measured: on a CPU the fused engine is the fast one (README table)
        for candidate, _ in ranked:
            if candidate == "torch":
                break
            try:
                return open_engine(loaded, directory, candidate, device, log)
            except DamagedFile:
                raise
            except Exception as exc:  # any failure to open (missing library, stale plan, no GPU): fall back
                log(f"engine {candidate} unavailable here ({_reason(exc)}); trying the next")
        return open_engine(loaded, directory, "torch", device, log)
    if name == "torch":
        check_engine_files(directory)  # it culls with the model's own grid, but a damaged bundle is refused all the same
        return TorchEngine(loaded, device=device)
    if name == "fused":
        check_engine_files(directory)  # as the torch engine
        return FusedEngine(loaded, device=device)
    if name == "onnxruntime":
        current_export(directory, (ONNX_MODEL, ONNX_BLEND, *([ONNX_SHADE] if loaded.model.field.deferred else [])))
        return OnnxEngine(loaded, directory, device=device)
    if name == "tensorrt":
        current_export(directory, (TRT_MODEL,), "tensorrt")
        return TensorRTEngine(loaded, directory, device if device.type == "cuda" else "cuda")
    raise UserError(f"unknown engine {name!r}; choose from auto, {', '.join(ENGINE_NAMES)}")


def time_engine(engine: RenderEngine, frames: list[tuple[np.ndarray, np.ndarray, np.ndarray]], size: int,
                repeats: int = 1) -> float:
    """Median seconds per frame over ``frames`` of (expression, head pose, latent), after one warm-up."""
    engine.render(*frames[0], size)
    times = []
    for _ in range(repeats):
        for f in frames:
            start = time.perf_counter()
            engine.render(*f, size)
            times.append(time.perf_counter() - start)
    return float(np.median(times))
