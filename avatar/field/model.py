"""The avatar: coarse and fine fields plus per-frame latent codes, and the one way to render it.

``render_rays`` is the renderer interface the trainer, the evaluator and the offline renderer share:
(rays of one frame, expression, latent code, background) → colour, depth, alpha, coarse and fine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn

from avatar.field.fast import FastField, deferred_composite
from avatar.field.paper import NerfaceField
from avatar.render import rays as ray_utils
from avatar.render import volrend

FIELDS = {"nerface": NerfaceField, "fast": FastField}


@dataclass
class SamplingConfig:
    coarse: int = 64  # nerface: stratified samples per ray for the coarse network
    fine: int = 64  # nerface: extra importance samples for the fine network
    chunk: int = 8192  # rays per forward pass when rendering whole images
    step: float = 0.0  # fast: fixed marching step in cm
    culling: bool = True  # fast: skip empty cells with the occupancy grid (False: the dense reference)
    blocks_per_round: int = 2  # fast: occupied blocks marched per ray between early-termination checks


class Avatar(nn.Module):
    """The fields and a learnable latent code per training frame.

    ``nerface``: two MLP fields (coarse, fine) with hierarchical sampling, as in the paper.
    ``fast``: one expression-blended tri-plane field and an occupancy grid for culled, packed marching.
    """

    def __init__(self, field: str, field_kwargs: dict, num_frames: int, latent_dim: int = 32,
                 occupancy_resolution: int = 64):
        super().__init__()
        if field not in FIELDS:
            raise ValueError(f"unknown field {field!r}; choose from {sorted(FIELDS)}")
        self.field_name = field
        if field == "fast":
            from avatar.render.grid import OccupancyGrid

            self.field = FIELDS[field](latent_dim=latent_dim, **field_kwargs)
            box = self.field.hparams
            self.occupancy = OccupancyGrid(torch.tensor(box["box_min"]), torch.tensor(box["box_max"]),
                                           occupancy_resolution)
        else:
            self.coarse = FIELDS[field](latent_dim=latent_dim, **field_kwargs)
            self.fine = FIELDS[field](latent_dim=latent_dim, **field_kwargs)
        self.latents = nn.Parameter(torch.zeros(num_frames, latent_dim))
        box = self.hparams
        self.register_buffer("box_min", torch.tensor(box["box_min"]), persistent=False)
        self.register_buffer("box_max", torch.tensor(box["box_max"]), persistent=False)

    @property
    def hparams(self) -> dict:
        return (self.field if self.field_name == "fast" else self.coarse).hparams

    def forward(self, rays: dict[str, Tensor], expression: Tensor, frame_index: int, background: Tensor,
                sampling: "SamplingConfig", perturb: bool = True, distortion: bool = False) -> dict[str, Tensor]:
        """Training entry point (what DistributedDataParallel wraps): one frame's rays, its own latent code."""
        return render_rays(self, rays, expression, self.latents[frame_index], background, sampling, perturb,
                           distortion=distortion)


def render_rays(model: Avatar, rays: dict[str, Tensor], expression: Float[Tensor, " e"],
                latent: Float[Tensor, " l"], background: Float[Tensor, "n 3"], sampling: SamplingConfig,
                perturb: bool = False, on_samples=None, distortion: bool = False) -> dict[str, Tensor]:
    """Render the rays of one frame (from :func:`avatar.rays.frame_rays`) through coarse then fine.

    Returns ``rgb [n, 3]``, ``depth [n]``, ``alpha [n]`` of the fine pass and ``rgb_coarse [n, 3]``.
    """
    condition = torch.cat([expression, latent], -1)
    origins, dirs, near, far = rays["origins"], rays["dirs"], rays["near"], rays["far"]
    n = origins.shape[0]
    if model.field_name == "fast":
        from avatar.render.march import march_culled, march_dense

        field = model.field
        planes, bias = field.blend(condition), field.latent_bias(condition)  # once per frame

        def query(points: Tensor, view: Tensor) -> tuple[Tensor, Tensor]:
            return field.decode(planes, bias, points, view)

        # a deferred field composites its features (onto a zero "background") and shades each pixel after
        behind = background.new_zeros(n, field.feature_width) if field.deferred else background
        if sampling.culling:
            out = march_culled(query, model.occupancy, origins, dirs, near, far, behind, sampling.step,
                               blocks_per_round=sampling.blocks_per_round, perturb=perturb, on_samples=on_samples,
                               distortion=distortion)
        else:
            out = march_dense(query, origins, dirs, near, far, behind, sampling.step)
        if field.deferred:
            out["rgb"] = deferred_composite(out["rgb"], out["alpha"], background,
                                            lambda feats, rows: field.shade(feats, dirs[rows], bias))
        return {**out, "planes": planes}  # the frame's blended planes: the trainer's regularisers reuse them

    def run(field: nn.Module, t: Tensor) -> dict[str, Tensor]:
        pts = origins[:, None, :] + dirs[:, None, :] * t[..., None]  # [n, s, 3]
        view = dirs[:, None, :].expand_as(pts)
        rgb, sigma = field(pts.reshape(-1, 3), view.reshape(-1, 3), condition)
        # Rays that miss the head box see only the background.
        sigma = sigma.reshape(n, -1) * rays["hit"][:, None]
        return volrend.composite(rgb.reshape(n, -1, 3), sigma, t, far, background)

    t_coarse = volrend.stratified_samples(near, far, sampling.coarse, perturb)
    coarse = run(model.coarse, t_coarse)
    if sampling.fine > 0:
        t_fine = volrend.importance_samples(t_coarse, coarse["weights"], sampling.fine, perturb)
        t_all, _ = torch.sort(torch.cat([t_coarse, t_fine], -1), -1)
        fine = run(model.fine, t_all)
    else:
        fine = coarse
    return {"rgb": fine["rgb"], "depth": fine["depth"], "alpha": fine["alpha"], "rgb_coarse": coarse["rgb"]}


