"""The packed, culled renderer and its dense reference.

The culled renderer marches fixed steps along each ray in blocks: one lookup in a coarse grid skips a whole
empty block, the remaining steps are culled with the fine grid, the field is evaluated only at samples in
occupied cells (packed, addressed by ray index), and rays whose transmittance is negligible stop (early
termination). The background closes every ray, as in the dense renderer. Also the distortion loss's terms
over packed samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from avatar.base.devices import chunk_for
from avatar.render.grid import OccupancyGrid

# A ray stops once its transmittance falls below this: what is behind it adds less than 1/1000 of its colour.
MIN_TRANSMITTANCE = 1e-3


def exclusive_ray_scan(ray_indices: Int[Tensor, " m"], values: Float[Tensor, " m"], n_rays: int) -> Float[Tensor, " m"]:
    """Per sample, the sum of the values before it on its ray (samples sorted by ray).

    One global cumsum minus each ray's start is a segmented scan without a per-ray loop, but in float32 the
    global sum grows with every ray and the difference loses the digits that matter: at 262k rays × 12 samples
    transmittances were off by up to 217/255. The global sum is kept in float64 (≈ +12 % on the compositing
    time here, nothing next to the field); MPS has no float64, so there the scan runs per ray in a padded
    ``[rays, longest]`` layout instead (exact in float32, more memory).
    """
    counts = torch.bincount(ray_indices, minlength=n_rays)
    starts = torch.cumsum(counts, 0) - counts
    if values.device.type == "mps":
        rank = torch.arange(values.numel(), device=values.device) - starts[ray_indices]
        padded = values.new_zeros(n_rays, int(counts.max()) if n_rays else 0)
        padded[ray_indices, rank] = values
        return padded.cumsum(1)[ray_indices, rank] - values
    cum = torch.cumsum(values, 0, dtype=torch.float64)
    before_ray = torch.cat([cum.new_zeros(1), cum])[starts]  # [n] sum before each ray
    return (cum - before_ray[ray_indices]).to(values.dtype) - values


def composite_packed(ray_indices: Int[Tensor, " m"], t: Float[Tensor, " m"], sigma: Float[Tensor, " m"],
                     rgb: Float[Tensor, "m 3"], step: float, n_rays: int,
                     start_transmittance: Float[Tensor, " n"]) -> dict[str, Tensor]:
    """Composite packed samples (sorted by ray, then depth) onto their rays.

    Returns per ray the colour and depth sums of these samples, their opacity (``alpha``), and the
    transmittance left after them (``transmittance``), starting from ``start_transmittance``; and per
    sample its compositing weight (``weights [m]``).
    """
    alpha = 1.0 - torch.exp(-sigma * step)
    log_t = torch.log1p(-alpha.clamp(max=1 - 1e-6))
    total = torch.zeros(n_rays, device=t.device, dtype=t.dtype).index_add_(0, ray_indices, log_t)
    excl = exclusive_ray_scan(ray_indices, log_t, n_rays)
    weights = start_transmittance[ray_indices] * torch.exp(excl) * alpha
    color = torch.zeros(n_rays, rgb.shape[1], device=t.device, dtype=rgb.dtype).index_add_(
        0, ray_indices, weights[:, None] * rgb)
    depth = torch.zeros(n_rays, device=t.device, dtype=t.dtype).index_add_(0, ray_indices, weights * t)
    acc = torch.zeros(n_rays, device=t.device, dtype=t.dtype).index_add_(0, ray_indices, weights)
    return {"rgb": color, "depth": depth, "alpha": acc, "transmittance": start_transmittance * torch.exp(total),
            "weights": weights}


def max_blocks(box_min: Tensor, box_max: Tensor, step: float, block: int) -> int:
    """An upper bound of the blocks any ray through the box needs (its diagonal in steps): a fixed shape for
    :func:`block_plan`, known without looking at the rays (no host sync)."""
    diagonal = float(torch.linalg.vector_norm((box_max - box_min).detach().cpu().double()))
    return (math.ceil(diagonal / step) + 1 + block - 1) // block


def block_plan(grid: OccupancyGrid | None, origins: Float[Tensor, "n 3"], dirs: Float[Tensor, "n 3"],
               near: Float[Tensor, " n"], far: Float[Tensor, " n"], step: float, perturb: bool = False,
               n_blocks: int | None = None) -> dict:
    """Per ray: the offset of its fixed steps, their number, and which blocks of ``block`` steps the coarse grid
    keeps (``keep [n, n_blocks]``; a block is kept when its midpoint lies in an occupied coarse cell).

    With ``n_blocks`` given (e.g. :func:`max_blocks`) every shape is fixed by the ray count and nothing waits
    for the device, so a GPU can replay this as one CUDA graph; blocks past a ray's end are never kept.
    """
    n = origins.shape[0]
    device = origins.device
    offset = torch.rand(n, device=device) if perturb else torch.full((n,), 0.5, device=device)
    length = (far - near).clamp_min(0.0)
    steps_per_ray = torch.ceil(length / step - offset).clamp_min(0).long()  # steps k with near+(k+off)·step < far
    block = grid.block_steps(step) if grid is not None else 16
    if n_blocks is None:
        max_steps = int(steps_per_ray.max()) if n else 0
        n_blocks = (max_steps + block - 1) // block
    # Block b of a ray holds steps [b·block, (b+1)·block); its midpoint decides the coarse test.
    b = torch.arange(n_blocks, device=device)
    keep = b[None, :] * block < steps_per_ray[:, None]  # [n, nb]
    if grid is not None and n_blocks > 0:
        t_mid = near[:, None] + ((b[None, :] + 0.5) * block + offset[:, None] - 0.5) * step
        mid = origins[:, None, :] + dirs[:, None, :] * t_mid[..., None]
        keep = keep & grid.coarse_occupied(mid.reshape(-1, 3)).reshape(keep.shape)
    return {"offset": offset, "steps_per_ray": steps_per_ray, "keep": keep, "block": block}


def march_culled(query: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], grid: OccupancyGrid | None,
                 origins: Float[Tensor, "n 3"], dirs: Float[Tensor, "n 3"], near: Float[Tensor, " n"],
                 far: Float[Tensor, " n"], background: Float[Tensor, "n 3"], step: float, blocks_per_round: int = 2,
                 perturb: bool = False, min_transmittance: float = MIN_TRANSMITTANCE,
                 on_samples: Callable[[Tensor, Tensor], None] | None = None,
                 chunk_samples: int | None = None, plan: dict | None = None, distortion: bool = False
                 ) -> dict[str, Tensor]:
    """Render rays with fixed steps, two-level occupancy culling, packed evaluation and early termination.

    Each ray's fixed steps are grouped in blocks; a block is skipped when the coarse grid says it is empty
    (one lookup per block), the steps of the remaining blocks are culled one by one with the fine grid. Rays
    are marched ``blocks_per_round`` occupied blocks at a time; after each round rays whose transmittance is
    negligible stop (early termination). All work of a round is one packed field call — no per-ray loop.
    ``blocks_per_round <= 0`` marches every occupied block in one pass (no early termination: few launches
    and host syncs, for GPUs).

    ``query(points [m, 3], dirs [m, 3]) → (rgb [m, 3], sigma [m])`` is the field for this frame; it may return
    any number of channels in place of the colour (a deferred field's features, with a zero ``background`` of
    that width: the sums come back as ``rgb``). With
    ``grid=None`` nothing is culled (rays still terminate early). ``on_samples(points, weights)`` sees every
    evaluated sample (for visibility carving). Returns ``rgb``, ``depth``, ``alpha`` per ray and the number
    of field samples evaluated (``samples``). ``chunk_samples``: samples per field call (default: per device,
    small on a CPU for its caches, large on a GPU for few launches). ``plan``: this frame's :func:`block_plan`
    when the caller made it already (the engines make it inside a CUDA graph). ``distortion``: also return each
    ray's distortion (:func:`distortion_terms`, mip-NeRF 360), a training loss that gathers a ray's weight into
    as few samples as possible.
    """
    march = _March.start(query, grid, origins, dirs, near, step, chunk_samples or chunk_for(origins.device),
                         on_samples, distortion, background.shape[1])
    if plan is None:
        plan = block_plan(grid, origins, dirs, near, far, step, perturb)
    march.plan(plan)
    keep = plan["keep"]
    if keep.shape[1] > 0:
        ray_of, block_of = torch.nonzero(keep, as_tuple=True)  # sorted by ray, then depth
        if blocks_per_round <= 0:
            march.one_pass(ray_of, block_of)
        else:
            march.rounds(ray_of, block_of, blocks_per_round, min_transmittance)
    return march.finish(background, far)


@dataclass
class _March:
    """The running state of one :func:`march_culled` call: the rays, this frame's block plan and the sums
    composited so far (colour, depth, opacity, transmittance and, for the distortion loss, its carried sums).

    Kept in one object so the one-pass and the round-by-round marches share the sample generation and the
    accumulation without a closure over a long function's locals.
    """

    query: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
    grid: OccupancyGrid | None
    origins: Float[Tensor, "n 3"]
    dirs: Float[Tensor, "n 3"]
    near: Float[Tensor, " n"]
    step: float
    chunk_samples: int
    on_samples: Callable[[Tensor, Tensor], None] | None
    distortion: bool
    color: Float[Tensor, "n 3"]
    depth: Float[Tensor, " n"]
    acc: Float[Tensor, " n"]
    trans: Float[Tensor, " n"]
    dist: Float[Tensor, " n"]
    weight_sum: Float[Tensor, " n"]
    weighted_t: Float[Tensor, " n"]
    evaluated: int = 0
    offset: Tensor | None = None  # [n] the plan's step offset per ray
    steps_per_ray: Tensor | None = None  # [n] long
    block: int = 0  # steps per block
    ks: Tensor | None = None  # [block] step index within a block

    @classmethod
    def start(cls, query, grid: OccupancyGrid | None, origins: Tensor, dirs: Tensor, near: Tensor, step: float,
              chunk_samples: int, on_samples, distortion: bool, width: int = 3) -> "_March":
        """Nothing composited yet: zero colour (``width`` channels), depth and opacity, full transmittance for the
        ``n`` rays."""
        n = origins.shape[0]
        device = origins.device
        zeros = torch.zeros(n, device=device)  # (the distortion sums start as one shared zero tensor)
        return cls(query, grid, origins, dirs, near, step, chunk_samples, on_samples, distortion,
                   color=torch.zeros(n, width, device=device), depth=torch.zeros(n, device=device),
                   acc=torch.zeros(n, device=device), trans=torch.ones(n, device=device),
                   dist=zeros, weight_sum=zeros, weighted_t=zeros)

    def plan(self, plan: dict) -> None:
        """Take the frame's :func:`block_plan` (step offsets, steps per ray, block length)."""
        self.offset, self.steps_per_ray, self.block = plan["offset"], plan["steps_per_ray"], plan["block"]
        if plan["keep"].shape[1] > 0:
            self.ks = torch.arange(self.block, device=self.origins.device)

    def samples(self, rays: Int[Tensor, " m"], blocks: Int[Tensor, " m"]) -> tuple[Tensor, Tensor, Tensor]:
        """The occupied steps of these (ray, block) pairs: their rays ``[s]``, points ``[s, 3]`` and depths
        ``[s]``, sorted by ray, depth."""
        block, offset, step = self.block, self.offset, self.step
        k = blocks[:, None] * block + self.ks[None, :]  # [m, block] step indices
        valid = k < self.steps_per_ray[rays, None]
        t = self.near[rays, None] + (k + offset[rays, None]) * step
        pts = self.origins[rays, None, :] + self.dirs[rays, None, :] * t[..., None]
        if self.grid is not None:
            valid = valid & self.grid.occupied(pts.reshape(-1, 3)).reshape(valid.shape)
        rows, cols = torch.nonzero(valid, as_tuple=True)
        return rays[rows], pts[rows, cols], t[rows, cols]

    def one_pass(self, ray_of: Int[Tensor, " m"], block_of: Int[Tensor, " m"]) -> None:
        """Every occupied block of every ray in one packed field call, no early termination. On a GPU the
        per-round host syncs and small launches cost far more than the ~10 % more samples."""
        n = self.origins.shape[0]
        sample_rays, pts, t = self.samples(ray_of, block_of)
        if sample_rays.numel():
            rgb, sigma = _query_chunked(self.query, pts, self.dirs[sample_rays], self.chunk_samples)
            self.evaluated += sample_rays.numel()
            out = composite_packed(sample_rays, t, sigma, rgb, self.step, n, self.trans)
            if self.on_samples is not None:
                self.on_samples(pts, out["weights"])
            self.color, self.depth, self.acc, self.trans = out["rgb"], out["depth"], out["alpha"], out["transmittance"]
            if self.distortion:
                self.dist, _, _ = distortion_terms(sample_rays, t, out["weights"], self.step, n, self.weight_sum,
                                                   self.weighted_t)

    def rounds(self, ray_of: Int[Tensor, " m"], block_of: Int[Tensor, " m"], blocks_per_round: int,
               min_transmittance: float) -> None:
        """``blocks_per_round`` occupied blocks of each ray at a time (``ray_of`` / ``block_of``: the kept
        (ray, block) pairs sorted by ray, then depth); rays whose transmittance fell to ``min_transmittance``
        stop (early termination)."""
        n = self.origins.shape[0]
        counts = torch.bincount(ray_of, minlength=n)
        rank = torch.arange(ray_of.numel(), device=self.origins.device) - (torch.cumsum(counts, 0) - counts)[ray_of]
        for first in range(0, int(counts.max()) if n else 0, blocks_per_round):
            sel = (rank >= first) & (rank < first + blocks_per_round)
            sel &= self.trans[ray_of] > min_transmittance
            rays, blocks = ray_of[sel], block_of[sel]
            if rays.numel() == 0:  # (the masked select syncs anyway: no separate any() round trip)
                break
            self.round(rays, blocks)

    def round(self, rays: Int[Tensor, " m"], blocks: Int[Tensor, " m"]) -> None:
        """March these (ray, block) pairs: one packed field call, composited onto the sums of their rays."""
        sample_rays, pts, t = self.samples(rays, blocks)
        if sample_rays.numel() == 0:
            return
        # Packed per ray: compact the ids of the rays this round touches.
        active, local = torch.unique_consecutive(sample_rays, return_inverse=True)
        rgb, sigma = _query_chunked(self.query, pts, self.dirs[sample_rays], self.chunk_samples)
        self.evaluated += sample_rays.numel()
        out = composite_packed(local, t, sigma, rgb, self.step, active.numel(), self.trans[active])
        if self.on_samples is not None:
            self.on_samples(pts, out["weights"])
        if self.distortion:
            d, w_sum, wt_sum = distortion_terms(local, t, out["weights"], self.step, active.numel(),
                                                self.weight_sum[active], self.weighted_t[active])
            self.dist = self.dist.index_add(0, active, d)
            self.weight_sum = self.weight_sum.index_copy(0, active, w_sum)
            self.weighted_t = self.weighted_t.index_copy(0, active, wt_sum)
        self.color = self.color.index_add(0, active, out["rgb"])
        self.depth = self.depth.index_add(0, active, out["depth"])
        self.acc = self.acc.index_add(0, active, out["alpha"])
        self.trans = self.trans.index_copy(0, active, out["transmittance"])

    def finish(self, background: Float[Tensor, "n 3"], far: Float[Tensor, " n"]) -> dict[str, Tensor]:
        """Close every ray with the background (and its depth at ``far``) by the transmittance left."""
        color = self.color + self.trans[:, None] * background
        depth = self.depth + self.trans * far
        out = {"rgb": color, "depth": depth, "alpha": self.acc, "samples": self.evaluated}
        if self.distortion:
            out["distortion"] = self.dist
        return out


