"""The ONNX Runtime engine (CPU, or its CUDA / TensorRT execution providers): ``blend.onnx`` once per frame and
``model.onnx`` per sample, with culling and packing outside the graphs (shared with the other engines).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from avatar.base.errors import UserError
from avatar.bundle.bundle import LoadedAvatar
from avatar.bundle.files import (
    OCCUPANCY_CACHE,
    ONNX_BLEND,
    ONNX_MODEL,
    ONNX_SHADE,
    exported_files,
    load_occupancy_cache,
)
from avatar.engines.base import RenderEngine


def onnx_providers(kind: str = "cpu", available: list[str] | None = None) -> list[str]:
    """Execution providers to ask ONNX Runtime for: ``cpu``, or ``gpu`` (TensorRT, CUDA, then CPU, as installed)."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    wanted = ["CPUExecutionProvider"] if kind == "cpu" else \
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in wanted if p in available]


def _ort_session(ort, path: Path, opts, providers: list[str]):
    """A session with ``providers``; when the TensorRT provider is listed but its libraries are missing (it
    ships with onnxruntime-gpu, TensorRT itself does not), try again without it rather than fail."""
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception:
        if "TensorrtExecutionProvider" not in providers:
            raise
        return ort.InferenceSession(str(path), opts, providers=[p for p in providers if p != "TensorrtExecutionProvider"])


def run_bound(session, inputs: dict[str, Tensor], outputs: dict[str, Tensor]) -> None:
    """Run an ONNX Runtime session on torch tensors in place (IO binding): inputs are read and outputs written
    where they live (CPU or CUDA memory), so CUDA samples never round-trip through the host. float32 only."""
    binding = session.io_binding()
    keep = []  # contiguous copies must outlive the run
    for name, t in inputs.items():
        t = t.contiguous().float()
        keep.append(t)
        binding.bind_input(name, t.device.type, t.device.index or 0, np.float32, tuple(t.shape), t.data_ptr())
    for name, t in outputs.items():
        if not t.is_contiguous() or t.dtype != torch.float32:
            raise ValueError(f"output {name} must be a contiguous float32 tensor")
        binding.bind_output(name, t.device.type, t.device.index or 0, np.float32, tuple(t.shape), t.data_ptr())
    if any(t.is_cuda for t in keep):
        torch.cuda.current_stream(keep[0].device).synchronize()  # ORT reads on its own stream
    session.run_with_iobinding(binding)


class OnnxEngine(RenderEngine):
    """ONNX Runtime on the bundle's exported graphs: CPU, or its TensorRT / CUDA providers when ``device`` is a
    CUDA device and onnxruntime-gpu is installed (then samples stay on the GPU, bound in place). Without a GPU
    provider the engine runs on the CPU whatever ``device`` says; :attr:`providers` tells which it got."""

    name = "onnxruntime"

    def __init__(self, loaded: LoadedAvatar, directory: str | Path, providers: list[str] | None = None,
                 threads: int = 0, device: str | torch.device = "cpu"):
        import onnxruntime as ort

        deferred = loaded.model.field.deferred
        model_path, blend_path, cache, *shade_path = exported_files(
            directory, (ONNX_MODEL, ONNX_BLEND, OCCUPANCY_CACHE, *([ONNX_SHADE] if deferred else [])))
        grid, step = load_occupancy_cache(cache)
        device = torch.device(device)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.log_severity_level = 3
        # no busy-waiting between runs: ORT's spinning threads took the CPU from whatever ran next in this process
        # (the marcher between two decoder calls; in bench/render_speed.py, the next engine: 2–3× slower)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = providers or onnx_providers("gpu" if device.type == "cuda" else "cpu")
        try:
            self.model_session = _ort_session(ort, model_path, opts, providers)
            self.blend = _ort_session(ort, blend_path, opts, providers)
            self.shade_session = _ort_session(ort, shade_path[0], opts, providers) if deferred else None
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt/mismatched graphs
            raise UserError(f"{model_path}: ONNX Runtime cannot load it ({exc}); re-export it") from None
        self.providers = self.model_session.get_providers()
        on_gpu = device.type == "cuda" and any(p in self.providers for p in ("CUDAExecutionProvider",
                                                                             "TensorrtExecutionProvider"))
        super().__init__(loaded, grid, step, device if on_gpu else "cpu")

    def frame_state(self, expression, latent):
        planes, bias = self.blend.run(None, {"expression": expression.cpu().numpy(), "latent": latent.cpu().numpy()})
        if self.device.type == "cuda":
            return torch.from_numpy(planes).to(self.device), torch.from_numpy(bias).to(self.device)
        return planes, bias

    def decode(self, state, points, dirs):
        field = self.model.field
        # a deferred field's samples do not see the view direction (its graph has no dirs input): its pixels do
        inputs = {"planes": state[0], "latent_bias": state[1], "points": points,
                  **({} if field.deferred else {"dirs": dirs})}
        if self.device.type == "cuda":
            first, width = ("features", field.feature_width) if field.deferred else ("rgb", 3)
            rgb = torch.empty(points.shape[0], width, device=self.device)
            sigma = torch.empty(points.shape[0], device=self.device)
            run_bound(self.model_session, inputs, {first: rgb, "sigma": sigma})
            return rgb, sigma
        rgb, sigma = self.model_session.run(None, {k: v.contiguous().numpy() if torch.is_tensor(v) else v
                                                   for k, v in inputs.items()})
        return torch.from_numpy(rgb), torch.from_numpy(sigma)

    def shade(self, state, features, dirs):
        if self.device.type == "cuda":
            rgb = torch.empty(features.shape[0], 3, device=self.device)
            run_bound(self.shade_session, {"features": features, "dirs": dirs, "latent_bias": state[1]}, {"rgb": rgb})
            return rgb
        (rgb,) = self.shade_session.run(None, {"features": features.contiguous().numpy(),
                                               "dirs": dirs.contiguous().numpy(), "latent_bias": np.asarray(state[1])})
        return torch.from_numpy(rgb)
