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

import copy
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from avatar import rays as ray_utils
from avatar.bundle import LoadedAvatar
from avatar.devices import GPU_CHUNK, TORCH_GPU_CHUNK, chunk_for
from avatar.errors import DamagedFile, UserError
from avatar.fields import spherical_harmonics_deg2
from avatar.fileio import read_json
from avatar.occupancy import OccupancyGrid, block_plan, march_culled, max_blocks

ONNX_MODEL, ONNX_BLEND, OCCUPANCY_CACHE, ENGINES_FILE = "model.onnx", "blend.onnx", "occupancy.safetensors", "engines.json"
TRT_MODEL = "model.plan"
ENGINE_NAMES = ("torch", "fused", "onnxruntime", "tensorrt")


def save_occupancy_cache(path: str | Path, grid: OccupancyGrid, step: float) -> None:
    """The grid the engines cull with (fine mask, its coarse level, the box, the marching step), atomically."""
    from avatar.fileio import safetensors_bytes, write_bytes_atomic

    tensors = {"mask": grid.mask.to(torch.uint8).contiguous(), "coarse": grid.coarse_mask().to(torch.uint8).contiguous(),
               "box_min": grid.box_min.float().contiguous(), "box_max": grid.box_max.float().contiguous()}
    write_bytes_atomic(path, safetensors_bytes(tensors, metadata={"step": repr(float(step)), "coarse_factor": str(grid.coarse_factor)}))


def load_occupancy_cache(path: str | Path) -> tuple[OccupancyGrid, float]:
    from avatar.fileio import read_safetensors

    t, meta = read_safetensors(path, "the occupancy cache", "rebuild it with export/build.py")
    try:
        r = int(t["mask"].shape[0])
        if tuple(t["mask"].shape) != (r, r, r) or t["box_min"].shape != (3,) or t["box_max"].shape != (3,):
            raise ValueError("tensors of the wrong shape")
        grid = OccupancyGrid(t["box_min"], t["box_max"], resolution=r)
        grid.mask = t["mask"].bool()
        grid.coarse_factor = int(meta.get("coarse_factor", 4))
        return grid, float(meta["step"])
    except (KeyError, ValueError, RuntimeError, IndexError) as exc:
        raise DamagedFile(f"{path} is not a readable occupancy cache ({exc}); rebuild it with export/build.py") from None


