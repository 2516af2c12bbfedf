"""Render engines: one interface, (expression, head pose, latent code, output size) → RGB frame + alpha.

The torch engine runs the bundle's fast field directly; the ONNX Runtime engine (CPU, or its CUDA / TensorRT
execution providers) and the TensorRT engine run the graphs that ``export/build.py`` wrote into the bundle.
All of them share everything else — rays, the cached occupancy grid, packed culled marching, compositing on
the background — so they produce the same pictures (the parity tests hold them to it).

Only the field's work is an exported graph: ``blend.onnx`` (once per frame: expression, latent code →
blended tri-planes, latent bias) and ``model.onnx`` (per sample: frame state, points, directions → colour,
density, with a dynamic number of samples). Culling and packing are data-dependent and stay outside the
graphs, which keeps them static.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from avatar import rays as ray_utils
from avatar.bundle import LoadedAvatar
from avatar.errors import UserError
from avatar.fileio import read_json
from avatar.occupancy import OccupancyGrid, march_culled

ONNX_MODEL, ONNX_BLEND, OCCUPANCY_CACHE, ENGINES_FILE = "model.onnx", "blend.onnx", "occupancy.safetensors", "engines.json"
TRT_MODEL = "model.plan"
ENGINE_NAMES = ("torch", "onnxruntime", "tensorrt")


def save_occupancy_cache(path: str | Path, grid: OccupancyGrid, step: float) -> None:
    """The grid the engines cull with (fine mask, its coarse level, the box, the marching step), atomically."""
    from safetensors.torch import save

    from avatar.fileio import write_bytes_atomic

    tensors = {"mask": grid.mask.to(torch.uint8).contiguous(), "coarse": grid.coarse_mask().to(torch.uint8).contiguous(),
               "box_min": grid.box_min.float().contiguous(), "box_max": grid.box_max.float().contiguous()}
    write_bytes_atomic(path, save(tensors, metadata={"step": repr(float(step)), "coarse_factor": str(grid.coarse_factor)}))


def load_occupancy_cache(path: str | Path) -> tuple[OccupancyGrid, float]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
        grid = OccupancyGrid(t["box_min"], t["box_max"], resolution=int(t["mask"].shape[0]))
        grid.mask = t["mask"].bool()
        grid.coarse_factor = int(meta.get("coarse_factor", 4))
        return grid, float(meta["step"])
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise UserError(f"{path} is not a readable occupancy cache ({exc}); rebuild it with export/build.py") from None


class RenderEngine:
    """Shared frame logic; subclasses provide :meth:`frame_state` and :meth:`decode` (the field's work)."""

    name = "base"
    device = torch.device("cpu")

    def __init__(self, loaded: LoadedAvatar, grid: OccupancyGrid | None = None, step: float | None = None):
        if loaded.model.field_name != "fast":
            raise UserError("live render engines need a fast-field avatar (trainer/fit.py --field fast)")
        self.loaded = loaded
        self.grid = grid if grid is not None else loaded.model.occupancy
        self.step = float(step if step is not None else loaded.sampling.step)
        self.box_min, self.box_max = self.grid.box_min, self.grid.box_max
        self.blocks_per_round = loaded.sampling.blocks_per_round
        self._pixels: dict[int, Tensor] = {}
        self._backgrounds: dict[tuple, Tensor] = {}
        self.last_samples = 0

    # -- the field's work -------------------------------------------------------------------------------------
    def frame_state(self, expression: Float[Tensor, "e"], latent: Float[Tensor, "l"]):
        raise NotImplementedError

    def decode(self, state, points: Float[Tensor, "m 3"], dirs: Float[Tensor, "m 3"]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    # -- everything else, shared -------------------------------------------------------------------------------
    def background(self, size: int, image: Tensor | None = None) -> Float[Tensor, "n 3"]:
        key = (size, id(image))
        if key not in self._backgrounds:
            src = self.loaded.background if image is None else image
            bg = torch.nn.functional.interpolate(src.permute(2, 0, 1)[None].float(), size=(size, size), mode="bilinear",
                                                 align_corners=False, antialias=True)[0].permute(1, 2, 0)
            self._backgrounds = {key: bg.reshape(-1, 3).contiguous()}  # one cached size: sizes change rarely
        return self._backgrounds[key]

    @torch.inference_mode()
    def render(self, expression: np.ndarray | Tensor, head_pose: np.ndarray | Tensor, latent: np.ndarray | Tensor,
               size: int, background: Tensor | None = None) -> dict[str, Tensor]:
        """One frame: ``rgb [size, size, 3]`` and ``alpha [size, size]``, floats in [0, 1], on the CPU."""
        dev = self.device
        as_t = lambda a: torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a, dtype=torch.float32, device=dev)
        expression, head_pose, latent = as_t(expression), as_t(head_pose), as_t(latent)
        w, h = self.loaded.image_size
        k = torch.as_tensor(self.loaded.intrinsics * (size / h), dtype=torch.float32, device=dev)
        if size not in self._pixels:
            self._pixels = {size: ray_utils.pixel_grid(size, size, dev)}
        rays = ray_utils.frame_rays(self._pixels[size], k, head_pose, self.box_min, self.box_max)
        state = self.frame_state(expression, latent)
        out = march_culled(lambda p, d: self.decode(state, p, d), self.grid, rays["origins"], rays["dirs"],
                           rays["near"], rays["far"], self.background(size, background).to(dev), self.step,
                           blocks_per_round=self.blocks_per_round)
        self.last_samples = out["samples"]
        return {"rgb": out["rgb"].reshape(size, size, 3).clamp(0, 1).cpu(),
                "alpha": out["alpha"].reshape(size, size).cpu()}


class TorchEngine(RenderEngine):
    name = "torch"

    def frame_state(self, expression, latent):
        field = self.loaded.model.field
        condition = torch.cat([expression, latent])
        return field.blend(condition), field.latent_bias(condition)

    def decode(self, state, points, dirs):
        return self.loaded.model.field.decode(state[0], state[1], points, dirs)


def onnx_providers(kind: str = "cpu") -> list[str]:
    """Execution providers to ask ONNX Runtime for: ``cpu``, or ``gpu`` (TensorRT, CUDA, then CPU, as installed)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = ["CPUExecutionProvider"] if kind == "cpu" else \
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in wanted if p in available]


class OnnxEngine(RenderEngine):
    """ONNX Runtime on the bundle's exported graphs (CPU by default; CUDA / TensorRT providers on request)."""

    name = "onnxruntime"

    def __init__(self, loaded: LoadedAvatar, directory: str | Path, providers: list[str] | None = None,
                 threads: int = 0):
        import onnxruntime as ort

        directory = Path(directory)
        for f in (ONNX_MODEL, ONNX_BLEND, OCCUPANCY_CACHE):
            if not (directory / f).is_file():
                raise UserError(f"{directory} has no {f}; export it first: python export/build.py {directory}")
        grid, step = load_occupancy_cache(directory / OCCUPANCY_CACHE)
        super().__init__(loaded, grid, step)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.log_severity_level = 3
        providers = providers or onnx_providers("cpu")
        try:
            self.model = ort.InferenceSession(str(directory / ONNX_MODEL), opts, providers=providers)
            self.blend = ort.InferenceSession(str(directory / ONNX_BLEND), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt/mismatched graphs
            raise UserError(f"{directory / ONNX_MODEL}: ONNX Runtime cannot load it ({exc}); re-export it") from None
        self.providers = self.model.get_providers()

    def frame_state(self, expression, latent):
        planes, bias = self.blend.run(None, {"expression": expression.numpy(), "latent": latent.numpy()})
        return planes, bias

    def decode(self, state, points, dirs):
        rgb, sigma = self.model.run(None, {"planes": state[0], "latent_bias": state[1],
                                           "points": points.contiguous().numpy(), "dirs": dirs.contiguous().numpy()})
        return torch.from_numpy(rgb), torch.from_numpy(sigma)


def tensorrt_unavailable_reason() -> str | None:
    """None when a TensorRT engine can be built and run here, else one line saying why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return ("the TensorRT engine needs an NVIDIA GPU with CUDA and `pip install -r requirements-gpu.txt` "
                "(tensorrt is not installed here)")
    if not torch.cuda.is_available():
        return "the TensorRT engine needs an NVIDIA GPU with CUDA; none is visible here"
    return None


class TensorRTEngine(RenderEngine):
    """TensorRT on the serialized engine ``model.plan`` built from ``model.onnx`` (see export/build.py)."""

    name = "tensorrt"

    def __init__(self, loaded: LoadedAvatar, directory: str | Path):
        reason = tensorrt_unavailable_reason()
        if reason:
            raise UserError(reason)
        import tensorrt as trt

        directory = Path(directory)
        if not (directory / TRT_MODEL).is_file():
            raise UserError(f"{directory} has no {TRT_MODEL}; build it: python export/build.py {directory} --engine tensorrt")
        grid, step = load_occupancy_cache(directory / OCCUPANCY_CACHE)
        super().__init__(loaded, grid, step)
        self.device = torch.device("cuda")
        self.grid = self.grid.to(self.device)
        self.box_min, self.box_max = self.grid.box_min, self.grid.box_max
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine((directory / TRT_MODEL).read_bytes())
        self.context = self.engine.create_execution_context()
        self.loaded.model.to(self.device)

    def frame_state(self, expression, latent):
        # The frame state (the blend) is one einsum; torch on the GPU does it as fast as anything.
        planes, bias = TorchEngine.frame_state(self, expression, latent)
        return self.loaded.model.field.channels_last(planes).contiguous(), bias

    def decode(self, state, points, dirs):
        n = points.shape[0]
        inputs = {"planes": state[0].contiguous(), "latent_bias": state[1].contiguous(),
                  "points": points.to(self.device).contiguous(), "dirs": dirs.to(self.device).contiguous()}
        rgb = torch.empty(n, 3, device=self.device)
        sigma = torch.empty(n, device=self.device)
        for name, t in inputs.items():
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        self.context.set_tensor_address("rgb", rgb.data_ptr())
        self.context.set_tensor_address("sigma", sigma.data_ptr())
        self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        return rgb, sigma


def engines_record(directory: str | Path) -> dict:
    path = Path(directory) / ENGINES_FILE
    return read_json(path) if path.is_file() else {}


def open_engine(loaded: LoadedAvatar, directory: str | Path, name: str = "auto") -> RenderEngine:
    """The engine called ``name``; ``auto`` takes the fastest one measured by export/build.py that works here
    (torch when nothing was exported)."""
    if name == "auto":
        record = engines_record(directory)
        ranked = sorted(record.get("fps", {}).items(), key=lambda kv: -kv[1])
        for candidate, _ in ranked:
            try:
                return open_engine(loaded, directory, candidate)
            except UserError:
                continue
        return TorchEngine(loaded)
    if name == "torch":
        return TorchEngine(loaded)
    if name == "onnxruntime":
        return OnnxEngine(loaded, directory)
    if name == "tensorrt":
        return TensorRTEngine(loaded, directory)
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
