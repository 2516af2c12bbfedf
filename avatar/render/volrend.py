"""Sampling along rays and volume rendering with the background as the last sample (pure functions).

NerFace closes every ray with the static background: after the field's samples, whatever transmittance is
left goes to the background image's colour at that pixel, so the field learns the foreground/background
split by itself and the accumulated alpha is the foreground mask.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def stratified_samples(near: Float[Tensor, " n"], far: Float[Tensor, " n"], count: int,
                       perturb: bool) -> Float[Tensor, "n s"]:
    """``count`` depths per ray between near and far: bin centres, or jittered within bins when training."""
    steps = torch.linspace(0.0, 1.0, count + 1, device=near.device)
    lower, upper = steps[:-1], steps[1:]
    if perturb:
        u = torch.rand(near.shape[0], count, device=near.device)
    else:
        u = torch.full((near.shape[0], count), 0.5, device=near.device)
    frac = lower + (upper - lower) * u
    return near[:, None] + (far - near)[:, None] * frac


def importance_samples(t_coarse: Float[Tensor, "n s"], weights: Float[Tensor, "n s"], count: int,
                       perturb: bool) -> Float[Tensor, "n k"]:
    """Inverse-CDF samples from the piecewise-constant pdf of the coarse weights (NeRF's hierarchical sampling)."""
    mids = 0.5 * (t_coarse[:, 1:] + t_coarse[:, :-1])  # [n, s-1] bin edges between samples
    w = weights[:, 1:-1].detach() + 1e-5  # [n, s-2] one weight per inner bin
    pdf = w / w.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, -1)], -1)  # [n, s-1]
    if perturb:
        u = torch.rand(cdf.shape[0], count, device=cdf.device)
    else:
        u = torch.linspace(0.0, 1.0, count, device=cdf.device).expand(cdf.shape[0], count)
    u = u.contiguous()
    idx = torch.searchsorted(cdf, u, right=True)
    below = (idx - 1).clamp(0, cdf.shape[-1] - 1)
    above = idx.clamp(0, cdf.shape[-1] - 1)
    cdf_b, cdf_a = cdf.gather(1, below), cdf.gather(1, above)
    bin_b, bin_a = mids.gather(1, below), mids.gather(1, above)
    denom = torch.where(cdf_a - cdf_b < 1e-5, torch.ones_like(cdf_a), cdf_a - cdf_b)
    return (bin_b + (u - cdf_b) / denom * (bin_a - bin_b)).detach()


def composite(rgb: Float[Tensor, "n s 3"], sigma: Float[Tensor, "n s"], t: Float[Tensor, "n s"],
              far: Float[Tensor, " n"], background: Float[Tensor, "n 3"]) -> dict[str, Tensor]:
    """Alpha-composite samples front to back, then the background with the remaining transmittance.

    Returns per ray ``rgb [n, 3]``, ``depth [n]`` (expected depth of the foreground, far where empty),
    ``alpha [n]`` (accumulated foreground opacity = the mask) and ``weights [n, s]``.
    """
    deltas = torch.cat([t[:, 1:] - t[:, :-1], (far[:, None] - t[:, -1:]).clamp_min(0.0)], -1)
    alpha = 1.0 - torch.exp(-sigma.clamp_min(0.0) * deltas)
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha + 1e-10], -1), -1)
    weights = alpha * trans[:, :-1]  # [n, s]
    remaining = trans[:, -1]  # [n] what reaches the background
    acc = weights.sum(-1)
    color = (weights[..., None] * rgb).sum(1) + remaining[:, None] * background
    depth = (weights * t).sum(-1) + remaining * far
    return {"rgb": color, "depth": depth, "alpha": acc, "weights": weights}
