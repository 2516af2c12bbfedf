"""The fused CPU engine: the fast field's frame state from the field itself, then the numba kernels of
:mod:`avatar.engines.fused_kernels` march, gather, decode and composite every ray in one pass.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from avatar.base.errors import UserError
from avatar.bundle.bundle import LoadedAvatar
from avatar.engines.base import RenderEngine
from avatar.field.encoding import spherical_harmonics_deg2
from avatar.field.fast import DENSITY_CLAMP, DENSITY_SHIFT, colour_activation, deferred_composite
from avatar.render import rays as ray_utils
from avatar.render.grid import OccupancyGrid
from avatar.render.march import MIN_TRANSMITTANCE


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (oneDNN's check: avx512_bf16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class FusedEngine(RenderEngine):
    """The fast field on the CPU through compiled per-ray kernels (:mod:`avatar.fused`): the same samples, the
    same field, ~2–3× faster than the torch engine's marcher, whose per-sample bookkeeping dominates a CPU frame.

    ``precision``: ``fp32`` (1/255 from the torch engine) or ``bf16`` (bfloat16 matrix products: ~20 % faster on
    one thread of this CPU, no faster on two, and up to 11/255 off at the edges of the expression range for the
    volumetric field; slower than fp32 on CPUs without native bf16). ``auto`` (default): fp32, except a deferred
    field's per-pixel MLP on a CPU with native bfloat16 (avx512_bf16 / AMX), where bf16 is ~1.6× faster on its
    tens of thousands of pixels (its density head runs inside the march, in fp32: exp magnifies errors).
    ``threads``: for its kernels and the MLP (0 = torch's current setting, read at each frame).

    A deferred-shading field is marched in one pass per ray (:func:`avatar.engines.fused_kernels.march_deferred`:
    its density head inside the march — the hidden layer's pre-activations read with the features, from the same
    texel rows (:meth:`avatar.field.fast.FastField.gather_state`) —, no sample lists, no feature buffer), then
    shaded per pixel (:meth:`_shader`).
    """

    name = "fused"

    def __init__(self, loaded: LoadedAvatar, grid: OccupancyGrid | None = None, step: float | None = None,
                 device: str | torch.device = "cpu", precision: str = "auto", threads: int = 0,
                 min_transmittance: float = MIN_TRANSMITTANCE):
        if torch.device(device).type != "cpu":
            raise UserError(f"the fused engine runs on the CPU, not {device}; use --engine torch or tensorrt there")
        if precision not in ("bf16", "fp32", "auto"):
            raise UserError(f"precision must be auto, bf16 or fp32, not {precision!r}")
        if precision == "auto":
            precision = "bf16" if loaded.model.field.deferred and native_bf16() else "fp32"
        try:  # numba: imported only when this engine is used
            from avatar.engines.fused_kernels import Workspace, occupancy_lookup
        except ImportError as exc:
            raise UserError(f"the fused engine needs numba ({exc}); pip install -r requirements.txt") from None

        super().__init__(loaded, grid, step, "cpu")
        self.precision = precision
        self.threads = threads
        self._box = (self.box_min.cpu().numpy().astype(np.float32), self.box_max.cpu().numpy().astype(np.float32))
        self._occupancy = occupancy_lookup(self.grid.mask.cpu().numpy(), self._box[1] - self._box[0], self.step)
        field = self.model.field
        self._center = field.center.cpu().numpy().astype(np.float32)
        self._inv_half = (1.0 / field.half_extent).cpu().numpy().astype(np.float32)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        hidden = field.layer1.weight.shape[0]
        with torch.no_grad():
            if field.deferred:  # the density head runs inside the march (_density_head); colour per pixel (_shader)
                self._shade_w = [field.layer1.weight.to(dtype), field.layer2.weight.to(dtype), field.layer2.bias.to(dtype),
                                 field.color.weight[:, :hidden].to(dtype).contiguous(), field.color.bias.detach()]
            else:
                self._w = [field.layer1.weight.to(dtype), field.layer2.weight.to(dtype),
                           torch.cat([field.density.weight, field.color.weight[:, :hidden]]).to(dtype)]
                self._b2 = field.layer2.bias.to(dtype)
                self._bh = torch.cat([field.density.bias, field.color.bias]).to(dtype)
            self._view_weight = field.color.weight[:, hidden:].T.contiguous()  # [9, 3]: the SH view term
        self._dtype = dtype
        self._workspace = Workspace()
        self.min_transmittance = min_transmittance

    def frame_state(self, expression, latent):
        field = self.model.field
        if field.deferred:  # (with the density head's hidden pre-activations per texel: see _density_head)
            return field.gather_state(expression, latent)
        return field.frame_state(expression, latent, channels_last=True)

    def _mlp(self, latent_bias: Tensor):
        """The volumetric field's decoder without activations, ``features [m, 3C] → raw [m, 4]``, for this frame's
        latent bias."""
        linear, relu = torch.nn.functional.linear, torch.relu
        w1, w2, wh = self._w
        b1 = (self.model.field.layer1.bias + latent_bias).to(self._dtype)

        def mlp(feats: np.ndarray, out: np.ndarray) -> None:
            x = torch.from_numpy(feats).to(self._dtype)
            h = relu(linear(relu(linear(x, w1, b1)), w2, self._b2))
            torch.from_numpy(out).copy_(linear(h, wh, self._bh))

        return mlp

    def _shader(self, latent_bias: Tensor):
        """A deferred field's per-pixel MLP (:meth:`avatar.field.fast.FastField.shade`), its two hidden layers in
        this engine's precision, for this frame's latent bias: ``(features [m, F], dirs [m, 3]) → colour [m, 3]``."""
        w1, w2, b2, wc, bc = self._shade_w
        field = self.model.field
        b1 = (field.layer1.bias + latent_bias[:w1.shape[0]]).to(self._dtype)

        linear = torch.nn.functional.linear

        def shade(feats: Tensor, dirs: Tensor) -> Tensor:
            # (weights as [out, in] through linear, ReLUs in place: addmm on transposed bf16 weights and out-of-place
            # ReLUs copied more than they multiplied, ~3× this)
            h = linear(linear(feats.to(self._dtype), w1, b1).relu_(), w2, b2).relu_()
            return colour_activation(linear(h, wc).float() + bc + spherical_harmonics_deg2(dirs) @ self._view_weight)

        return shade

    def _rays(self, size: int, head_pose: Tensor) -> dict[str, np.ndarray]:
        """This frame's rays at ``size`` as arrays, with each ray's view-dependent colour term."""
        pixels, k, camera = self._pixels[size]
        rays = ray_utils.frame_rays(pixels, k, head_pose, self.box_min, self.box_max, camera)
        if not self.model.field.deferred:  # (a deferred field's view term is its pixels', in field.shade)
            rays["view_rgb"] = spherical_harmonics_deg2(rays["dirs"]) @ self._view_weight
        return {key: value.numpy() for key, value in rays.items()}

    @torch.inference_mode()
    def render(self, expression, head_pose, latent, size, background=None):
        import numba

        from avatar.engines.fused_kernels import march_fused

        expression, head_pose, latent = self._inputs(expression, head_pose, latent, size)
        planes, latent_bias = self.frame_state(expression, latent)  # planes [3, r·r, C] (+ d: a deferred head's)
        res = self.model.field.hparams["resolution"]
        threads = self.threads or torch.get_num_threads()
        if threads > 1:
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        rays = self._rays(size, head_pose)
        bg = self.background(size, background)
        if self.model.field.deferred:
            return self._render_deferred(rays, planes, latent_bias, bg, size, threads)
        out = march_fused(self._mlp(latent_bias), rays["origins"], rays["dirs"], rays["near"], rays["far"], rays["hit"],
                          np.ascontiguousarray(planes.reshape(3, res, res, -1).numpy()), self._center, self._inv_half,
                          rays["view_rgb"], bg.numpy(), self._occupancy, *self._box, self.step,
                          self.min_transmittance, parallel=threads > 1, workspace=self._workspace,
                          density_clamp=DENSITY_CLAMP, density_shift=DENSITY_SHIFT)
        self.last_samples = out["samples"]
        return {"rgb": torch.from_numpy(out["rgb"]).clamp_(0, 1).reshape(size, size, 3),
                "alpha": torch.from_numpy(out["alpha"]).reshape(size, size)}

    def _density_head(self, latent_bias: Tensor) -> tuple:
        """A deferred field's density head for :func:`avatar.engines.fused_kernels.march_deferred`, this frame's
        share folded into the biases: ``(w_density [F], b_density, b_hidden [d], w_hidden [d])``. Its hidden
        layer's weights are in the planes already (:meth:`avatar.field.fast.FastField.gather_state`)."""
        field = self.model.field
        share = latent_bias[field.layer1.weight.shape[0]:]
        if field.density_layer is None:
            none = np.zeros(0, np.float32)
            return (field.density.weight[0].contiguous().numpy(), float(field.density.bias + share[0]), none, none)
        return (np.zeros(field.density_layer.weight.shape[1], np.float32), float(field.density.bias),
                (field.density_layer.bias + share).numpy(), field.density.weight[0].contiguous().numpy())

    def _render_deferred(self, rays: dict, planes_t: Tensor, latent_bias: Tensor, bg: Tensor, size: int,
                         threads: int) -> dict:
        """A deferred field's frame: one marching pass per ray (the density inside the march, the features
        composited), then its per-pixel MLP on the pixels with a head (:func:`avatar.field.fast.deferred_composite`)."""
        from avatar.engines.fused_kernels import march_deferred

        res = self.model.field.hparams["resolution"]
        out = march_deferred(rays["origins"], rays["dirs"], rays["near"], rays["far"], rays["hit"],
                             planes_t.reshape(3, res, res, -1).numpy(), self._center, self._inv_half, self._occupancy,
                             *self._box, self.step, self._density_head(latent_bias), self.min_transmittance,
                             threads=threads, workspace=self._workspace, density_clamp=DENSITY_CLAMP,
                             density_shift=DENSITY_SHIFT)
        self.last_samples = out["samples"]
        hit = torch.from_numpy(out["rays"])
        alpha = torch.zeros(size * size)
        alpha[hit] = torch.from_numpy(out["alpha"])
        dirs = torch.from_numpy(rays["dirs"])
        shade = self._shader(latent_bias)
        rgb = deferred_composite(torch.from_numpy(out["feature_sum"]), alpha, bg,
                                 lambda feats, rows: shade(feats, dirs[hit[rows]]), pixels=hit)
        return {"rgb": rgb.clamp_(0, 1).reshape(size, size, 3), "alpha": alpha.reshape(size, size)}
