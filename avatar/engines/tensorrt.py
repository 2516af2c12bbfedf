"""The TensorRT engine: the per-sample decoder as a TensorRT plan (built by ``export/build.py --build tensorrt``
where an NVIDIA GPU and the tensorrt package are present); the frame state comes from the field itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from avatar.base.devices import GPU_CHUNK
from avatar.base.errors import UserError
from avatar.bundle.bundle import LoadedAvatar
from avatar.bundle.files import OCCUPANCY_CACHE, TRT_MODEL, load_occupancy_cache, read_exported
from avatar.engines.base import RenderEngine


def tensorrt_unavailable_reason() -> str | None:
    """None when a TensorRT engine can be built and run here, else one line saying why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return ("the TensorRT engine needs an NVIDIA GPU with CUDA and `pip install -r requirements-gpu.txt` "
                "(tensorrt is not installed here)")
    except Exception as exc:  # a broken install (missing CUDA libraries, wrong driver) fails with other errors
        return f"tensorrt is installed but does not import ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        return "the TensorRT engine needs an NVIDIA GPU with CUDA; none is visible here"
    return None


# The sample-count range of model.plan's optimisation profile: chunks of the GPU chunk size are the common case.
TRT_MAX_SAMPLES = 1 << 21


def sample_profile(max_samples: int = TRT_MAX_SAMPLES) -> tuple[int, int, int]:
    """(min, opt, max) sample counts TensorRT optimises for; ``opt`` is the size the marcher sends most."""
    if max_samples < 1:
        raise ValueError("max_samples must be positive")
    return 1, min(GPU_CHUNK, max_samples), max_samples


class TensorRTEngine(RenderEngine):
    """TensorRT (10.x Python API) on the serialized engine ``model.plan`` built from ``model.onnx`` (see
    export/build.py). The per-frame blend runs in torch on the engine's own CUDA copy of the model."""

    name = "tensorrt"

    def __init__(self, loaded: LoadedAvatar, directory: str | Path, device: str | torch.device = "cuda"):
        reason = tensorrt_unavailable_reason()
        if reason:
            raise UserError(reason)
        import tensorrt as trt

        device = torch.device(device)
        if device.type != "cuda":
            raise UserError(f"the TensorRT engine runs on a CUDA device, not {device}")
        directory = Path(directory)
        plan = read_exported(directory, TRT_MODEL, "tensorrt")
        grid, step = load_occupancy_cache(directory / OCCUPANCY_CACHE)
        super().__init__(loaded, grid, step, device)
        self.chunk = min(self.chunk, TRT_MAX_SAMPLES)
        with torch.cuda.device(self.device):
            self.runtime, self.engine, self.context = load_plan(trt, plan, directory)

    def frame_state(self, expression, latent):
        # The frame state (the blend) is one einsum; torch on the GPU does it as fast as anything.
        planes, bias = self.model.field.frame_state(expression, latent, channels_last=True)
        return planes.contiguous(), bias.contiguous()

    def decode(self, state, points, dirs):
        n = points.shape[0]
        field = self.model.field
        inputs = {"planes": state[0], "latent_bias": state[1], "points": points.contiguous(),
                  **({} if field.deferred else {"dirs": dirs.contiguous()})}  # (a deferred field's samples: no dirs)
        # a deferred field's plan gives the samples' features; its per-pixel MLP runs in torch on the GPU (the base
        # engine's shade: one small matmul chain per frame, next to the samples' work)
        first, width = ("features", field.feature_width) if field.deferred else ("rgb", 3)
        outputs = {first: torch.empty(n, width, device=self.device), "sigma": torch.empty(n, device=self.device)}
        run_plan(self.context, inputs, outputs, torch.cuda.current_stream(self.device).cuda_stream)
        return outputs[first], outputs["sigma"]


def load_plan(trt, plan: bytes, directory: Path):
    """(runtime, engine, execution context) from a serialized plan, or one clear line: TensorRT returns None (and logs)
    for a plan built on another GPU or TensorRT version, or when the context's memory cannot be had."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise UserError(f"{directory / TRT_MODEL} does not load on this GPU / TensorRT {getattr(trt, '__version__', '?')} "
                        f"(built elsewhere?); rebuild it: python export/build.py {directory} --build tensorrt")
    context = engine.create_execution_context()
    if context is None:
        raise UserError("TensorRT could not create an execution context for model.plan (out of GPU memory?)")
    return runtime, engine, context  # the caller keeps the runtime: an engine must not outlive it


def run_plan(context, inputs: dict[str, Tensor], outputs: dict[str, Tensor], stream: int) -> None:
    """One enqueue with the TensorRT 10 name-based API (set_input_shape, set_tensor_address, execute_async_v3);
    each returns False on failure, which would otherwise leave the outputs uninitialised."""
    for name, t in inputs.items():
        if not context.set_input_shape(name, tuple(t.shape)):
            raise UserError(f"TensorRT rejected input {name} of shape {tuple(t.shape)} (outside model.plan's "
                            f"optimisation profile {sample_profile()}?); rebuild it with export/build.py")
    for name, t in {**inputs, **outputs}.items():
        if not context.set_tensor_address(name, t.data_ptr()):
            raise UserError(f"TensorRT has no tensor {name!r}: model.plan is not this version's graph; rebuild it")
    if not context.execute_async_v3(stream):
        n = next(iter(inputs.values())).shape[0] if inputs else 0
        raise UserError(f"TensorRT failed to run model.plan ({n} samples; see its log above)")
