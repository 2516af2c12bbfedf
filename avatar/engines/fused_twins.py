"""Plain-torch twins of the fused engine's numba kernels (:mod:`avatar.engines.fused_kernels`).

Each twin computes what its kernel computes, written the obvious way (every step of every ray, padded per-ray
layouts, the field's own lookup and activations from :mod:`avatar.field.fast`) rather than fast. They are pure
functions: the kernels write into buffers, the twins return new tensors. Depths and transmittances are float64
here, as in the kernels. ``n`` counts rays, ``a`` the active rays of a round, ``m`` its planned samples.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from avatar.field.fast import colour_activation, density_activation, triplane_lookup, unit_points


def ray_steps(near: Float[Tensor, " n"], far: Float[Tensor, " n"], step: float) -> Int[Tensor, " n"]:
    """Fixed steps per ray: the ``k`` with ``near + (k + ½)·step < far``."""
    return torch.ceil((far - near).double() / step - 0.5).long()


def step_depths(near: Float[Tensor, " n"], k: Int[Tensor, "*s"], step: float) -> Float[Tensor, "*s"]:
    """Depth of step ``k`` of each ray, ``near + (k + ½)·step`` (``near`` broadcast against ``k``)."""
    return near.double() + (k.double() + 0.5) * step


def plan_round(origins: Float[Tensor, "n 3"], dirs: Float[Tensor, "n 3"], near: Float[Tensor, " n"],
               far: Float[Tensor, " n"], active: Int[Tensor, " a"], kpos: Int[Tensor, " n"], step: float, most: int,
               occupied: Bool[Tensor, "g g g"], box_min: Float[Tensor, " 3"], cells_per_cm: Float[Tensor, " 3"]
               ) -> tuple[Int[Tensor, "a most"], Int[Tensor, " a"], Int[Tensor, " n"]]:
    """Twin of ``_plan_round``: per active ray, the step indices (from ``kpos``) of its next ≤ ``most`` samples
    in occupied cells (``out_k``, padded with -1; ``out_n`` of them), found by testing every step. Returns also
    the advanced ``kpos``: one past the last sample taken when ``most`` were taken, else the ray's step count
    (the kernel may jump past that; both mean the ray is done)."""
    steps = ray_steps(near[active], far[active], step)  # [a]
    k = torch.arange(int(steps.max()) if active.numel() else 0, device=origins.device)[None, :]  # [1, s]
    t = step_depths(near[active][:, None], k, step)  # [a, s]
    pts = origins[active].double()[:, None, :] + dirs[active].double()[:, None, :] * t[..., None]
    g = occupied.shape[0]
    cell = ((pts - box_min.double()) * cells_per_cm.double()).long().clamp(0, g - 1)  # int() truncates, as .long()
    hit = occupied[cell[..., 0], cell[..., 1], cell[..., 2]] & (k < steps[:, None]) & (k >= kpos[active][:, None])
    taken = hit & (torch.cumsum(hit, 1) <= most)
    out_n = taken.sum(1)
    out_k = torch.full((active.numel(), most), -1, dtype=torch.long, device=origins.device)
    out_k[torch.arange(most)[None, :] < out_n[:, None]] = k.expand_as(taken)[taken]
    last = out_k.gather(1, (out_n - 1).clamp_min(0)[:, None])[:, 0]
    new_kpos = kpos.clone()
    new_kpos[active] = torch.where(out_n == most, last + 1, steps)
    return out_k, out_n, new_kpos


def pack(active: Int[Tensor, " a"], out_k: Int[Tensor, "a most"], out_n: Int[Tensor, " a"]
         ) -> tuple[Int[Tensor, " m"], Int[Tensor, " m"]]:
    """Twin of ``_pack``: the planned samples as rows in ray order, each row's ray and step index."""
    taken = torch.arange(out_k.shape[1])[None, :] < out_n[:, None]
    return torch.repeat_interleave(active, out_n), out_k[taken]


def gather(origins: Float[Tensor, "n 3"], dirs: Float[Tensor, "n 3"], near: Float[Tensor, " n"],
           row_ray: Int[Tensor, " m"], row_k: Int[Tensor, " m"], step: float, planes: Float[Tensor, "3 r r ch"],
           center: Float[Tensor, " 3"], half_extent: Float[Tensor, " 3"]) -> Float[Tensor, "m features"]:
    """Twin of ``_gather``: the tri-plane features of the rows' samples through the field's own lookup
    (:func:`avatar.field.fast.triplane_lookup`), planes laid out channels-last as the kernel takes them."""
    t = step_depths(near[row_ray], row_k, step)
    points = (origins[row_ray].double() + dirs[row_ray].double() * t[:, None]).float()
    p = unit_points(points, center, half_extent)
    return triplane_lookup(planes.permute(0, 3, 1, 2), p).T


