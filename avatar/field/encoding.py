"""Input encodings shared by the fields: NeRF's positional encoding and degree-2 spherical harmonics.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor


def positional_encoding(x: Float[Tensor, "n d"], frequencies: int) -> Float[Tensor, "n e"]:
    """``[x, sin(2^k π x), cos(2^k π x)]`` for k < frequencies: e = d (1 + 2 frequencies)."""
    scales = (2.0 ** torch.arange(frequencies, device=x.device, dtype=x.dtype)) * math.pi
    angles = (x[..., None, :] * scales[:, None]).reshape(*x.shape[:-1], -1)
    return torch.cat([x, torch.sin(angles), torch.cos(angles)], -1)


def spherical_harmonics_deg2(dirs: Float[Tensor, "n 3"]) -> Float[Tensor, "n 9"]:
    """Real spherical harmonics up to degree 2 of unit directions (cheap view-dependence)."""
    x, y, z = dirs.unbind(-1)
    return torch.stack([torch.full_like(x, 0.2821), 0.4886 * y, 0.4886 * z, 0.4886 * x, 1.0925 * x * y,
                        1.0925 * y * z, 0.3154 * (3 * z * z - 1), 1.0925 * x * z, 0.5463 * (x * x - y * y)], -1)