@torch.no_grad()
def render_image(model: Avatar, head_pose: np.ndarray | Tensor, expression: np.ndarray | Tensor,
                 latent: Tensor, intrinsics: np.ndarray | Tensor, width: int, height: int,
                 background: Float[Tensor, "h w 3"], sampling: SamplingConfig) -> dict[str, Tensor]:
    """Render a whole frame: ``rgb [h, w, 3]``, ``depth [h, w]``, ``alpha [h, w]`` (float in [0, 1])."""
    device = model.box_min.device
    as_t = lambda a: torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a, dtype=torch.float32, device=device)
    pose, expr, k = as_t(head_pose), as_t(expression), as_t(intrinsics)
    pixels = ray_utils.pixel_grid(width, height, device)
    bg = background.reshape(-1, 3).to(device)
    outs: dict[str, list[Tensor]] = {"rgb": [], "depth": [], "alpha": []}
    # A GPU wants the culled marcher's work in few large rounds: a whole frame of the fast field at once.
    chunk = sampling.chunk if device.type == "cpu" or model.field_name != "fast" else max(sampling.chunk, 1 << 18)
    for start in range(0, pixels.shape[0], chunk):
        sl = slice(start, start + chunk)
        rays = ray_utils.frame_rays(pixels[sl], k, pose, model.box_min, model.box_max)
        hit = rays["hit"]
        if model.field_name == "fast" or bool(hit.all()):
            out = render_rays(model, rays, expr, latent.to(device), bg[sl], sampling, perturb=False)
        else:
            # Rays that miss the head box see only the background: the MLP field skips them (the fast field's
            # marcher never samples them anyway), as the live engines do.
            out = {"rgb": bg[sl].clone(), "depth": rays["far"].clone(), "alpha": torch.zeros_like(rays["far"])}
            if bool(hit.any()):
                inner = render_rays(model, {key: value[hit] for key, value in rays.items()}, expr, latent.to(device),
                                    bg[sl][hit], sampling, perturb=False)
                for key in out:
                    out[key][hit] = inner[key]
        for key in outs:
            outs[key].append(out[key])
    return {
        "rgb": torch.cat(outs["rgb"]).reshape(height, width, 3),
        "depth": torch.cat(outs["depth"]).reshape(height, width),
        "alpha": torch.cat(outs["alpha"]).reshape(height, width),
    }


def normals_from_depth(depth: Float[Tensor, "h w"], intrinsics: np.ndarray) -> Float[Tensor, "h w 3"]:
    """Camera-space normals from a depth map (finite differences of back-projected points), in [-1, 1]."""
    h, w = depth.shape
    fx, fy, cx, cy = [float(v) for v in intrinsics]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=depth.dtype), torch.arange(w, dtype=depth.dtype), indexing="ij")
    pts = torch.stack([(xs + 0.5 - cx) / fx * depth, -(ys + 0.5 - cy) / fy * depth, -depth], -1)
    dx = torch.zeros_like(pts)
    dy = torch.zeros_like(pts)
    dx[:, 1:-1] = pts[:, 2:] - pts[:, :-2]
    dy[1:-1] = pts[:-2] - pts[2:]
    n = torch.cross(dx, dy, dim=-1)
    return n / n.norm(dim=-1, keepdim=True).clamp_min(1e-8)