def distortion_terms(ray_indices: Int[Tensor, " m"], t: Float[Tensor, " m"], weights: Float[Tensor, " m"], step: float,
                     n_rays: int, weight_before: Float[Tensor, " n"], weighted_t_before: Float[Tensor, " n"]
                     ) -> tuple[Float[Tensor, " n"], Float[Tensor, " n"], Float[Tensor, " n"]]:
    """The distortion loss of mip-NeRF 360 for packed samples (sorted by ray, then depth) of fixed length ``step``:
    per ray Σ_i,j w_i w_j |t_i − t_j| + ⅓ Σ_i w_i² step, the pair sum as 2 Σ_i w_i (t_i W_<i − S_<i) with W and S
    the weight and weighted-depth sums before sample i — ``weight_before`` / ``weighted_t_before`` carry them from
    samples composited earlier (the marcher's previous rounds). Returns this part's distortion per ray and the
    carried sums after it."""
    w_before = weight_before[ray_indices] + exclusive_ray_scan(ray_indices, weights, n_rays)
    wt_before = weighted_t_before[ray_indices] + exclusive_ray_scan(ray_indices, weights * t, n_rays)
    terms = 2 * weights * (t * w_before - wt_before) + weights.square() * (step / 3)
    zeros = torch.zeros(n_rays, device=t.device, dtype=t.dtype)
    return (zeros.index_add(0, ray_indices, terms), weight_before + zeros.index_add(0, ray_indices, weights),
            weighted_t_before + zeros.index_add(0, ray_indices, weights * t))


