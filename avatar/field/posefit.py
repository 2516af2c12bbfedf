"""Head poses refined by the avatar itself (analysis by synthesis).

The tracker's poses are off by ~2° (median, synthetic subject) and the error is not jitter but a slow bias
that depends on the head's pose and expression: smoothing removes almost none of it, and training the same
field on the true poses instead raised the held-out PSNR from 27.4 to 33.8 dB. A small rigid correction per
frame, learned with the field from the photometric loss (as BARF / NeRF-- do for cameras), makes the
training frames agree with one head; the same correction found for a new frame against the trained avatar
(6 numbers, expression and latent code fixed) is the photometric tracking step that NerFace's Face2Face
tracker performs.

A correction ``delta [6]`` = (rotation vector in radians, translation in units of ``TRANSLATION_UNIT_CM``)
acts in the canonical head frame: ``refined = pose @ correction(delta)``.
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from avatar.field.training import sample_pixels
from avatar.render import rays as ray_utils

# Adam moves a parameter by ~lr per step whatever its units. A rotation of 1e-3 rad moves a point 9 cm from the
# head's centre by 0.09 mm; with translations in units of 10 cm, a step of 1e-3 moves it by 0.1 mm: the two
# kinds of error are corrected at the same pace.
TRANSLATION_UNIT_CM = 10.0


def correction(delta: Float[Tensor, "... 6"]) -> Float[Tensor, "... 4 4"]:
    """Rigid transforms from rotation vectors (Rodrigues, differentiable at 0) and scaled translations."""
    w, t = delta[..., :3], delta[..., 3:] * TRANSLATION_UNIT_CM
    theta2 = (w * w).sum(-1, keepdim=True)[..., None]  # [..., 1, 1]
    zero = torch.zeros_like(w[..., 0])
    k = torch.stack([torch.stack([zero, -w[..., 2], w[..., 1]], -1),
                     torch.stack([w[..., 2], zero, -w[..., 0]], -1),
                     torch.stack([-w[..., 1], w[..., 0], zero], -1)], -2)  # [..., 3, 3]
    small = theta2 < 1e-8
    theta = torch.sqrt(torch.where(small, torch.ones_like(theta2), theta2))
    # sin(θ)/θ and (1 − cos θ)/θ² with their Taylor series near 0 (where the quotients are 0/0).
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / torch.where(small, torch.ones_like(theta2), theta2))
    eye = torch.eye(3, dtype=delta.dtype, device=delta.device).expand_as(k)
    rot = eye + a * k + b * (k @ k)
    out = torch.zeros(*delta.shape[:-1], 4, 4, dtype=delta.dtype, device=delta.device)
    out[..., :3, :3] = rot
    out[..., :3, 3] = t
    out[..., 3, 3] = 1.0
    return out


def apply(pose: Float[Tensor, "... 4 4"], delta: Float[Tensor, "... 6"]) -> Float[Tensor, "... 4 4"]:
    """The refined head pose (canonical → camera)."""
    return pose @ correction(delta)


def delta_size(delta: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: rotation in degrees and translation in cm of corrections ``[f, 6]``."""
    d = np.asarray(delta.detach().cpu() if torch.is_tensor(delta) else delta, dtype=np.float64).reshape(-1, 6)
    return np.degrees(np.linalg.norm(d[:, :3], axis=1)), np.linalg.norm(d[:, 3:], axis=1) * TRANSLATION_UNIT_CM


def refine_frame_pose(render_fn, pose: Float[Tensor, "4 4"], image: Float[Tensor, "h w 3"],
                      intrinsics: Float[Tensor, "4"], box_min: Tensor, box_max: Tensor,
                      box: np.ndarray | None = None, iterations: int = 60, rays: int = 2048, lr: float = 3e-3,
                      seed: int = 0) -> tuple[Float[Tensor, "4 4"], Float[Tensor, "6"]]:
    """Fit one frame's pose correction to its image with the avatar held fixed.

    ``render_fn(rays_dict, pixels [n, 2]) → rgb [n, 3]`` renders this frame's expression and latent code (with
    gradients to the ray origins and directions). Rays are drawn from ``box`` (``[x0, y0, x1, y1]``, where the
    head is; the whole image if None), the learning rate falls 10× over the iterations. Returns the refined
    pose and its correction.
    """
    device = pose.device
    h, w = image.shape[:2]
    rng = np.random.default_rng(seed)
    box = np.array([0, 0, w, h]) if box is None else np.asarray(box)
    delta = torch.zeros(6, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    for it in range(iterations):
        for group in opt.param_groups:
            group["lr"] = lr * 0.1 ** (it / max(1, iterations))
        px = torch.from_numpy(sample_pixels(rng, rays, box, w, h, inside_fraction=1.0)).to(device)
        ray = ray_utils.frame_rays(px, intrinsics, apply(pose, delta), box_min, box_max)
        loss = torch.mean((render_fn(ray, px) - image[px[:, 1], px[:, 0]]) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    delta = delta.detach()
    return apply(pose, delta), delta