def _on_device(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` itself when it already lives on ``device``, else a copy moved there: an engine never moves
    the caller's model (the exporter renders the same model with the CPU engine for parity)."""
    first = next(iter(module.buffers()), None)
    first = next(iter(module.parameters()), first)
    if first is None or first.device == device or (first.device.type == device.type and device.index is None):
        return module
    return copy.deepcopy(module).to(device)


class RenderEngine:
    """Shared frame logic; subclasses provide :meth:`frame_state` and :meth:`decode` (the field's work).

    ``device`` is where rays are marched and composited (and, for the torch engine, where the field runs).
    The engine works on its own copy of the model when the bundle was loaded on another device.
    """

    name = "base"

    def __init__(self, loaded: LoadedAvatar, grid: OccupancyGrid | None = None, step: float | None = None,
                 device: str | torch.device = "cpu"):
        if loaded.model.field_name != "fast":
            raise UserError("live render engines need a fast-field avatar (trainer/fit.py --field fast)")
        self.device = torch.device(device)
        self.loaded = loaded
        self.model = _on_device(loaded.model, self.device)
        grid = grid if grid is not None else self.model.occupancy
        self.grid = _on_device(grid, self.device)
        self.step = float(step if step is not None else loaded.sampling.step)
        self.box_min, self.box_max = self.grid.box_min, self.grid.box_max
        # A CPU marches a few blocks per round and stops rays early (fewer samples); a GPU marches everything in
        # one pass (0), since there the per-round launches and host syncs cost more than the extra samples.
        self.blocks_per_round = loaded.sampling.blocks_per_round if self.device.type == "cpu" else 0
        self.chunk = chunk_for(self.device)
        # a fixed block count on a GPU (no host sync, CUDA-graph friendly); the CPU finds the exact one per frame
        self._n_blocks = None if self.device.type == "cpu" else max_blocks(
            self.box_min, self.box_max, self.step, self.grid.block_steps(self.step))
        self._pixels: dict[int, tuple[Tensor, Tensor]] = {}
        self._backgrounds: dict[tuple, Tensor] = {}
        self.last_samples = 0

    # -- the field's work -------------------------------------------------------------------------------------
    def frame_state(self, expression: Float[Tensor, "e"], latent: Float[Tensor, "l"]):
        raise NotImplementedError

    def decode(self, state, points: Float[Tensor, "m 3"], dirs: Float[Tensor, "m 3"]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    # -- everything else, shared -------------------------------------------------------------------------------
    def front(self, size: int, expression: Float[Tensor, "e"], head_pose: Float[Tensor, "4 4"],
              latent: Float[Tensor, "l"]) -> tuple[dict, object, dict]:
        """The part of a frame whose shapes depend only on ``size``: the rays, the field's frame state and the
        block plan (:func:`avatar.occupancy.block_plan`)."""
        pixels, k = self._pixels[size]
        rays = ray_utils.frame_rays(pixels, k, head_pose, self.box_min, self.box_max)
        state = self.frame_state(expression, latent)
        plan = block_plan(self.grid, rays["origins"], rays["dirs"], rays["near"], rays["far"], self.step,
                          n_blocks=self._n_blocks)
        return rays, state, plan

    def background(self, size: int, image: Tensor | None = None) -> Float[Tensor, "n 3"]:
        key = (size, id(image))
        if key not in self._backgrounds:
            src = self.loaded.background if image is None else image
            bg = torch.nn.functional.interpolate(src.permute(2, 0, 1)[None].float().cpu(), size=(size, size),
                                                 mode="bilinear", align_corners=False, antialias=True)[0].permute(1, 2, 0)
            # one cached size (sizes change rarely), already on the marching device
            self._backgrounds = {key: bg.reshape(-1, 3).contiguous().to(self.device)}
        return self._backgrounds[key]

    def warm_up(self, size: int) -> float:
        """Render the avatar's neutral face at its reference pose once, so that one-time work (CUDA graph capture,
        compiling the decoder, lazy caches) happens before the first live frame. Returns the seconds it took."""
        start = time.perf_counter()
        meta = self.loaded.meta
        self.render(np.asarray(meta["expression_stats"]["neutral"], np.float32),
                    np.asarray(meta["reference_head_pose"], np.float32), self.loaded.latent(0), size)
        return time.perf_counter() - start

    def _inputs(self, expression, head_pose, latent, size: int) -> tuple[Tensor, Tensor, Tensor]:
        """The frame's conditioning as float32 tensors on the engine's device; caches the pixel grid of ``size``."""
        dev = self.device
        as_t = lambda a: torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a, dtype=torch.float32, device=dev)
        if size not in self._pixels:
            w, h = self.loaded.image_size
            k = torch.as_tensor(self.loaded.intrinsics * (size / h), dtype=torch.float32, device=dev)
            self._pixels = {size: (ray_utils.pixel_grid(size, size, dev), k)}
        return as_t(expression), as_t(head_pose), as_t(latent)

    @torch.inference_mode()
    def render(self, expression: np.ndarray | Tensor, head_pose: np.ndarray | Tensor, latent: np.ndarray | Tensor,
               size: int, background: Tensor | None = None) -> dict[str, Tensor]:
        """One frame: ``rgb [size, size, 3]`` and ``alpha [size, size]``, floats in [0, 1], on the CPU."""
        expression, head_pose, latent = self._inputs(expression, head_pose, latent, size)
        rays, state, plan = self.front(size, expression, head_pose, latent)
        out = march_culled(lambda p, d: self.decode(state, p, d), self.grid, rays["origins"], rays["dirs"],
                           rays["near"], rays["far"], self.background(size, background), self.step,
                           blocks_per_round=self.blocks_per_round, chunk_samples=self.chunk, plan=plan)
        self.last_samples = out["samples"]
        # one copy back to the host (each copy from a GPU is a sync), into page-locked memory on CUDA (about twice
        # as fast as pageable memory; torch's caching host allocator reuses the buffers)
        frame = torch.cat([out["rgb"].clamp(0, 1), out["alpha"][:, None]], 1).reshape(size, size, 4)
        if frame.is_cuda:
            host = torch.empty(frame.shape, dtype=frame.dtype, pin_memory=True)
            host.copy_(frame, non_blocking=True)
            torch.cuda.current_stream(frame.device).synchronize()
            frame = host
        else:
            frame = frame.cpu()
        return {"rgb": frame[..., :3], "alpha": frame[..., 3]}


class TorchEngine(RenderEngine):
    """The fast field itself. On a GPU a frame's samples go through the decoder in one call (no chunks: each
    chunk is another ~25 launches), the fixed-shape front of each frame is a CUDA graph, and the decoder is
    compiled by ``torch.compile`` (``compile="auto"``: on CUDA; dynamic sample count), which fuses its
    elementwise work. Measured at 512² (bench/gpu_check.py, 2026-11-26): on an H200 148 frames/s eager, 166
    with the graph, 194–204 with the graph and the compiled decoder; on an H100 180 (143 not compiled).
    Compiling takes a few seconds at the first frame; where it fails (no compiler, an old GPU) the engine says so
    in one line and renders without it (the same for the graph capture)."""

    name = "torch"

    def __init__(self, loaded: LoadedAvatar, grid: OccupancyGrid | None = None, step: float | None = None,
                 device: str | torch.device = "cpu", compile: bool | str = "auto", graphs: bool = True,
                 log: Callable[[str], None] | None = None):
        super().__init__(loaded, grid, step, device)
        if self.device.type != "cpu":
            self.chunk = TORCH_GPU_CHUNK
        # On CUDA the fixed-shape front of a frame (rays, plane blend, block plan: ~70 small kernels) is captured
        # once per size as a CUDA graph and replayed: one launch instead of ~70 (the frame is host-bound there).
        self.graphs = graphs and self.device.type == "cuda"
        self._graphs: dict[int, tuple] = {}
        self._log = log or _stderr
        if compile == "auto":
            compile = self.device.type == "cuda"
        self._compiled = torch.compile(self.model.field.decode, dynamic=True) if compile else None

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def _decode(self, planes, latent_bias, points, dirs):
        if self._compiled is not None:
            try:
                return self._compiled(planes, latent_bias, points, dirs)
            except Exception as exc:  # noqa: BLE001 — compiling can fail in many ways; eager always works
                self._compiled = None
                self._log(f"torch.compile of the decoder failed here ({_reason(exc)}); rendering without it")
        return self.model.field.decode(planes, latent_bias, points, dirs)

    def frame_state(self, expression, latent):
        field = self.model.field
        condition = torch.cat([expression, latent])
        return field.blend(condition), field.latent_bias(condition)

    def decode(self, state, points, dirs):
        return self._decode(state[0], state[1], points, dirs)

    def front(self, size, expression, head_pose, latent):
        if not self.graphs:
            return super().front(size, expression, head_pose, latent)
        if size not in self._graphs:
            try:
                captured = self._capture(size, expression, head_pose, latent)
            except Exception as exc:  # noqa: BLE001 — a driver or torch without graph support: run it eagerly
                self.graphs = False
                self._log(f"CUDA graph capture failed here ({_reason(exc)}); rendering without graphs")
                return super().front(size, expression, head_pose, latent)
            if len(self._graphs) >= 8:  # the live loop adapts its render size: keep the recent few
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[size] = captured
        inputs, outputs, graph, _ = self._graphs[size]
        for static, value in zip(inputs, (expression, head_pose, latent)):
            static.copy_(value)
        graph.replay()
        return outputs

    def _capture(self, size, expression, head_pose, latent):
        """A CUDA graph of :meth:`RenderEngine.front` at ``size``, with its own input tensors. The pixel grid it
        reads is kept with it: ``self._pixels`` holds one size only, and a graph replays raw device addresses."""
        inputs = (expression.clone(), head_pose.clone(), latent.clone())
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):  # warm-up off the capture (lazy caches, cuBLAS handles)
            for _ in range(2):
                RenderEngine.front(self, size, *inputs)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = RenderEngine.front(self, size, *inputs)
        return inputs, outputs, graph, self._pixels[size]


class FusedEngine(RenderEngine):
    """The fast field on the CPU through compiled per-ray kernels (:mod:`avatar.fused`): the same samples, the
    same field, ~2–3× faster than the torch engine's marcher, whose per-sample bookkeeping dominates a CPU frame.

    ``precision``: ``fp32`` (default: 1/255 from the torch engine) or ``bf16`` (bfloat16 matrix products: ~20 %
    faster on one thread of this CPU, which has AMX, no faster on two, and up to 11/255 off at the edges of the
    expression range; slower than fp32 on CPUs without native bf16). ``threads``: for its kernels and the MLP
    (0 = torch's current setting, read at each frame).
    """

    name = "fused"

    def __init__(self, loaded: LoadedAvatar, grid: OccupancyGrid | None = None, step: float | None = None,
                 device: str | torch.device = "cpu", precision: str = "fp32", threads: int = 0,
                 min_transmittance: float = 1e-3):
        if torch.device(device).type != "cpu":
            raise UserError(f"the fused engine runs on the CPU, not {device}; use --engine torch or tensorrt there")
        if precision not in ("bf16", "fp32"):
            raise UserError(f"precision must be bf16 or fp32, not {precision!r}")
        try:  # numba: imported only when this engine is used
            from avatar.fused import Workspace, distance_field
        except ImportError as exc:
            raise UserError(f"the fused engine needs numba ({exc}); pip install -r requirements.txt") from None

        super().__init__(loaded, grid, step, "cpu")
        self.precision = precision
        self.threads = threads
        mask = self.grid.mask.cpu().numpy().astype(bool)
        self._occupied = np.ascontiguousarray(mask.astype(np.uint8))
        self._distance = distance_field(mask)
        self._box = (self.box_min.cpu().numpy().astype(np.float32), self.box_max.cpu().numpy().astype(np.float32))
        field = self.model.field
        self._center = field.center.cpu().numpy().astype(np.float32)
        self._inv_half = (1.0 / field.half_extent).cpu().numpy().astype(np.float32)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        hidden = field.layer1.weight.shape[0]
        with torch.no_grad():
            self._w = [field.layer1.weight.to(dtype), field.layer2.weight.to(dtype),
                       torch.cat([field.density.weight, field.color.weight[:, :hidden]]).to(dtype)]
            self._b2 = field.layer2.bias.to(dtype)
            self._bh = torch.cat([field.density.bias, field.color.bias]).to(dtype)
            self._view_weight = field.color.weight[:, hidden:].T.contiguous()  # [9, 3]: the SH view term
        self._dtype = dtype
        self._workspace = Workspace()
        self.min_transmittance = min_transmittance

    def frame_state(self, expression, latent):
        return TorchEngine.frame_state(self, expression, latent)

    def _mlp(self, latent_bias: Tensor):
        """The decoder without activations, ``features [m, 3C] → raw [m, 4]``, for this frame's latent bias."""
        w1, w2, wh = self._w
        b1 = (self.model.field.layer1.bias + latent_bias).to(self._dtype)
        linear, relu = torch.nn.functional.linear, torch.relu

        def mlp(feats: np.ndarray, out: np.ndarray) -> None:
            x = torch.from_numpy(feats).to(self._dtype)
            h = relu(linear(relu(linear(x, w1, b1)), w2, self._b2))
            torch.from_numpy(out).copy_(linear(h, wh, self._bh))

        return mlp

    def _rays(self, size: int, head_pose: Tensor) -> dict[str, np.ndarray]:
        """This frame's rays at ``size`` as arrays, with each ray's view-dependent colour term."""
        pixels, k = self._pixels[size]
        rays = ray_utils.frame_rays(pixels, k, head_pose, self.box_min, self.box_max)
        rays["view_rgb"] = spherical_harmonics_deg2(rays["dirs"]) @ self._view_weight
        return {key: value.numpy() for key, value in rays.items()}

    @torch.inference_mode()
    def render(self, expression, head_pose, latent, size, background=None):
        import numba

        from avatar.fused import march_fused

        expression, head_pose, latent = self._inputs(expression, head_pose, latent, size)
        planes, latent_bias = self.frame_state(expression, latent)
        threads = self.threads or torch.get_num_threads()
        if threads > 1:
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        rays = self._rays(size, head_pose)
        out = march_fused(self._mlp(latent_bias), rays["origins"], rays["dirs"], rays["near"], rays["far"], rays["hit"],
                          np.ascontiguousarray(planes.permute(0, 2, 3, 1).numpy()), self._center, self._inv_half,
                          rays["view_rgb"], self.background(size, background).numpy(), self._occupied, self._distance,
                          *self._box, self.step, self.min_transmittance, parallel=threads > 1, workspace=self._workspace)
        self.last_samples = out["samples"]
        rgb = torch.from_numpy(out["rgb"]).clamp_(0, 1).reshape(size, size, 3)
        return {"rgb": rgb, "alpha": torch.from_numpy(out["alpha"]).reshape(size, size)}


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

        directory = Path(directory)
        for f in (ONNX_MODEL, ONNX_BLEND, OCCUPANCY_CACHE):
            if not (directory / f).is_file():
                raise UserError(f"{directory} has no {f}; export it first: python export/build.py {directory}")
        grid, step = load_occupancy_cache(directory / OCCUPANCY_CACHE)
        device = torch.device(device)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.log_severity_level = 3
        providers = providers or onnx_providers("gpu" if device.type == "cuda" else "cpu")
        try:
            self.model_session = _ort_session(ort, directory / ONNX_MODEL, opts, providers)
            self.blend = _ort_session(ort, directory / ONNX_BLEND, opts, providers)
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt/mismatched graphs
            raise UserError(f"{directory / ONNX_MODEL}: ONNX Runtime cannot load it ({exc}); re-export it") from None
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
        if self.device.type == "cuda":
            rgb = torch.empty(points.shape[0], 3, device=self.device)
            sigma = torch.empty(points.shape[0], device=self.device)
            run_bound(self.model_session, {"planes": state[0], "latent_bias": state[1], "points": points, "dirs": dirs},
                      {"rgb": rgb, "sigma": sigma})
            return rgb, sigma
        rgb, sigma = self.model_session.run(None, {"planes": state[0], "latent_bias": state[1],
                                                   "points": points.contiguous().numpy(),
                                                   "dirs": dirs.contiguous().numpy()})
        return torch.from_numpy(rgb), torch.from_numpy(sigma)


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
        if not (directory / TRT_MODEL).is_file():
            raise UserError(f"{directory} has no {TRT_MODEL}; build it: python export/build.py {directory} --engine tensorrt")
        grid, step = load_occupancy_cache(directory / OCCUPANCY_CACHE)
        super().__init__(loaded, grid, step, device)
        self.chunk = min(self.chunk, TRT_MAX_SAMPLES)
        with torch.cuda.device(self.device):
            self.runtime, self.engine, self.context = load_plan(trt, (directory / TRT_MODEL).read_bytes(), directory)

    def frame_state(self, expression, latent):
        # The frame state (the blend) is one einsum; torch on the GPU does it as fast as anything.
        planes, bias = TorchEngine.frame_state(self, expression, latent)
        return self.model.field.channels_last(planes).contiguous(), bias.contiguous()

    def decode(self, state, points, dirs):
        n = points.shape[0]
        inputs = {"planes": state[0], "latent_bias": state[1], "points": points.contiguous(), "dirs": dirs.contiguous()}
        outputs = {"rgb": torch.empty(n, 3, device=self.device), "sigma": torch.empty(n, device=self.device)}
        run_plan(self.context, inputs, outputs, torch.cuda.current_stream(self.device).cuda_stream)
        return outputs["rgb"], outputs["sigma"]


def load_plan(trt, plan: bytes, directory: Path):
    """(runtime, engine, execution context) from a serialized plan, or one clear line: TensorRT returns None (and logs)
    for a plan built on another GPU or TensorRT version, or when the context's memory cannot be had."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise UserError(f"{directory / TRT_MODEL} does not load on this GPU / TensorRT {getattr(trt, '__version__', '?')} "
                        f"(built elsewhere?); rebuild it: python export/build.py {directory} --engine tensorrt")
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


def engines_record(directory: str | Path) -> dict:
    path = Path(directory) / ENGINES_FILE
    return read_json(path) if path.is_file() else {}


def _reason(exc: BaseException) -> str:
    """An exception as one short line (its message's first line, else its type)."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def open_engine(loaded: LoadedAvatar, directory: str | Path, name: str = "auto", device: str | torch.device = "cpu",
                log: Callable[[str], None] = _stderr) -> RenderEngine:
    """The engine called ``name`` on ``device``; ``auto`` takes the fastest one measured by export/build.py that
    opens here (when nothing was measured: fused on a CPU, else torch), saying in one line via ``log`` why each faster one did not.
    A damaged file in the bundle (:class:`DamagedFile`) is fatal whichever engine would run: falling back past
    it would hide a broken bundle."""
    device = torch.device(device)
    if name == "auto":
        record = engines_record(directory)
        ranked = sorted(record.get("fps", {}).items(), key=lambda kv: -kv[1])
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
        cache = Path(directory) / OCCUPANCY_CACHE
        if cache.is_file():  # it culls with the model's own grid, but a damaged bundle is refused all the same
            load_occupancy_cache(cache)
        return TorchEngine(loaded, device=device)
    if name == "fused":
        cache = Path(directory) / OCCUPANCY_CACHE
        if cache.is_file():  # as the torch engine: the model's own grid, but a damaged bundle is refused
            load_occupancy_cache(cache)
        return FusedEngine(loaded, device=device)
    if name == "onnxruntime":
        return OnnxEngine(loaded, directory, device=device)
    if name == "tensorrt":
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
