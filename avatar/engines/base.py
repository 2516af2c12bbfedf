"""The frame logic of the torch, ONNX Runtime and TensorRT engines: rays, the block plan over the cached occupancy
grid, packed culled marching (:func:`avatar.render.march.march_culled`) and compositing on the background;
subclasses provide the field's work (:meth:`RenderEngine.frame_state` and :meth:`RenderEngine.decode`). The fused
engine keeps the interface and the rays but marches in its own numba kernels (:mod:`avatar.engines.fused_kernels`).
"""

from __future__ import annotations

import copy
import sys
import time

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from avatar.base.devices import chunk_for
from avatar.base.errors import UserError
from avatar.bundle.bundle import LoadedAvatar
from avatar.field.fast import deferred_composite
from avatar.field.upsample import over, upsample_render
from avatar.render import rays as ray_utils
from avatar.render.grid import OccupancyGrid
from avatar.render.march import block_plan, march_culled, max_blocks


def _reason(exc: BaseException) -> str:
    """An exception as one short line (its message's first line, else its type)."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)




BLACK = torch.zeros(1, 1, 3)  # "over black" (premultiplied); one instance: engines cache a background by its identity


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
        self._pixels: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # size: (pixel grid, intrinsics, camera rays)
        self._backgrounds: dict[tuple, Tensor] = {}
        self.last_samples = 0

    # -- the field's work -------------------------------------------------------------------------------------
    def frame_state(self, expression: Float[Tensor, " e"], latent: Float[Tensor, " l"]):
        raise NotImplementedError

    def decode(self, state, points: Float[Tensor, "m 3"], dirs: Float[Tensor, "m 3"]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def shade(self, state, features: Float[Tensor, "m f"], dirs: Float[Tensor, "m 3"]) -> Float[Tensor, "m 3"]:
        """A deferred field's per-pixel colour (the field's own MLP; engines with a graph of it override)."""
        return self.model.field.shade(features, dirs, torch.as_tensor(state[1], device=features.device))

    # -- everything else, shared -------------------------------------------------------------------------------
    def front(self, size: int, expression: Float[Tensor, " e"], head_pose: Float[Tensor, "4 4"],
              latent: Float[Tensor, " l"]) -> tuple[dict, object, dict]:
        """The part of a frame whose shapes depend only on ``size``: the rays, the field's frame state and the
        block plan (:func:`avatar.occupancy.block_plan`)."""
        pixels, k, camera = self._pixels[size]
        rays = ray_utils.frame_rays(pixels, k, head_pose, self.box_min, self.box_max, camera)
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
            # a few cached sizes (sizes change rarely; an upsampled frame takes two), on the marching device
            if len(self._backgrounds) >= 4:
                self._backgrounds.pop(next(iter(self._backgrounds)))
            self._backgrounds[key] = bg.reshape(-1, 3).contiguous().to(self.device)
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
        """The frame's conditioning as float32 tensors on the engine's device; caches the pixel grid of ``size``
        and its unit camera-space directions."""
        dev = self.device
        as_t = lambda a: torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a, dtype=torch.float32, device=dev)
        if size not in self._pixels:
            w, h = self.loaded.image_size
            k = torch.as_tensor(self.loaded.intrinsics * (size / h), dtype=torch.float32, device=dev)
            pixels = ray_utils.pixel_grid(size, size, dev)
            camera = ray_utils.unit_directions(ray_utils.camera_directions(pixels.float(), k))
            self._pixels = {size: (pixels, k, camera)}
        return as_t(expression), as_t(head_pose), as_t(latent)

    @torch.inference_mode()
    def render_upsampled(self, expression: np.ndarray | Tensor, head_pose: np.ndarray | Tensor,
                         latent: np.ndarray | Tensor, size: int, background: Tensor | None = None) -> dict[str, Tensor]:
        """:meth:`render`'s frame at ``size`` from a render at ``size / factor`` through the avatar's learned
        upsampler (:mod:`avatar.field.upsample`): the head is rendered over black, upsampled, then laid over the
        background at full size (which stays sharp)."""
        upsampler = self.loaded.upsampler
        if upsampler is None:
            raise UserError("this avatar has no upsampler; train one with trainer/upsample.py")
        low = self.render(expression, head_pose, latent, max(8, size // upsampler.factor), BLACK)
        rgb, alpha = upsample_render(upsampler, low["rgb"], low["alpha"])
        if rgb.shape[0] != size:  # a size the factor does not divide: the last pixel or so, bilinear
            rgba = torch.cat([rgb, alpha[..., None]], -1).permute(2, 0, 1)[None]
            rgba = torch.nn.functional.interpolate(rgba, size=(size, size), mode="bilinear", align_corners=False)[0]
            rgb, alpha = rgba[:3].permute(1, 2, 0), rgba[3]
        bg = self.background(size, background).cpu().reshape(size, size, 3)
        return {"rgb": over(rgb, alpha, bg).clamp(0, 1), "alpha": alpha}

    @torch.inference_mode()
    def render(self, expression: np.ndarray | Tensor, head_pose: np.ndarray | Tensor, latent: np.ndarray | Tensor,
               size: int, background: Tensor | None = None) -> dict[str, Tensor]:
        """One frame: ``rgb [size, size, 3]`` and ``alpha [size, size]``, floats in [0, 1], on the CPU."""
        expression, head_pose, latent = self._inputs(expression, head_pose, latent, size)
        rays, state, plan = self.front(size, expression, head_pose, latent)
        field = self.model.field
        bg = self.background(size, background)
        # a deferred field composites its features (onto a zero "background") and shades each pixel after
        behind = bg.new_zeros(bg.shape[0], field.feature_width) if field.deferred else bg
        out = march_culled(lambda p, d: self.decode(state, p, d), self.grid, rays["origins"], rays["dirs"],
                           rays["near"], rays["far"], behind, self.step,
                           blocks_per_round=self.blocks_per_round, chunk_samples=self.chunk, plan=plan)
        self.last_samples = out["samples"]
        if field.deferred:
            dirs = rays["dirs"]
            out["rgb"] = deferred_composite(out["rgb"], out["alpha"], bg,
                                            lambda feats, rows: self.shade(state, feats, dirs[rows]))
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
