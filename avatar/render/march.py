"""The packed, culled renderer and its dense reference.

The culled renderer marches fixed steps along each ray in blocks: one lookup in a coarse grid skips a whole
empty block, the remaining steps are culled with the fine grid, the field is evaluated only at samples in
occupied cells (packed, addressed by ray index), and rays whose transmittance is negligible stop (early
termination). The background closes every ray, as in the dense renderer. Also the distortion loss's terms
over packed samples.
"""

from __future__ import annotations

import math
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
    color = torch.zeros(n_rays, 3, device=t.device, dtype=rgb.dtype).index_add_(0, ray_indices, weights[:, None] * rgb)
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

    ``query(points [m, 3], dirs [m, 3]) → (rgb [m, 3], sigma [m])`` is the field for this frame. With
    ``grid=None`` nothing is culled (rays still terminate early). ``on_samples(points, weights)`` sees every
    evaluated sample (for visibility carving). Returns ``rgb``, ``depth``, ``alpha`` per ray and the number
    of field samples evaluated (``samples``). ``chunk_samples``: samples per field call (default: per device,
    small on a CPU for its caches, large on a GPU for few launches). ``plan``: this frame's :func:`block_plan`
    when the caller made it already (the engines make it inside a CUDA graph). ``distortion``: also return each
    ray's distortion (:func:`distortion_terms`, mip-NeRF 360), a training loss that gathers a ray's weight into
    as few samples as possible.
    """
    n = origins.shape[0]
    device = origins.device
    chunk_samples = chunk_samples or chunk_for(device)
    color = torch.zeros(n, 3, device=device)
    depth = torch.zeros(n, device=device)
    acc = torch.zeros(n, device=device)
    trans = torch.ones(n, device=device)
    dist = weight_sum = weighted_t = torch.zeros(n, device=device)
    evaluated = 0
    if plan is None:
        plan = block_plan(grid, origins, dirs, near, far, step, perturb)
    offset, steps_per_ray, keep, block = plan["offset"], plan["steps_per_ray"], plan["keep"], plan["block"]
    if keep.shape[1] > 0:
        ray_of, block_of = torch.nonzero(keep, as_tuple=True)  # sorted by ray, then depth
        ks = torch.arange(block, device=device)

        def samples(rays: Tensor, blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            """The occupied steps of these (ray, block) pairs: their rays, points and depths, sorted by ray, depth."""
            k = blocks[:, None] * block + ks[None, :]  # [m, block] step indices
            valid = k < steps_per_ray[rays, None]
            t = near[rays, None] + (k + offset[rays, None]) * step
            pts = origins[rays, None, :] + dirs[rays, None, :] * t[..., None]
            if grid is not None:
                valid = valid & grid.occupied(pts.reshape(-1, 3)).reshape(valid.shape)
            rows, cols = torch.nonzero(valid, as_tuple=True)
            return rays[rows], pts[rows, cols], t[rows, cols]

        if blocks_per_round <= 0:
            # One pass: every occupied block of every ray in one packed field call, no early termination. On a
            # GPU the per-round host syncs and small launches cost far more than the ~10 % more samples.
            sample_rays, pts, t = samples(ray_of, block_of)
            if sample_rays.numel():
                rgb, sigma = _query_chunked(query, pts, dirs[sample_rays], chunk_samples)
                evaluated += sample_rays.numel()
                out = composite_packed(sample_rays, t, sigma, rgb, step, n, trans)
                if on_samples is not None:
                    on_samples(pts, out["weights"])
                color, depth, acc, trans = out["rgb"], out["depth"], out["alpha"], out["transmittance"]
                if distortion:
                    dist, _, _ = distortion_terms(sample_rays, t, out["weights"], step, n, weight_sum, weighted_t)
        else:
            counts = torch.bincount(ray_of, minlength=n)
            rank = torch.arange(ray_of.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[ray_of]
            for first in range(0, int(counts.max()) if n else 0, blocks_per_round):
                sel = (rank >= first) & (rank < first + blocks_per_round)
                sel &= trans[ray_of] > min_transmittance
                rays, blocks = ray_of[sel], block_of[sel]
                if rays.numel() == 0:  # (the masked select syncs anyway: no separate any() round trip)
                    break
                sample_rays, pts, t = samples(rays, blocks)
                if sample_rays.numel() == 0:
                    continue
                # Packed per ray: compact the ids of the rays this round touches.
                active, local = torch.unique_consecutive(sample_rays, return_inverse=True)
                rgb, sigma = _query_chunked(query, pts, dirs[sample_rays], chunk_samples)
                evaluated += sample_rays.numel()
                out = composite_packed(local, t, sigma, rgb, step, active.numel(), trans[active])
                if on_samples is not None:
                    on_samples(pts, out["weights"])
                if distortion:
                    d, w_sum, wt_sum = distortion_terms(local, t, out["weights"], step, active.numel(),
                                                        weight_sum[active], weighted_t[active])
                    dist = dist.index_add(0, active, d)
                    weight_sum = weight_sum.index_copy(0, active, w_sum)
                    weighted_t = weighted_t.index_copy(0, active, wt_sum)
                color = color.index_add(0, active, out["rgb"])
                depth = depth.index_add(0, active, out["depth"])
                acc = acc.index_add(0, active, out["alpha"])
                trans = trans.index_copy(0, active, out["transmittance"])
    color = color + trans[:, None] * background
    depth = depth + trans * far
    out = {"rgb": color, "depth": depth, "alpha": acc, "samples": evaluated}
    if distortion:
        out["distortion"] = dist
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
    out = composite(rgb.reshape(n, count, 3), sigma, t, t[:, -1] + step, background)
    depth = out["depth"] - (1 - out["alpha"]) * (t[:, -1] + step) + (1 - out["alpha"]) * far
    return {"rgb": out["rgb"], "depth": depth, "alpha": out["alpha"], "samples": n * count}
