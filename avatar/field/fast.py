"""The fast field: expression-blended tri-planes decoded by a small MLP.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from avatar.field.encoding import spherical_harmonics_deg2

# Density is ``exp(min(raw, DENSITY_CLAMP) − DENSITY_SHIFT)`` (as instant-ngp): opaque skin needs densities of
# ~10/cm, which exp reaches with small raw values; a softplus/ReLU head would need thousands of steps to grow that
# far. The clamp keeps exp finite. The fused engine's numba kernels take both constants as arguments.
DENSITY_CLAMP = 15.0
DENSITY_SHIFT = 1.0
# The three planes (xy, xz, yz) as (width axis, height axis) of a point in the grid cube.
PLANE_AXES = ((0, 1), (0, 2), (1, 2))
# Deferred shading: a pixel whose accumulated opacity is below this shows the background (times its
# transmittance) and is not shaded: its colour would weigh < 1/4 of a level of 255, and skipping it spares the
# per-pixel MLP on the head box's empty rays. One rule for training and every engine.
SHADE_MIN_ALPHA = 1e-3
SHADINGS = ("volumetric", "deferred")


def density_activation(raw: Float[Tensor, "*s"]) -> Float[Tensor, "*s"]:
    """Density (1/cm, > 0) from the decoder's raw output."""
    return torch.exp(raw.clamp(max=DENSITY_CLAMP) - DENSITY_SHIFT)


def colour_activation(raw: Float[Tensor, "*s"]) -> Float[Tensor, "*s"]:
    """Colour in [0, 1] from the decoder's raw output (view term included)."""
    return torch.sigmoid(raw)


def unit_points(points: Float[Tensor, "n 3"], center: Float[Tensor, " 3"],
                half_extent: Float[Tensor, " 3"]) -> Float[Tensor, "n 3"]:
    """Points (cm) in the grid cube [-1, 1]³; points outside the head box are clamped onto its faces."""
    return ((points - center) / half_extent).clamp(-1.0, 1.0)


def triplane_lookup(planes: Float[Tensor, "3 ch r r"], p: Float[Tensor, "n 3"]) -> Float[Tensor, "features n"]:
    """Bilinear features of unit points ``p`` on the three planes (``grid_sample``, ``align_corners=True``),
    channels-first: row ``plane · ch + channel``."""
    n = p.shape[0]
    coords = torch.stack([p[:, list(axes)] for axes in PLANE_AXES])[:, None]  # [3, 1, n, 2]
    feats = torch.nn.functional.grid_sample(planes, coords, mode="bilinear", align_corners=True)  # [3, ch, 1, n]
    return feats.reshape(-1, n)


def deferred_composite(feature_sum: Float[Tensor, "h f"], alpha: Float[Tensor, " n"],
                       background: Float[Tensor, "n 3"], shade, pixels: Int[Tensor, " h"] | None = None
                       ) -> Float[Tensor, "n 3"]:
    """A deferred-shading field's pixels: ``alpha · shade(features / alpha) + (1 − alpha) · background`` where
    ``alpha ≥`` :data:`SHADE_MIN_ALPHA`, the background times ``1 − alpha`` elsewhere. ``feature_sum`` is each
    ray's compositing-weighted sum of sample features and ``alpha`` the sum of the weights (so ``1 − alpha`` is the
    transmittance left for the background); ``shade(features [m, f], rows [m]) → colour [m, 3]`` is the per-pixel
    MLP on the shaded rays (``rows`` index ``feature_sum``). Dividing by ``alpha`` shades the surface's mean
    feature, so a faint edge gets the colour of its surface, only fainter. ``pixels``: the pixels (rows of
    ``alpha`` and ``background``) that ``feature_sum``'s rows are, where only some rays were marched (the others'
    ``alpha`` is 0); default: every pixel, in order."""
    rgb = (1.0 - alpha)[:, None] * background
    marched = alpha if pixels is None else alpha[pixels]
    rows = torch.nonzero(marched >= SHADE_MIN_ALPHA)[:, 0]
    if rows.numel():
        a = marched[rows]
        colour = shade(feature_sum[rows] / a[:, None], rows)
        rgb = rgb.index_add(0, rows if pixels is None else pixels[rows], a[:, None] * colour)
    return rgb