def _round_weights(active: Int[Tensor, " a"], out_k: Int[Tensor, "a most"], out_n: Int[Tensor, " a"],
                   raw_density: Float[Tensor, " m"], step: float, trans: Float[Tensor, " n"], min_transmittance: float
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """One round's compositing weights ``[a, most]`` (padded with 0), the rows ``[a, most]`` of each (clamped) and
    each active ray's transmittance after the round ``[a]``: front to back, no sample taken after the first that
    left a ray's transmittance below ``min_transmittance``."""
    most = out_k.shape[1]
    j = torch.arange(most)[None, :]
    valid = j < out_n[:, None]  # [a, most]
    rows = ((torch.cumsum(out_n, 0) - out_n)[:, None] + j).clamp(max=max(raw_density.shape[0] - 1, 0))
    alpha = torch.where(valid, 1.0 - torch.exp(-density_activation(raw_density.double()[rows]) * step), 0.0)
    start = trans[active].double()[:, None]
    after = start * torch.cumprod(1.0 - alpha, 1)  # transmittance after each sample
    before = torch.cat([start, after[:, :-1]], 1)
    keep = valid & ((j == 0) | (before >= min_transmittance))
    w = torch.where(keep, before * alpha, 0.0)
    return w, rows, start[:, 0] * torch.where(keep, 1.0 - alpha, 1.0).prod(1)


def composite(active: Int[Tensor, " a"], out_k: Int[Tensor, "a most"], out_n: Int[Tensor, " a"],
              near: Float[Tensor, " n"], step: float, raw: Float[Tensor, "m 4"], view_rgb: Float[Tensor, "n 3"],
              color: Float[Tensor, "n 3"], depth: Float[Tensor, " n"], trans: Float[Tensor, " n"],
              min_transmittance: float) -> tuple[Float[Tensor, "n 3"], Float[Tensor, " n"], Float[Tensor, " n"]]:
    """Twin of ``_composite``: one round's samples (``raw`` rows in ray order, ``out_n`` per active ray) composited
    front to back onto ``color``, ``depth`` and ``trans`` with the field's activations; a ray takes no sample
    after the first that left its transmittance below ``min_transmittance``. Returns the three, updated."""
    w, rows, after = _round_weights(active, out_k, out_n, raw[:, 0], step, trans, min_transmittance)
    rgb = colour_activation(raw.double()[rows][..., 1:] + view_rgb[active].double()[:, None, :])
    t = step_depths(near[active][:, None], out_k, step)
    color, depth, trans = color.clone(), depth.clone(), trans.clone()
    color[active] += (w[..., None] * rgb).sum(1).float()
    depth[active] += (w * t).sum(1).float()
    trans[active] = after.float()
    return color, depth, trans


def composite_features(active: Int[Tensor, " a"], out_k: Int[Tensor, "a most"], out_n: Int[Tensor, " a"],
                       near: Float[Tensor, " n"], step: float, raw: Float[Tensor, "m 1"], feats: Float[Tensor, "m f"],
                       feature_sum: Float[Tensor, "n f"], depth: Float[Tensor, " n"], trans: Float[Tensor, " n"],
                       min_transmittance: float) -> tuple[Float[Tensor, "n f"], Float[Tensor, " n"], Float[Tensor, " n"]]:
    """One round's samples' features composited onto ``feature_sum`` as :func:`composite` composites colours (for
    :func:`march_deferred`)."""
    w, rows, after = _round_weights(active, out_k, out_n, raw[:, 0], step, trans, min_transmittance)
    t = step_depths(near[active][:, None], out_k, step)
    feature_sum, depth, trans = feature_sum.clone(), depth.clone(), trans.clone()
    feature_sum[active] += (w[..., None] * feats.double()[rows]).sum(1).float()
    depth[active] += (w * t).sum(1).float()
    trans[active] = after.float()
    return feature_sum, depth, trans


def march_deferred(origins: Float[Tensor, "n 3"], dirs: Float[Tensor, "n 3"], near: Float[Tensor, " n"],
                   far: Float[Tensor, " n"], rays: Int[Tensor, " h"], step: float, occupied: Bool[Tensor, "g g g"],
                   box_min: Float[Tensor, " 3"], cells_per_cm: Float[Tensor, " 3"], planes: Float[Tensor, "3 r r ch"],
                   center: Float[Tensor, " 3"], half_extent: Float[Tensor, " 3"], w_density: Float[Tensor, " f"],
                   b_density: float, min_transmittance: float, weight: Float[Tensor, "d f"] | None = None,
                   bias: Float[Tensor, " d"] | None = None, out_weight: Float[Tensor, " d"] | None = None
                   ) -> tuple[Float[Tensor, "h f"], Float[Tensor, " h"], Float[Tensor, " h"]]:
    """Twin of ``_march_deferred``, from the twins above: every occupied step of each ray (:func:`plan_round` with
    room for all of them), their features (:func:`gather`) and density logits (``w_density · f + b_density``, plus
    ``out_weight · relu(weight f + bias)`` for a hidden layer, applied to the features as the field does),
    composited front to back as one round (:func:`composite_features`). Returns the rays' ``feature_sum``,
    ``alpha`` and ``depth``."""
    n = origins.shape[0]
    most = max(int(ray_steps(near[rays], far[rays], step).max()) if rays.numel() else 1, 1)
    out_k, out_n, _ = plan_round(origins, dirs, near, far, rays, torch.zeros(n, dtype=torch.long), step, most,
                                 occupied, box_min, cells_per_cm)
    row_ray, row_k = pack(rays, out_k, out_n)
    feats = gather(origins, dirs, near, row_ray, row_k, step, planes, center, half_extent)
    raw = feats.double() @ w_density.double() + b_density
    if weight is not None:
        raw = raw + torch.relu(feats.double() @ weight.double().T + bias.double()) @ out_weight.double()
    raw = raw.float()[:, None]
    feature_sum, depth, trans = composite_features(rays, out_k, out_n, near, step, raw, feats,
                                                   torch.zeros(n, feats.shape[1]), torch.zeros(n), torch.ones(n),
                                                   min_transmittance)
    return feature_sum[rays], 1.0 - trans[rays], depth[rays] + trans[rays] * far[rays]
