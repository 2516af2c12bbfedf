"""Occupancy grid over the canonical head box, and the packed, culled renderer that uses it.

The grid keeps, per cell, a decaying maximum of the density seen there (as instant-ngp and nerfacc do) and
a boolean mask ``density > threshold``. It receives a density callback; it never owns the network. The
final mask is made conservative over the whole training expression range (max over many expressions,
dilated by one cell) and stored in the bundle.

The culled renderer marches fixed steps along each ray in segments, evaluates the field only at samples in
occupied cells (packed, addressed by ray index), composites them, and drops rays whose transmittance is
negligible (early termination). The background closes every ray, as in the dense renderer.
"""

from __future__ import annotations

from typing import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn


class OccupancyGrid(nn.Module):
    def __init__(self, box_min: Tensor, box_max: Tensor, resolution: int = 64, threshold: float = 0.01):
        super().__init__()
        self.resolution, self.threshold = resolution, threshold
        self.register_buffer("box_min", box_min.clone().float(), persistent=False)
        self.register_buffer("box_max", box_max.clone().float(), persistent=False)
        self.register_buffer("density", torch.zeros((resolution,) * 3), persistent=False)
        self.register_buffer("mask", torch.ones((resolution,) * 3, dtype=torch.bool))  # saved in the bundle

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


def _dilate(mask: Tensor) -> Tensor:
    """Grow a boolean ``[r, r, r]`` mask by one cell in every direction."""
    return torch.nn.functional.max_pool3d(mask.float()[None, None], 3, stride=1, padding=1)[0, 0] > 0


def composite_packed(ray_indices: Int[Tensor, "m"], t: Float[Tensor, "m"], sigma: Float[Tensor, "m"],
                     rgb: Float[Tensor, "m 3"], step: float, n_rays: int,
                     start_transmittance: Float[Tensor, "n"]) -> dict[str, Tensor]:
    """Composite packed samples (sorted by ray, then depth) onto their rays.

    Returns per ray the colour and depth sums of these samples, their opacity (``alpha``), and the
    transmittance left after them (``transmittance``), starting from ``start_transmittance``.
    """
    alpha = 1.0 - torch.exp(-sigma * step)
    log_t = torch.log1p(-alpha.clamp(max=1 - 1e-6))
    # Exclusive cumulative sum of log-transmittance within each ray: global cumsum minus the ray's start.
    cum = torch.cumsum(log_t, 0)
    total = torch.zeros(n_rays, device=t.device, dtype=t.dtype).index_add_(0, ray_indices, log_t)
    counts = torch.bincount(ray_indices, minlength=n_rays)
    starts = torch.cumsum(counts, 0) - counts
    before_ray = torch.cat([torch.zeros(1, device=t.device, dtype=t.dtype), cum])[starts]  # [n] sum before each ray
    excl = cum - log_t - before_ray[ray_indices]
    weights = start_transmittance[ray_indices] * torch.exp(excl) * alpha
    color = torch.zeros(n_rays, 3, device=t.device, dtype=rgb.dtype).index_add_(0, ray_indices, weights[:, None] * rgb)
    depth = torch.zeros(n_rays, device=t.device, dtype=t.dtype).index_add_(0, ray_indices, weights * t)
    acc = torch.zeros(n_rays, device=t.device, dtype=t.dtype).index_add_(0, ray_indices, weights)
    return {"rgb": color, "depth": depth, "alpha": acc, "transmittance": start_transmittance * torch.exp(total)}


def march_culled(query: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], grid: OccupancyGrid | None,
                 origins: Float[Tensor, "n 3"], dirs: Float[Tensor, "n 3"], near: Float[Tensor, "n"],
                 far: Float[Tensor, "n"], background: Float[Tensor, "n 3"], step: float, segment: int = 16,
                 perturb: bool = False, min_transmittance: float = 1e-3) -> dict[str, Tensor]:
    """Render rays with fixed steps, occupancy culling, packed evaluation and early termination.

    ``query(points [m, 3], dirs [m, 3]) → (rgb [m, 3], sigma [m])`` is the field for this frame. With
    ``grid=None`` nothing is culled (but rays still terminate early). Returns ``rgb``, ``depth``, ``alpha``
    per ray and the number of field samples evaluated (``samples``).
    """
    n = origins.shape[0]
    device = origins.device
    color = torch.zeros(n, 3, device=device)
    depth = torch.zeros(n, device=device)
    acc = torch.zeros(n, device=device)
    trans = torch.ones(n, device=device)
    offset = torch.rand(n, device=device) if perturb else torch.full((n,), 0.5, device=device)
    active = torch.nonzero(far > near)[:, 0]
    max_steps = int(torch.ceil(((far - near).max() / step)).item()) if n and active.numel() else 0
    evaluated = 0
    ks = torch.arange(segment, device=device)
    for start in range(0, max_steps, segment):
        if active.numel() == 0:
            break
        t = near[active, None] + (start + ks + offset[active, None]) * step  # [a, k]
        valid = t < far[active, None]
        pts = origins[active, None, :] + dirs[active, None, :] * t[..., None]
        if grid is not None:
            valid = valid & grid.occupied(pts.reshape(-1, 3)).reshape(valid.shape)
        rows, cols = torch.nonzero(valid, as_tuple=True)
        if rows.numel():
            ray_ids = active[rows]
            rgb, sigma = query(pts[rows, cols], dirs[ray_ids])
            evaluated += rows.numel()
            out = composite_packed(rows, t[rows, cols], sigma, rgb, step, active.numel(), trans[active])
            color = color.index_add(0, active, out["rgb"])
            depth = depth.index_add(0, active, out["depth"])
            acc = acc.index_add(0, active, out["alpha"])
            trans = trans.index_copy(0, active, out["transmittance"])
        # Keep rays that still see through and have not left the box.
        still = (trans[active] > min_transmittance) & (near[active] + (start + segment) * step < far[active])
        active = active[still]
    color = color + trans[:, None] * background
    depth = depth + trans * far
    return {"rgb": color, "depth": depth, "alpha": acc, "samples": evaluated}


def march_dense(query: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], origins: Float[Tensor, "n 3"],
                dirs: Float[Tensor, "n 3"], near: Float[Tensor, "n"], far: Float[Tensor, "n"],
                background: Float[Tensor, "n 3"], step: float) -> dict[str, Tensor]:
    """The simple reference: every fixed step of every ray evaluated and composited (no culling, no stopping)."""
    from avatar.volrend import composite

    n = origins.shape[0]
    count = max(1, int(torch.ceil(((far - near).max() / step)).item())) if n else 1
    t = near[:, None] + (torch.arange(count, device=origins.device) + 0.5) * step  # [n, s]
    inside = t < far[:, None]
    pts = origins[:, None, :] + dirs[:, None, :] * t[..., None]
    rgb, sigma = query(pts.reshape(-1, 3), dirs[:, None, :].expand_as(pts).reshape(-1, 3))
    sigma = sigma.reshape(n, count) * inside
    # Fixed steps: every sample's interval is `step`, as in the culled renderer.
    out = composite(rgb.reshape(n, count, 3), sigma, t, t[:, -1] + step, background)
    depth = out["depth"] - (1 - out["alpha"]) * (t[:, -1] + step) + (1 - out["alpha"]) * far
    return {"rgb": out["rgb"], "depth": depth, "alpha": out["alpha"], "samples": n * count}