def plane_gather(planes_cl: Float[Tensor, "3 rr ch"], u: Float[Tensor, "3 n"], v: Float[Tensor, "3 n"],
                 res: int) -> Float[Tensor, "3 n ch"]:
    """Bilinear features of each plane at its own unit coordinates (``u`` along its width, ``v`` its height,
    in [-1, 1]; ``grid_sample``'s numbers with ``align_corners=True``) as four gathers per plane: ONNX Runtime
    has no CPU kernel for GridSample on this build, and is ~7× slower with it where it has."""
    n = u.shape[1]
    fx, fy = (u + 1) * (0.5 * (res - 1)), (v + 1) * (0.5 * (res - 1))
    x0 = torch.floor(fx).clamp(0, res - 2)
    y0 = torch.floor(fy).clamp(0, res - 2)
    wx, wy = (fx - x0)[..., None], (fy - y0)[..., None]  # [3, n, 1]
    base = (torch.arange(3, device=u.device) * (res * res))[:, None]
    i00 = (y0.long() * res + x0.long() + base).reshape(-1)  # [3 n] rows of the flattened planes
    flat = planes_cl.reshape(-1, planes_cl.shape[-1])  # [3 rr, ch]
    ch = flat.shape[1]
    f00 = flat[i00].reshape(3, n, ch)
    f01 = flat[i00 + 1].reshape(3, n, ch)
    f10 = flat[i00 + res].reshape(3, n, ch)
    f11 = flat[i00 + res + 1].reshape(3, n, ch)
    return (f00 + (f01 - f00) * wx) * (1 - wy) + (f10 + (f11 - f10) * wx) * wy  # [3, n, ch]


def triplane_lookup_gather(planes_cl: Float[Tensor, "3 rr ch"], p: Float[Tensor, "n 3"],
                           res: int) -> Float[Tensor, "n features"]:
    """:func:`triplane_lookup` written as four gathers per plane on planes laid out channels-last (the same
    numbers), samples-first: column ``plane · ch + channel``."""
    n = p.shape[0]
    u = torch.stack([p[:, axes[0]] for axes in PLANE_AXES])  # [3, n] width axis of each plane
    v = torch.stack([p[:, axes[1]] for axes in PLANE_AXES])  # [3, n] height axis
    feats = plane_gather(planes_cl, u, v, res)
    return feats.permute(1, 0, 2).reshape(n, 3 * feats.shape[-1])


