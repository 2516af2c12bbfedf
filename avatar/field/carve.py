"""Occupancy carving after training: keep the cells that training rays saw, over the training expressions,
and measure what culling costs in PSNR.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from avatar.field.model import Avatar, SamplingConfig, render_image, render_rays
from avatar.render import rays as ray_utils


@torch.no_grad()
def carve_occupancy(model: Avatar, head_poses: Float[Tensor, "f 4 4"], expressions: Float[Tensor, "f e"],
                    latents: Float[Tensor, "f l"], intrinsics: Float[Tensor, "4"], width: int, height: int,
                    sampling: SamplingConfig, passes: int = 2) -> tuple[float, float]:
    """Render these frames (jittered steps, ``passes`` times) and carve the occupancy grid down to the cells
    their rays saw (see :meth:`avatar.occupancy.OccupancyGrid.carve`). Returns the occupied fraction before
    and after."""
    device = model.box_min.device
    pixels = ray_utils.pixel_grid(width, height, device)
    grid = model.occupancy
    for _ in range(passes):
        for pose, expr, latent in zip(head_poses, expressions, latents):
            for start in range(0, pixels.shape[0], sampling.chunk):
                rays = ray_utils.frame_rays(pixels[start:start + sampling.chunk], intrinsics, pose, model.box_min,
                                            model.box_max)
                bg = torch.zeros(rays["origins"].shape[0], 3, device=device)
                render_rays(model, rays, expr, latent, bg, sampling, perturb=True, on_samples=grid.record_visibility)
    before = grid.carve()
    return before, grid.occupied_fraction()


@torch.no_grad()
def culling_psnr_gap(model: Avatar, head_poses: Float[Tensor, "f 4 4"], expressions: Float[Tensor, "f e"],
                     latents: Float[Tensor, "f l"], truths: Float[Tensor, "f h w 3"], intrinsics: Float[Tensor, "4"],
                     background: Float[Tensor, "h w 3"], sampling: SamplingConfig,
                     dense_cache: list | None = None) -> float:
    """How much occupancy culling moves the quality: the largest |PSNR(culled) − PSNR(dense reference)| (dB)
    against the true frames. ``dense_cache`` (a list) keeps the dense renders between calls."""
    from dataclasses import replace

    from avatar.base.metrics import psnr

    dense_cfg = replace(sampling, culling=False)
    h, w = truths.shape[1:3]
    worst = 0.0
    for j, (pose, expr, latent, truth) in enumerate(zip(head_poses, expressions, latents, truths)):
        truth = truth.cpu().numpy()
        if dense_cache is not None and j < len(dense_cache):
            dense = dense_cache[j]
        else:
            dense = render_image(model, pose, expr, latent, intrinsics, w, h, background, dense_cfg)["rgb"].cpu().numpy()
            if dense_cache is not None:
                dense_cache.append(dense)
        culled = render_image(model, pose, expr, latent, intrinsics, w, h, background, sampling)["rgb"].cpu().numpy()
        worst = max(worst, abs(psnr(culled, truth) - psnr(dense, truth)))
    return worst
