"""The torch engine: the bundle's fast field run directly (CPU or GPU), the reference every other engine is held to.
"""

from __future__ import annotations

from typing import Callable

import torch

from avatar.base.devices import TORCH_GPU_CHUNK
from avatar.bundle.bundle import LoadedAvatar
from avatar.engines.base import RenderEngine, _reason, _stderr
from avatar.render.grid import OccupancyGrid


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
        return self.model.field.frame_state(expression, latent)

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