class FastField(nn.Module):
    """Expression-blended tri-planes decoded by a tiny MLP.

    A neutral tri-plane plus ``bases`` expression tri-planes; one frame's expression is mapped by an affine
    map to ``bases`` weights, and the planes are blended **once per frame** — per sample the cost is three
    bilinear lookups and a 2×64 MLP, whatever the number of bases. Tri-planes use ``grid_sample``, which ONNX
    and TensorRT support.

    The map is either ``fixed`` (``expression_matrix``/``expression_offset`` from
    :func:`avatar.expressions.disentangled_map`: one basis per semantic group such as the jaw, each driven by
    its own scores only — the default, because a learned map ties each basis to whatever co-varied in the
    video) or ``learned`` (initialised with the principal components of the training expressions).
    """

    def __init__(self, box_min: list[float], box_max: list[float], expression_dim: int = 52, latent_dim: int = 32,
                 resolution: int = 128, channels: int = 16, bases: int = 6, hidden: int = 64,
                 expression_mean: list[float] | None = None, expression_components: list[list[float]] | None = None,
                 expression_map: str = "learned", expression_matrix: list[list[float]] | None = None,
                 expression_offset: list[float] | None = None, expression_labels: list[str] | None = None,
                 expression_resolution: int = 0, expression_init_zero: bool = True,
                 expression_low: list[float] | None = None, expression_high: list[float] | None = None,
                 expression_mlp: bool = False, expression_warp: int = 0, shading: str = "volumetric",
                 density_hidden: int = 16, **_ignored):
        super().__init__()
        self.hparams = dict(box_min=list(map(float, box_min)), box_max=list(map(float, box_max)),
                            expression_dim=expression_dim, latent_dim=latent_dim, resolution=resolution,
                            channels=channels, bases=bases, hidden=hidden, expression_map=expression_map,
                            expression_labels=list(expression_labels or []),
                            expression_resolution=int(expression_resolution or resolution),
                            expression_mlp=bool(expression_mlp), expression_warp=int(expression_warp),
                            shading=shading, density_hidden=int(density_hidden))
        if shading not in SHADINGS:
            raise ValueError(f"shading must be one of {SHADINGS}, not {shading!r}")
        if expression_low is not None:  # bounds on the basis weights (see avatar.expressions.weight_limits)
            self.hparams.update(expression_low=list(map(float, expression_low)),
                                expression_high=list(map(float, expression_high)))
            self.register_buffer("weight_low", torch.tensor(expression_low, dtype=torch.float32), persistent=False)
            self.register_buffer("weight_high", torch.tensor(expression_high, dtype=torch.float32), persistent=False)
        else:
            self.weight_low = self.weight_high = None
        if expression_map not in ("learned", "fixed"):
            raise ValueError(f"expression_map must be 'learned' or 'fixed', not {expression_map!r}")
        lo, hi = torch.tensor(box_min, dtype=torch.float32), torch.tensor(box_max, dtype=torch.float32)
        self.register_buffer("center", (lo + hi) / 2, persistent=False)
        self.register_buffer("half_extent", (hi - lo) / 2, persistent=False)
        self.channels, self.bases = channels, bases
        # planes[0] is the neutral face (small random values break the decoder's symmetry); planes[1:] are the
        # expression bases.
        # With a lower expression_resolution the bases live apart (expression_planes), are blended at their own
        # resolution and upsampled once per frame: many bases at the neutral's resolution would not fit a bundle.
        self.expression_resolution = self.hparams["expression_resolution"]
        same = self.expression_resolution == resolution
        self.planes = nn.Parameter(torch.randn(bases + 1 if same else 1, 3, channels, resolution, resolution) * 0.1)
        self.expression_planes = None if same else nn.Parameter(
            torch.zeros(bases, 3, channels, self.expression_resolution, self.expression_resolution))
        with torch.no_grad():
            # Expression bases start at zero: each gets its own gradient (scaled by its own weight), so they need no
            # symmetry breaking, and random values in texels no ray ever trains would show as grain and dark
            # speckles whenever a basis is weighted differently from the training frames (single-group edits).
            self.planes[1:] = 0.0 if expression_init_zero else self.planes[1:] * 0.1
        # Additive bases cross-fade a feature that moves (a jaw that opens shows a ghost chin at half weight); a
        # per-basis 2-D displacement of each neutral plane, blended like the bases and applied once per frame,
        # moves it instead. Coarse (expression_warp² per plane, upsampled): a smooth motion, not new texture.
        # Zero at the start: the field begins as without it.
        self.warp = nn.Parameter(torch.zeros(bases, 3, 2, expression_warp, expression_warp)) if expression_warp else None
        self.expression_map = nn.Linear(expression_dim, bases)
        if expression_components is not None:
            comps = torch.tensor(expression_components, dtype=torch.float32)[:bases]
            mean = torch.tensor(expression_mean, dtype=torch.float32)
            with torch.no_grad():
                self.expression_map.weight.zero_()
                self.expression_map.weight[: comps.shape[0]] = comps
                self.expression_map.bias.copy_(-(comps @ mean) if comps.shape[0] == bases else
                                               torch.cat([-(comps @ mean), torch.zeros(bases - comps.shape[0])]))
        if expression_matrix is not None:
            with torch.no_grad():
                self.expression_map.weight.copy_(torch.tensor(expression_matrix, dtype=torch.float32))
                self.expression_map.bias.copy_(torch.tensor(expression_offset, dtype=torch.float32))
        # A fixed map stays what it was built to be (it is in the state dict, so bundles carry it).
        self.expression_map.requires_grad_(expression_map == "learned")
        self.layer1 = nn.Linear(3 * channels, hidden)
        self.latent_in = nn.Linear(latent_dim, hidden, bias=False)
        # NerFace feeds the expression to its MLP's first layer beside the sample's features: a per-frame bias, so
        # it costs nothing per sample here (it joins the latent code's share). It lets an expression change the
        # decoding non-linearly (a mouth's inside, a fold) where the bases can only add features. It takes the
        # basis weights, not the 52 scores: one bounded, disentangled number per group, as the planes do.
        # Zero at the start: the field begins as it did without it.
        self.expression_in = None
        if expression_mlp:
            self.expression_in = nn.Linear(bases, hidden, bias=False)
            nn.init.zeros_(self.expression_in.weight)
        self.layer2 = nn.Linear(hidden, hidden)
        # Deferred shading (SNeRG): per sample only a density, from a small head of its own on the plane features;
        # the features themselves are composited along the ray like colours and the MLP above (layer1, layer2,
        # color) runs once per pixel on their mean (:func:`deferred_composite`). The per-sample work falls from a
        # 2×64 MLP to a 3C×density_hidden one; the features are linear in the planes, so compositing them first
        # and decoding after is what this field is trained as — every engine renders it exactly.
        # density_hidden = 0: a linear head, density = exp(w · features + the frame's share), as TensoRF reads its
        # density straight from its factors: per sample 3C multiply-adds instead of 3C × density_hidden, cheap
        # enough to run inside the fused engine's marching kernel.
        self.deferred = shading == "deferred"
        self.density_layer = self.density_latent = self.density_expression = None
        if self.deferred:
            units = density_hidden or 1  # the frame's share goes to the hidden units, or to the linear head's logit
            self.density_layer = nn.Linear(3 * channels, density_hidden) if density_hidden else None
            # the frame's share of the density head's first layer (latent code, expression): zero at the start
            self.density_latent = nn.Linear(latent_dim, units, bias=False)
            nn.init.zeros_(self.density_latent.weight)
            if expression_mlp:
                self.density_expression = nn.Linear(bases, units, bias=False)
                nn.init.zeros_(self.density_expression.weight)
        self.density = nn.Linear((density_hidden or 3 * channels) if self.deferred else hidden, 1)
        with torch.no_grad():  # start empty (density ≈ 0.007/cm): the loss grows the head where it is needed
            self.density.bias.fill_(-4.0)
        self.color = nn.Linear(hidden + 9, 3)

    def basis_weights(self, condition: Float[Tensor, " c"]) -> Float[Tensor, " bases"]:
        """The expression's weight on each basis (the map, then the trained bounds)."""
        weights = self.expression_map(condition[: self.hparams["expression_dim"]])
        if self.weight_low is not None:
            weights = torch.minimum(torch.maximum(weights, self.weight_low), self.weight_high)
        return weights

    def blend(self, condition: Float[Tensor, " c"]) -> Float[Tensor, "3 ch r r"]:
        """The frame's tri-plane: neutral + Σ_k w_k(expression) · basis_k. Once per frame."""
        weights = self.basis_weights(condition)
        neutral = self.planes[0] if self.warp is None else self.warped_neutral(weights)
        if self.expression_planes is None:
            return neutral + torch.einsum("k,kpcij->pcij", weights, self.planes[1:])
        offset = torch.einsum("k,kpcij->pcij", weights, self.expression_planes)
        res = self.planes.shape[-1]
        offset = torch.nn.functional.interpolate(offset, size=(res, res), mode="bilinear", align_corners=True)
        return neutral + offset

    def warped_neutral(self, weights: Float[Tensor, " bases"]) -> Float[Tensor, "3 ch r r"]:
        """The neutral planes, each texel taking the features ``Σ_k w_k · warp_k`` away (plane units, [-1, 1])."""
        res = self.planes.shape[-1]
        shift = torch.einsum("k,kpdij->pdij", weights, self.warp)  # [3, 2, rw, rw]
        shift = torch.nn.functional.interpolate(shift, size=(res, res), mode="bilinear", align_corners=True)
        axis = torch.linspace(-1.0, 1.0, res, device=weights.device)
        identity = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1)  # [r, r, 2]: (x, y) of each texel
        grid = (identity + shift.permute(0, 2, 3, 1)).clamp(-1.0, 1.0)  # [3, r, r, 2]; clamped: border padding
        if not torch.onnx.is_in_onnx_export():  # grid_sample: half the gathers' time in training (fwd + bwd)
            return torch.nn.functional.grid_sample(self.planes[0], grid, mode="bilinear", align_corners=True)
        # ONNX Runtime has no CPU GridSample kernel here: the same numbers as gathers
        grid = grid.reshape(3, res * res, 2)
        feats = plane_gather(self.channels_last(self.planes[0]), grid[..., 0], grid[..., 1], res)  # [3, rr, ch]
        return feats.permute(0, 2, 1).reshape(self.planes[0].shape)

    def latent_bias(self, condition: Float[Tensor, " c"]) -> Float[Tensor, " b"]:
        """The frame's share of the first layer, the same for every sample of a frame: the latent code's, and
        the expression's when the field has ``expression_mlp``. ``b = hidden``; a deferred field appends its
        density head's share (``b = hidden + density_hidden``, or ``hidden + 1`` for a linear head)."""
        latent = condition[self.hparams["expression_dim"]:]
        bias = self.latent_in(latent)
        if self.expression_in is not None:
            bias = bias + self.expression_in(self.basis_weights(condition))
        if not self.deferred:
            return bias
        density_bias = self.density_latent(latent)
        if self.density_expression is not None:
            density_bias = density_bias + self.density_expression(self.basis_weights(condition))
        return torch.cat([bias, density_bias])

    @property
    def feature_width(self) -> int:
        """Per-sample features a deferred field composites along a ray (3 planes × channels)."""
        return 3 * self.channels

    def shade(self, features: Float[Tensor, "m f"], dirs: Float[Tensor, "m 3"], latent_bias: Float[Tensor, " b"]
              ) -> Float[Tensor, "m 3"]:
        """A deferred field's per-pixel MLP: colour from a ray's mean feature and its view direction."""
        hidden = self.layer1.weight.shape[0]
        h = torch.relu(torch.nn.functional.linear(features, self.layer1.weight, self.layer1.bias + latent_bias[:hidden]))
        h = torch.relu(self.layer2(h))
        return colour_activation(self.color(torch.cat([h, spherical_harmonics_deg2(dirs)], -1)))

    def density_head(self, features: Float[Tensor, "n f"], latent_bias: Float[Tensor, " b"]) -> Float[Tensor, " n"]:
        """A deferred field's per-sample density from the sample's plane features (samples-first)."""
        hidden = self.layer1.weight.shape[0]
        if self.density_layer is None:  # linear head
            return density_activation(torch.nn.functional.linear(features, self.density.weight,
                                                                 self.density.bias + latent_bias[hidden:])[:, 0])
        h = torch.relu(torch.nn.functional.linear(features, self.density_layer.weight,
                                                  self.density_layer.bias + latent_bias[hidden:]))
        return density_activation(self.density(h)[:, 0])

    def frame_state(self, expression: Float[Tensor, " e"], latent: Float[Tensor, " l"], channels_last: bool = False
                    ) -> tuple[Float[Tensor, "3 ch r r"] | Float[Tensor, "3 rr ch"], Float[Tensor, " hidden"]]:
        """One frame's state, what :meth:`decode` (``channels_last=False``) or :meth:`decode_gather`
        (``channels_last=True``) take besides the samples: the blended planes and the latent bias."""
        condition = torch.cat([expression, latent])
        layout = self._gather_layout() if channels_last else None
        if layout is not None:
            return self._blend_for_gathers(condition, *layout), self.latent_bias(condition)
        planes = self.blend(condition)
        return self.channels_last(planes) if channels_last else planes, self.latent_bias(condition)

    def _gather_layout(self, hidden: bool = False) -> tuple[Tensor, Tensor] | None:
        """The neutral planes ``[3, r, r, w]`` and the expression bases ``[k, 3, re, re, w]`` with channels last
        (``w = C``; with ``hidden``, each texel's C features then their :meth:`gather_state` hidden pre-activations),
        for a frozen field's frames (an engine's: no gradient, not exported) with bases at their own resolution
        and no warp; None otherwise. Made once per version of the parameters."""
        if (self.expression_planes is None or self.warp is not None or torch.is_grad_enabled()
                or torch.onnx.is_in_onnx_export()):
            return None
        params = (self.planes, self.expression_planes) + ((self.density_layer.weight,) if hidden else ())
        key = (hidden,) + tuple((p.data_ptr(), p._version) for p in params)
        cached = getattr(self, "_layout", None)
        if cached is None or cached[0] != key:
            neutral = self.planes[0].permute(0, 2, 3, 1).contiguous()
            bases = self.expression_planes.permute(0, 1, 3, 4, 2).contiguous()
            if hidden:  # plane p's texels through its share of the layer: W[:, pC:(p+1)C]
                w = self.density_layer.weight  # [d, 3C]
                share = w.reshape(w.shape[0], 3, -1).permute(1, 0, 2)  # [3, d, C]
                neutral = torch.cat([neutral, torch.einsum("pijc,pdc->pijd", neutral, share)], -1)
                bases = torch.cat([bases, torch.einsum("kpijc,pdc->kpijd", bases, share)], -1)
            cached = self._layout = (key, neutral, bases)
        return cached[1:]

    def gather_state(self, expression: Float[Tensor, " e"], latent: Float[Tensor, " l"]
                     ) -> tuple[Float[Tensor, "3 rr w"], Float[Tensor, " b"]]:
        """A deferred field's frame state for a marcher that runs its density head inside the march (the fused
        engine): :meth:`frame_state`'s channels-last planes with each texel's hidden pre-activations after its C
        features (``w = C + d``): its plane's share of the density head's hidden layer applied to it. The layer is
        linear and a bilinear lookup is a weighted sum of texels, so a lookup of those gives ``W f`` (bias apart),
        and blending and upsampling are linear too: they are taken once, on the bases. A linear head has none
        (``w = C``)."""
        if self.density_layer is None:
            return self.frame_state(expression, latent, channels_last=True)
        condition = torch.cat([expression, latent])
        layout = self._gather_layout(hidden=True)
        if layout is not None:
            return self._blend_for_gathers(condition, *layout), self.latent_bias(condition)
        planes = self.channels_last(self.blend(condition))  # [3, rr, C]
        w = self.density_layer.weight
        pre = torch.bmm(planes, w.reshape(w.shape[0], 3, -1).permute(1, 2, 0))  # [3, rr, d]
        return torch.cat([planes, pre], -1), self.latent_bias(condition)

    def _blend_for_gathers(self, condition: Float[Tensor, " c"], neutral: Float[Tensor, "3 r r ch"],
                           bases: Float[Tensor, "k 3 re re ch"]) -> Float[Tensor, "3 rr ch"]:
        """:meth:`blend` then :meth:`channels_last`, computed channels-last throughout: the upsampling runs on
        channels-last memory (~2× faster) and no ``[3, r·r, C]`` copy is made after it (measured alone: 1.7–2.0 ms
        a frame → ~0.6)."""
        offset = torch.einsum("k,kpijc->pijc", self.basis_weights(condition), bases).permute(0, 3, 1, 2)
        res = neutral.shape[1]
        offset = torch.nn.functional.interpolate(offset, size=(res, res), mode="bilinear", align_corners=True)
        planes = offset.add_(neutral.permute(0, 3, 1, 2))  # [3, C, r, r] viewed; channels-last in memory
        return planes.permute(0, 2, 3, 1).reshape(planes.shape[0], -1, planes.shape[1])

    def decode(self, planes: Float[Tensor, "3 ch r r"], latent_bias: Float[Tensor, " hidden"],
               points: Float[Tensor, "n 3"], dirs: Float[Tensor, "n 3"]) -> tuple[Float[Tensor, "n 3"], Float[Tensor, " n"]]:
        """The per-sample work, given one frame's state: three bilinear lookups and the tiny MLP.

        This is what the exporter turns into ONNX (frame state as inputs, a dynamic number of samples). The MLP
        runs channels-first (``[features, n]``): grid_sample's output is already laid out that way, so no
        transposed copies, and the latent bias folds into the first matmul.
        """
        feats = triplane_lookup(planes, unit_points(points, self.center, self.half_extent))  # [3 ch, n]
        if self.deferred:  # (features [n, 3 ch], density): the features are composited, shaded per pixel
            return feats.T, self.density_head(feats.T, latent_bias)
        h = torch.relu(torch.addmm((self.layer1.bias + latent_bias)[:, None], self.layer1.weight, feats))
        h = torch.relu(torch.addmm(self.layer2.bias[:, None], self.layer2.weight, h))  # [hidden, n]
        hidden = h.shape[0]
        raw_sigma = torch.addmm(self.density.bias[:, None], self.density.weight, h)[0]  # [n]
        raw_rgb = torch.addmm(self.color.bias[:, None], self.color.weight[:, :hidden], h)  # [3, n]
        raw_rgb = raw_rgb.T + spherical_harmonics_deg2(dirs) @ self.color.weight[:, hidden:].T  # [n, 3]
        sigma = density_activation(raw_sigma)
        return colour_activation(raw_rgb), sigma

    @staticmethod
    def channels_last(planes: Float[Tensor, "3 ch r r"]) -> Float[Tensor, "3 rr ch"]:
        """Planes laid out for gathers: one row of channels per texel."""
        return planes.permute(0, 2, 3, 1).reshape(planes.shape[0], -1, planes.shape[1])

    def decode_gather(self, planes_cl: Float[Tensor, "3 rr ch"], latent_bias: Float[Tensor, " hidden"],
                      points: Float[Tensor, "n 3"], dirs: Float[Tensor, "n 3"]) -> tuple[Float[Tensor, "n 3"], Float[Tensor, " n"]]:
        """:meth:`decode` with the bilinear lookups written as gathers (the same numbers as ``grid_sample`` with
        ``align_corners=True``). This is the exported graph: ONNX Runtime's GridSample kernel is ~7× slower on
        this CPU than four Gathers per plane."""
        feats = triplane_lookup_gather(planes_cl, unit_points(points, self.center, self.half_extent),
                                       self.hparams["resolution"])  # [n, 3 ch]
        if self.deferred:
            return feats, self.density_head(feats, latent_bias)
        h = torch.relu(torch.nn.functional.linear(feats, self.layer1.weight, self.layer1.bias + latent_bias))
        h = torch.relu(self.layer2(h))  # [n, hidden]
        sigma = density_activation(self.density(h)[:, 0])
        rgb = colour_activation(self.color(torch.cat([h, spherical_harmonics_deg2(dirs)], -1)))
        return rgb, sigma

    def query(self, planes: Float[Tensor, "3 ch r r"], points: Float[Tensor, "n 3"], dirs: Float[Tensor, "n 3"],
              condition: Float[Tensor, " c"]) -> tuple[Float[Tensor, "n 3"], Float[Tensor, " n"]]:
        """Look up blended planes at canonical points and decode colour and density."""
        return self.decode(planes, self.latent_bias(condition), points, dirs)

    def forward(self, points: Float[Tensor, "n 3"], dirs: Float[Tensor, "n 3"],
                condition: Float[Tensor, " c"]) -> tuple[Float[Tensor, "n 3"], Float[Tensor, " n"]]:
        return self.query(self.blend(condition), points, dirs, condition)
