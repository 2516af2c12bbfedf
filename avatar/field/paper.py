"""The paper's field, ``NerfaceField``: the MLP D(p, v, δ, γ) with positional encoding of the point (10
frequencies) and of the view direction (4), conditioned on the expression δ and the per-frame latent code γ;
8 × 256 ReLU layers with a skip connection, a density head, and a 4-layer 128-wide colour branch that sees the
encoded view direction.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from avatar.field.encoding import positional_encoding


class NerfaceField(nn.Module):
    """The paper's dynamic radiance field.

    The conditioning vector ``[δ, γ]`` is the same for every sample of a frame, so its share of the first
    and skip layers is computed once per call and added as a bias — the same function as concatenating it
    to every sample, at a fraction of the cost.
    """

    def __init__(self, box_min: list[float], box_max: list[float], expression_dim: int = 52,
                 latent_dim: int = 32, width: int = 256, depth: int = 8, skip: int = 4, pos_freqs: int = 10,
                 dir_freqs: int = 4, color_width: int = 128, color_depth: int = 4):
        super().__init__()
        self.hparams = dict(box_min=list(map(float, box_min)), box_max=list(map(float, box_max)),
                            expression_dim=expression_dim, latent_dim=latent_dim, width=width, depth=depth,
                            skip=skip, pos_freqs=pos_freqs, dir_freqs=dir_freqs, color_width=color_width,
                            color_depth=color_depth)
        lo, hi = torch.tensor(box_min, dtype=torch.float32), torch.tensor(box_max, dtype=torch.float32)
        # Points are mapped to [-1, 1] over the head box before encoding (cm would alias the frequencies).
        self.register_buffer("center", (lo + hi) / 2, persistent=False)
        self.register_buffer("half_extent", (hi - lo) / 2, persistent=False)
        self.pos_freqs, self.dir_freqs, self.skip = pos_freqs, dir_freqs, skip
        pos_dim = 3 * (1 + 2 * pos_freqs)
        dir_dim = 3 * (1 + 2 * dir_freqs)
        cond_dim = expression_dim + latent_dim
        self.layers = nn.ModuleList()
        for i in range(depth):
            in_dim = pos_dim if i == 0 else width + (pos_dim if i == skip else 0)
            self.layers.append(nn.Linear(in_dim, width))
        self.cond_in = nn.Linear(cond_dim, width, bias=False)  # conditioning into layer 0
        self.cond_skip = nn.Linear(cond_dim, width, bias=False)  # and again at the skip layer
        self.density = nn.Linear(width, 1)
        self.feature = nn.Linear(width, width)
        color: list[nn.Module] = []
        in_dim = width + dir_dim
        for _ in range(color_depth - 1):
            color += [nn.Linear(in_dim, color_width), nn.ReLU()]
            in_dim = color_width
        color.append(nn.Linear(in_dim, 3))
        self.color = nn.Sequential(*color)

    def forward(self, points: Float[Tensor, "n 3"], dirs: Float[Tensor, "n 3"],
                condition: Float[Tensor, " c"]) -> tuple[Float[Tensor, "n 3"], Float[Tensor, " n"]]:
        """Canonical points (cm), unit view directions and one frame's ``[expression, latent]`` → rgb, density ≥ 0 (1/cm)."""
        p = positional_encoding((points - self.center) / self.half_extent, self.pos_freqs)
        h = p
        for i, layer in enumerate(self.layers):
            if i == self.skip:
                h = torch.cat([h, p], -1)
            h = layer(h)
            if i == 0:
                h = h + self.cond_in(condition)
            elif i == self.skip:
                h = h + self.cond_skip(condition)
            h = torch.relu(h)
        # Shifted softplus instead of the paper's ReLU: a ReLU density head that starts negative everywhere
        # never receives a gradient (the whole image stays background); softplus always does.
        sigma = torch.nn.functional.softplus(self.density(h)[..., 0] - 1.0)
        rgb = torch.sigmoid(self.color(torch.cat([self.feature(h), positional_encoding(dirs, self.dir_freqs)], -1)))
        return rgb, sigma
