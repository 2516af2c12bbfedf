"""Rays: pixels → camera-space rays → the head's canonical space (pure functions on tensors).

The camera is fixed and the head moves, so a frame's rays are moved into canonical space by the inverse
of its head pose (OpenGL camera, see :mod:`avatar.camera`). Near/far come from the head's bounding box.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor


def pixel_grid(width: int, height: int, device: torch.device | str = "cpu") -> Int[Tensor, "n 2"]:
    """All pixel coordinates ``(x, y)`` of a W×H image, row-major."""
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)


def camera_directions(pixels: Float[Tensor, "n 2"], intrinsics: Float[Tensor, "4"]) -> Float[Tensor, "n 3"]:
    """Directions through pixel centres in camera space (OpenGL: −z forward), z component −1."""
    fx, fy, cx, cy = intrinsics.unbind(-1)
    x = (pixels[:, 0] + 0.5 - cx) / fx
    y = -(pixels[:, 1] + 0.5 - cy) / fy
    return torch.stack([x, y, -torch.ones_like(x)], -1)


def unit_directions(dirs: Float[Tensor, "n 3"]) -> Float[Tensor, "n 3"]:
    """Each direction scaled to length 1."""
    return dirs / dirs.norm(dim=-1, keepdim=True)


def rays_to_canonical(dirs_cam: Float[Tensor, "n 3"], head_pose: Float[Tensor, "4 4"]
                      ) -> tuple[Float[Tensor, "n 3"], Float[Tensor, "n 3"]]:
    """Camera rays (from the camera centre, *unit* directions) → canonical-space origins and unit directions.
    Normalised before the rotation (which keeps lengths), so a fixed camera's unit directions are made once."""
    inv_rot = head_pose[:3, :3].T
    origin = -inv_rot @ head_pose[:3, 3]
    dirs = dirs_cam @ inv_rot.T
    return origin.expand_as(dirs), dirs


def intersect_box(origins: Float[Tensor, "n 3"], dirs: Float[Tensor, "n 3"], box_min: Float[Tensor, "3"],
                  box_max: Float[Tensor, "3"]) -> tuple[Float[Tensor, " n"], Float[Tensor, " n"], Tensor]:
    """Slab test: (near, far, hit) of each ray with an axis-aligned box. Missing rays get near = far."""
    inv = 1.0 / torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0 = (box_min - origins) * inv
    t1 = (box_max - origins) * inv
    (lx, ly, lz), (hx, hy, hz) = torch.minimum(t0, t1).unbind(-1), torch.maximum(t0, t1).unbind(-1)
    # (chained over the three axes: a reduction over a last dimension of 3 took ~twice as long)
    near = torch.maximum(torch.maximum(lx, ly), lz).clamp_min(0.0)
    far = torch.minimum(torch.minimum(hx, hy), hz)
    hit = far > near
    far = torch.where(hit, far, near)
    return near, far, hit


def frame_rays(pixels: Float[Tensor, "n 2"], intrinsics: Float[Tensor, "4"], head_pose: Float[Tensor, "4 4"],
               box_min: Float[Tensor, "3"], box_max: Float[Tensor, "3"],
               camera: Float[Tensor, "n 3"] | None = None) -> dict[str, Tensor]:
    """Everything a renderer needs for some pixels of one frame: canonical origins/dirs, near, far. ``camera``:
    the pixels' unit camera-space directions, where a renderer keeps them from frame to frame
    (``unit_directions(camera_directions(pixels, intrinsics))``)."""
    if camera is None:
        camera = unit_directions(camera_directions(pixels.float(), intrinsics))
    origins, dirs = rays_to_canonical(camera, head_pose)
    near, far, hit = intersect_box(origins, dirs, box_min, box_max)
    return {"origins": origins, "dirs": dirs, "near": near, "far": far, "hit": hit}