def _query_chunked(query, points: Float[Tensor, "m 3"], dirs: Float[Tensor, "m 3"], chunk: int) -> tuple[Tensor, Tensor]:
    """The field on ``chunk`` samples at a time. A tiny MLP on this CPU is memory-bound: its [hidden, chunk]
    activations must stay in cache (16k samples: ~2× faster than one call over a whole frame's samples)."""
    if points.shape[0] <= chunk or torch.is_grad_enabled():
        return query(points, dirs)
    parts = [query(points[i:i + chunk], dirs[i:i + chunk]) for i in range(0, points.shape[0], chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def march_dense(query: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], origins: Float[Tensor, "n 3"],
                dirs: Float[Tensor, "n 3"], near: Float[Tensor, " n"], far: Float[Tensor, " n"],
                background: Float[Tensor, "n 3"], step: float) -> dict[str, Tensor]:
    """The simple reference: every fixed step of every ray evaluated and composited (no culling, no stopping)."""
    from avatar.render.volrend import composite

    n = origins.shape[0]
    count = max(1, int(torch.ceil(((far - near).max() / step)).item())) if n else 1
    t = near[:, None] + (torch.arange(count, device=origins.device) + 0.5) * step  # [n, s]
    inside = t < far[:, None]
    pts = origins[:, None, :] + dirs[:, None, :] * t[..., None]
    rgb, sigma = query(pts.reshape(-1, 3), dirs[:, None, :].expand_as(pts).reshape(-1, 3))
    sigma = sigma.reshape(n, count) * inside
    # Fixed steps: every sample's interval is `step`, as in the culled renderer.
    out = composite(rgb.reshape(n, count, -1), sigma, t, t[:, -1] + step, background)
    depth = out["depth"] - (1 - out["alpha"]) * (t[:, -1] + step) + (1 - out["alpha"]) * far
    return {"rgb": out["rgb"], "depth": depth, "alpha": out["alpha"], "samples": n * count}
