"""Occupancy grid over the canonical head box.

The grid keeps, per cell, a decaying maximum of the density seen there (as instant-ngp and nerfacc do) and
a boolean mask ``density > threshold``. It receives a density callback; it never owns the network. The
final mask is made conservative over the whole training expression range (max over many expressions,
dilated by one cell) and stored in the bundle.

After training, cells that no training ray saw (the head's interior, the back of the head) are carved away
(:meth:`OccupancyGrid.carve`), leaving a thin shell around the visible surface.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from jaxtyping import Float
from torch import Tensor, nn


class OccupancyGrid(nn.Module):
    def __init__(self, box_min: Tensor, box_max: Tensor, resolution: int = 64, threshold: float = 0.3):
        super().__init__()
        self.resolution, self.threshold = resolution, threshold
        self.register_buffer("box_min", box_min.clone().float(), persistent=False)
        self.register_buffer("box_max", box_max.clone().float(), persistent=False)
        self.register_buffer("density", torch.zeros((resolution,) * 3), persistent=False)
        self.register_buffer("mask", torch.ones((resolution,) * 3, dtype=torch.bool))  # saved in the bundle
        self.coarse_factor = 4
        self.visibility: Tensor | None = None  # max compositing weight per cell, while carving
        self._coarse: Tensor | None = None
        self._coarse_key: tuple | None = None
        self._block_steps, self._block_key = 1, None

    def cell_centers(self, jitter: bool = False) -> Float[Tensor, "r3 3"]:
        r = self.resolution
        idx = torch.stack(torch.meshgrid(*[torch.arange(r, device=self.mask.device)] * 3, indexing="ij"), -1)
        offset = torch.rand(r, r, r, 3, device=self.mask.device) if jitter else 0.5
        frac = (idx.float() + offset) / r
        return (self.box_min + frac * (self.box_max - self.box_min)).reshape(-1, 3)

    @torch.no_grad()
    def update(self, density_fn: Callable[[Tensor], Tensor], decay: float = 0.95, chunk: int = 65536) -> None:
        """One training-time update: decayed max with the density at jittered cell points."""
        pts = self.cell_centers(jitter=True)
        new = torch.cat([density_fn(pts[i:i + chunk]) for i in range(0, pts.shape[0], chunk)])
        self.density = torch.maximum(self.density * decay, new.reshape(self.density.shape))
        self.mask = _dilate(self.density > self.threshold)  # neighbours stay reachable, so surfaces can grow

    @torch.no_grad()
    def finalize(self, density_fns: list[Callable[[Tensor], Tensor]], samples_per_cell: int = 2,
                 chunk: int = 65536) -> None:
        """Conservative mask for the bundle: max density over all given conditions, then dilate one cell."""
        best = torch.zeros_like(self.density)
        for fn in density_fns:
            for _ in range(samples_per_cell):
                pts = self.cell_centers(jitter=True)
                d = torch.cat([fn(pts[i:i + chunk]) for i in range(0, pts.shape[0], chunk)])
                best = torch.maximum(best, d.reshape(best.shape))
        self.mask = _dilate(best > self.threshold)
        self.density = best

    def set_threshold(self, threshold: float) -> None:
        """Re-derive the mask from the finalized densities with another threshold (density in 1/cm)."""
        self.threshold = threshold
        self.mask = _dilate(self.density > threshold)

    @torch.no_grad()
    def record_visibility(self, points: Float[Tensor, "m 3"], weights: Float[Tensor, " m"]) -> None:
        """Keep, per cell, the largest compositing weight any rendered sample in it had (for :meth:`carve`)."""
        if self.visibility is None:
            self.visibility = torch.zeros_like(self.density)
        frac = (points - self.box_min) / (self.box_max - self.box_min)
        idx = (frac * self.resolution).long().clamp(0, self.resolution - 1)
        r = self.resolution
        flat = (idx[:, 0] * r + idx[:, 1]) * r + idx[:, 2]
        self.visibility = self.visibility.reshape(-1).scatter_reduce(0, flat, weights.detach(), "amax").reshape(
            self.density.shape)

    @torch.no_grad()
    def carve(self, min_weight: float = 1e-4) -> float:
        """Drop occupied cells that no recorded ray ever saw (head interior, the back of the head), keeping a
        one-cell margin around what was seen. Returns the occupied fraction before carving.

        Early termination already skips them for rays that reach an opaque surface, but every ray pays for the
        samples it takes to get opaque and rays at grazing angles pay for much more; a thin shell is cheap for all.
        """
        before = self.occupied_fraction()
        if self.visibility is not None:
            self.mask = self.mask & _dilate(self.visibility > min_weight)
            self.visibility = None
        return before

    def coarse_mask(self) -> Tensor:
        """The mask max-pooled by ``coarse_factor`` and dilated by one coarse cell (cached per mask version)."""
        key = (self.mask.data_ptr(), self.mask._version)
        if self._coarse_key != key:
            pooled = torch.nn.functional.max_pool3d(self.mask.float()[None, None], self.coarse_factor,
                                                    ceil_mode=True)[0, 0] > 0
            self._coarse, self._coarse_key = _dilate(pooled), key
        return self._coarse

    def block_steps(self, step: float) -> int:
        """Steps per block such that half a block is shorter than a coarse cell on every axis: then a block whose
        midpoint is in an empty cell of the dilated coarse mask holds no occupied point."""
        key = (step, self.coarse_mask().shape[0], self.box_min.data_ptr(), self.box_max.data_ptr())
        if self._block_key != key:  # cached: the float() below is a host sync on a GPU, once per frame otherwise
            coarse_cell = float(((self.box_max - self.box_min) / self.coarse_mask().shape[0]).min())
            self._block_steps, self._block_key = int(max(1, min(32, math.floor(2 * coarse_cell / step * 0.999)))), key
        return self._block_steps

    def coarse_occupied(self, points: Float[Tensor, "n 3"]) -> Tensor:
        """Bool ``[n]`` from the dilated coarse mask; indices are clamped to the box (see :meth:`block_steps`)."""
        coarse = self.coarse_mask()
        rc = coarse.shape[0]
        frac = (points - self.box_min) / (self.box_max - self.box_min)
        idx = (frac * rc).long().clamp(0, rc - 1)
        flat = (idx[:, 0] * rc + idx[:, 1]) * rc + idx[:, 2]
        return coarse.reshape(-1)[flat]

    def occupied(self, points: Float[Tensor, "n 3"]) -> Tensor:
        """Bool ``[n]``: is each canonical point inside an occupied cell (False outside the box)."""
        frac = (points - self.box_min) / (self.box_max - self.box_min)
        inside = ((frac >= 0) & (frac < 1)).all(-1)
        idx = (frac * self.resolution).long().clamp(0, self.resolution - 1)
        r = self.resolution
        flat = (idx[:, 0] * r + idx[:, 1]) * r + idx[:, 2]
        return inside & self.mask.reshape(-1)[flat]

    def occupied_fraction(self) -> float:
        return float(self.mask.float().mean())

    @torch.no_grad()
    def refined(self, resolution: int, density_fns: list[Callable[[Tensor], Tensor]], chunk: int = 65536
                ) -> "OccupancyGrid":
        """A finer grid of the same box (``resolution``, a multiple of this one's) inside this grid's (carved)
        cells: those of its cells where the largest density over ``density_fns`` (at a jittered point of each)
        passes this grid's threshold, dilated by one fine cell. Cell size, and the one-cell dilation that keeps the
        mask conservative, halve at twice the resolution: fewer empty samples before each surface (a ray marches
        every step of an occupied cell). Only cells inside this grid's mask are evaluated."""
        if resolution % self.resolution:
            raise ValueError(f"resolution {resolution} is not a multiple of {self.resolution}")
        k = resolution // self.resolution
        inside = self.mask.repeat_interleave(k, 0).repeat_interleave(k, 1).repeat_interleave(k, 2)
        fine = OccupancyGrid(self.box_min, self.box_max, resolution, self.threshold).to(self.mask.device)
        cells = torch.nonzero(inside.reshape(-1))[:, 0]
        pts = fine.cell_centers(jitter=True)[cells]
        best = torch.zeros(cells.shape[0], device=pts.device)
        for fn in density_fns:
            best = torch.maximum(best, torch.cat([fn(pts[i:i + chunk]) for i in range(0, pts.shape[0], chunk)]))
        fine.density = torch.zeros(resolution ** 3, device=pts.device).index_copy(0, cells, best).reshape((resolution,) * 3)
        fine.mask = _dilate(fine.density > self.threshold) & inside
        return fine


def _dilate(mask: Tensor) -> Tensor:
    """Grow a boolean ``[r, r, r]`` mask by one cell in every direction."""
    return torch.nn.functional.max_pool3d(mask.float()[None, None], 3, stride=1, padding=1)[0, 0] > 0
