import pytest
import torch

from avatar.field.fast import FastField
from avatar.render import volrend
from avatar.render.grid import OccupancyGrid
from avatar.render.march import composite_packed, march_culled, march_dense
from avatar.render.rays import frame_rays, pixel_grid

BOX = (torch.tensor([-10.0, -10, -10]), torch.tensor([10.0, 10, 10]))


def sphere_query(points, dirs):
    """A soft opaque ball of radius 5 with position-dependent colour."""
    r = points.norm(dim=-1)
    sigma = 5.0 * torch.sigmoid((5.0 - r) * 4)
    rgb = torch.sigmoid(points[:, [0, 1, 2]] / 3)
    return rgb, sigma


def camera_rays(n=24):
    k = torch.tensor([40.0, 40.0, n / 2, n / 2])
    pose = torch.eye(4)
    pose[2, 3] = -40.0
    return frame_rays(pixel_grid(n, n), k, pose, *BOX)


def test_packed_composite_equals_dense_composite():
    torch.manual_seed(0)
    n, s, step = 5, 7, 0.3
    t = (torch.arange(s) + 0.5).expand(n, s) * step
    sigma, rgb = torch.rand(n, s) * 3, torch.rand(n, s, 3)
    dense = volrend.composite(rgb, sigma, t, t[:, -1] + step, torch.zeros(n, 3))
    rows = torch.arange(n).repeat_interleave(s)
    packed = composite_packed(rows, t.reshape(-1), sigma.reshape(-1), rgb.reshape(-1, 3), step, n, torch.ones(n))
    torch.testing.assert_close(packed["rgb"], dense["rgb"])
    torch.testing.assert_close(packed["alpha"], dense["alpha"])


@pytest.mark.parametrize("blocks_per_round", [2, 0])  # rounds with early termination (CPU), one pass (GPU)
def test_culled_renderer_matches_the_dense_reference(blocks_per_round):
    rays = camera_rays()
    bg = torch.rand(rays["origins"].shape[0], 3)
    args = (rays["origins"], rays["dirs"], rays["near"], rays["far"], bg)
    dense = march_dense(sphere_query, *args, step=0.2)
    grid = OccupancyGrid(*BOX, resolution=32, threshold=0.01)
    grid.finalize([lambda p: sphere_query(p, p)[1]])
    assert 0.01 < grid.occupied_fraction() < 0.3  # it does cull
    seen = []
    culled = march_culled(sphere_query, grid, *args, step=0.2, min_transmittance=1e-4,
                          blocks_per_round=blocks_per_round, on_samples=lambda p, w: seen.append(p.shape[0]))
    assert culled["samples"] < 0.3 * dense["samples"]
    assert sum(seen) == culled["samples"] and (len(seen) == 1) == (blocks_per_round == 0)
    torch.testing.assert_close(culled["rgb"], dense["rgb"], atol=2e-3, rtol=0)
    torch.testing.assert_close(culled["alpha"], dense["alpha"], atol=2e-3, rtol=0)


def test_a_refined_grid_is_finer_inside_the_coarse_one_and_still_renders_the_reference():
    """The bundle's finer grid (fit.py --bundle-occupancy-resolution): inside the coarse grid's cells, fewer cells
    (a thinner shell around the ball), and culled renders through it still match the dense reference."""
    torch.manual_seed(1)
    density = lambda p: sphere_query(p, p)[1]  # noqa: E731
    coarse = OccupancyGrid(*BOX, resolution=16, threshold=0.01)
    coarse.finalize([density])
    coarse.mask[:, :, :8] = False  # as if carved: the refined grid stays inside what the coarse one keeps
    fine = coarse.refined(32, [density])
    inside = coarse.mask.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert fine.resolution == 32 and not (fine.mask & ~inside).any()
    assert 0.2 < fine.mask.sum() / inside.sum() < 0.8  # thinner: the dilation is one fine cell, not one coarse cell
    with pytest.raises(ValueError, match="multiple"):
        coarse.refined(24, [density])
    rays = camera_rays()
    bg = torch.rand(rays["origins"].shape[0], 3)
    args = (rays["origins"], rays["dirs"], rays["near"], rays["far"], bg)
    full = OccupancyGrid(*BOX, resolution=16, threshold=0.01)
    full.finalize([density])
    dense = march_dense(sphere_query, *args, step=0.2)
    coarse_out, fine_out = (march_culled(sphere_query, g, *args, step=0.2, min_transmittance=1e-4)
                            for g in (full, full.refined(32, [density])))
    assert fine_out["samples"] < 0.9 * coarse_out["samples"]
    torch.testing.assert_close(fine_out["rgb"], dense["rgb"], atol=3e-3, rtol=0)


@pytest.mark.parametrize("blocks_per_round", [2, 0])
def test_rays_that_hit_nothing_and_empty_batches(blocks_per_round):
    rays = camera_rays(8)
    bg = torch.rand(64, 3)
    grid = OccupancyGrid(*BOX, resolution=8)
    grid.mask.zero_()  # nothing occupied
    out = march_culled(sphere_query, grid, rays["origins"], rays["dirs"], rays["near"], rays["far"], bg, step=0.5,
                       blocks_per_round=blocks_per_round)
    torch.testing.assert_close(out["rgb"], bg)
    assert out["samples"] == 0
    empty = march_culled(sphere_query, grid, torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0), torch.zeros(0),
                         torch.zeros(0, 3), step=0.5, blocks_per_round=blocks_per_round)
    assert empty["rgb"].shape == (0, 3)


def test_fast_field_blends_expression_bases_once_per_frame():
    torch.manual_seed(0)
    f = FastField([-10, -10, -10], [10, 10, 10], expression_dim=52, latent_dim=32, resolution=16, channels=4, bases=3)
    cond_a, cond_b = torch.zeros(84), torch.zeros(84)
    cond_b[25] = 1.0
    with torch.no_grad():
        f.expression_map.weight.normal_()
        f.planes[1:].normal_()  # (bases start at zero; give them something to blend)
    pa, pb = f.blend(cond_a), f.blend(cond_b)
    assert pa.shape == (3, 4, 16, 16) and not torch.allclose(pa, pb)
    pts = torch.rand(10, 3) * 10 - 5
    rgb, sigma = f(pts, torch.nn.functional.normalize(torch.rand(10, 3), dim=-1), cond_b)
    assert rgb.shape == (10, 3) and (sigma >= 0).all()


@pytest.mark.parametrize("field", ["fast", "nerface"])
def test_the_latent_code_conditions_the_field(field):
    """NerFace's per-frame latent code reaches the field: two codes, same points and expression, other outputs."""
    from avatar.field.model import Avatar

    torch.manual_seed(0)
    hp = (dict(box_min=[-10, -10, -10], box_max=[10, 10, 10], expression_dim=52, resolution=16, channels=4, bases=3,
               hidden=16) if field == "fast" else dict(box_min=[-10, -10, -10], box_max=[10, 10, 10],
                                                       expression_dim=52, width=16, depth=2))
    model = Avatar(field, hp, num_frames=2, latent_dim=8)
    from avatar.field.model import SamplingConfig, render_rays

    rays = camera_rays(16)
    sampling = SamplingConfig(coarse=8, fine=8, step=0.5)
    expression = torch.rand(52)
    with torch.no_grad():
        a, b = (render_rays(model, rays, expression, latent, torch.zeros(16 * 16, 3), sampling)["rgb"]
                for latent in (torch.zeros(8), 3 * torch.randn(8)))
    assert (a - b).abs().max() > 1e-5  # untrained, the effect is small (4e-4 for nerface), but never zero


def test_the_expression_reaches_the_mlp_as_a_per_frame_bias():
    """--expression-mlp: the expression's basis weights join the first layer's per-frame bias (NerFace feeds the
    expression to its MLP), starting at zero (the field begins as without it); a field without it is unchanged."""
    torch.manual_seed(0)
    kw = dict(expression_dim=52, latent_dim=8, resolution=16, channels=4, bases=3, hidden=16)
    plain, mlp = (FastField([-10, -10, -10], [10, 10, 10], expression_mlp=on, **kw) for on in (False, True))
    assert plain.expression_in is None and "expression_in.weight" not in plain.state_dict()
    expression, other, latent = torch.zeros(52), torch.zeros(52), torch.rand(8)
    other[25] = 1.0
    with torch.no_grad():
        mlp.expression_map.weight.normal_()
    bias = [mlp.frame_state(e, latent)[1] for e in (expression, other)]
    torch.testing.assert_close(bias[0], bias[1])  # zero at the start
    with torch.no_grad():
        mlp.expression_in.weight.normal_()
    a, b = (mlp.frame_state(e, latent)[1] for e in (expression, other))
    assert a.shape == (16,) and (a - b).abs().max() > 1e-3
    weights = mlp.basis_weights(torch.cat([other, latent]))
    torch.testing.assert_close(b, mlp.latent_in(latent) + mlp.expression_in(weights))


def test_an_expression_warp_moves_the_neutral_planes_instead_of_cross_fading():
    """--expression-warp: each basis displaces the neutral planes; zero at the start (the same planes as without
    it), and a basis whose warp is one texel to the right shows each texel's right neighbour when fully on."""
    torch.manual_seed(0)
    kw = dict(expression_dim=52, latent_dim=8, resolution=9, channels=2, bases=3, hidden=8)
    plain, warped = (FastField([-10, -10, -10], [10, 10, 10], expression_warp=w, **kw) for w in (0, 4))
    warped.load_state_dict({**plain.state_dict(), "warp": warped.warp.detach()})
    cond = torch.zeros(60)
    with torch.no_grad():
        plain.expression_map.weight.zero_()
        plain.expression_map.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
        warped.expression_map.load_state_dict(plain.expression_map.state_dict())
    torch.testing.assert_close(warped.blend(cond), plain.blend(cond))
    with torch.no_grad():
        warped.warp[0, :, 0] = 2.0 / 8  # one texel along x on every plane
    moved = warped.blend(cond) - torch.einsum("k,kpcij->pcij", torch.tensor([1.0, 0, 0]), warped.planes[1:])
    torch.testing.assert_close(moved[..., :, :-1], warped.planes[0][..., :, 1:])
    assert "warp" not in plain.state_dict()


def test_plane_gather_matches_grid_sample():
    """The gathers the exported graphs use (no GridSample kernel in ONNX Runtime here) give grid_sample's numbers."""
    from avatar.field.fast import plane_gather

    torch.manual_seed(0)
    planes = torch.randn(3, 5, 12, 12)
    grid = torch.rand(3, 7, 9, 2) * 2 - 1
    ref = torch.nn.functional.grid_sample(planes, grid, mode="bilinear", align_corners=True)  # [3, 5, 7, 9]
    flat = grid.reshape(3, -1, 2)
    got = plane_gather(FastField.channels_last(planes), flat[..., 0], flat[..., 1], 12)  # [3, 63, 5]
    torch.testing.assert_close(got.permute(0, 2, 1).reshape(3, 5, 7, 9), ref)


def deferred_avatar(seed=0, density_hidden=8):
    """A small deferred-shading avatar whose box is filled with a dense, uneven fog (untrained fields are empty)."""
    from avatar.field.model import Avatar

    torch.manual_seed(seed)
    model = Avatar("fast", dict(box_min=[-10, -10, -10], box_max=[10, 10, 10], expression_dim=52, resolution=16,
                                channels=4, bases=3, hidden=16, expression_mlp=True, shading="deferred",
                                density_hidden=density_hidden), num_frames=2, latent_dim=8)
    with torch.no_grad():
        for p in model.field.parameters():
            p.normal_(0, 0.3)
        model.field.density.bias.fill_(1.0)
        model.latents.normal_()
    return model


def test_a_deferred_field_shades_each_pixel_once_from_its_mean_feature():
    """--shading deferred: per sample a density and the plane features (no colour); the features composited along
    the ray; the MLP once per pixel on their mean; the background behind by the transmittance left. A ray whose
    samples all carry one feature renders exactly as the volumetric rule would with that feature's colour."""
    from avatar.field.fast import SHADE_MIN_ALPHA, deferred_composite

    model = deferred_avatar()
    field = model.field
    assert field.deferred and field.density_layer.weight.shape == (8, 12)
    assert "layer1.weight" in field.state_dict() and field.density.weight.shape == (1, 8)
    planes, bias = field.frame_state(torch.rand(52), model.latents[0])
    assert bias.shape == (16 + 8,)
    pts, dirs = torch.rand(50, 3) * 8 - 4, torch.nn.functional.normalize(torch.randn(50, 3), dim=-1)
    feats, sigma = field.decode(planes, bias, pts, dirs)
    assert feats.shape == (50, 12) and sigma.shape == (50,) and (sigma > 0).all()
    # decode_gather (the ONNX graph) gives the same numbers
    planes_cl, _ = field.frame_state(torch.rand(52), model.latents[0], channels_last=True)
    g = field.decode_gather(field.channels_last(planes), bias, pts, dirs)
    torch.testing.assert_close(g[0], feats, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g[1], sigma, atol=1e-5, rtol=1e-5)
    # one feature along a ray ⇒ the volumetric composite of its colour
    n, s, step = 6, 9, 0.3
    f = torch.randn(n, 12)
    d = torch.nn.functional.normalize(torch.randn(n, 3), dim=-1)
    sig = torch.rand(n, s) * torch.tensor([0.0, 0.001, 0.5, 1, 2, 4])[:, None]  # from empty to opaque
    t = (torch.arange(s) + 0.5).expand(n, s) * step
    bg = torch.rand(n, 3)
    colour = field.shade(f, d, bias)
    volumetric = volrend.composite(colour[:, None].expand(n, s, 3), sig, t, t[:, -1] + step, bg)
    summed = volrend.composite(f[:, None].expand(n, s, 12), sig, t, t[:, -1] + step, torch.zeros(n, 12))
    deferred = deferred_composite(summed["rgb"], summed["alpha"], bg, lambda x, rows: field.shade(x, d[rows], bias))
    shaded = summed["alpha"] >= SHADE_MIN_ALPHA
    assert 0 < int(shaded.sum()) < n  # the empty and the faintest rays are not shaded
    torch.testing.assert_close(deferred[shaded], volumetric["rgb"][shaded], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(deferred[~shaded], ((1 - summed["alpha"])[:, None] * bg)[~shaded])


def test_a_linear_density_head_reads_the_density_straight_from_the_features():
    """--density-hidden 0: density = exp(w · features + the frame's share); the frame's share is one number (its
    latent code's and expression's), and decode_gather (the ONNX graph) agrees."""
    from avatar.field.fast import density_activation

    model = deferred_avatar(2, density_hidden=0)
    field = model.field
    assert field.density_layer is None and field.density.weight.shape == (1, 12)
    expression = torch.rand(52)
    planes, bias = field.frame_state(expression, model.latents[0])
    assert bias.shape == (16 + 1,)
    share = field.density_latent(model.latents[0]) + field.density_expression(field.basis_weights(
        torch.cat([expression, model.latents[0]])))
    torch.testing.assert_close(bias[16:], share)
    pts, dirs = torch.rand(40, 3) * 8 - 4, torch.nn.functional.normalize(torch.randn(40, 3), dim=-1)
    feats, sigma = field.decode(planes, bias, pts, dirs)
    torch.testing.assert_close(sigma, density_activation(feats @ field.density.weight[0] + field.density.bias + share))
    g = field.decode_gather(field.channels_last(planes), bias, pts, dirs)
    torch.testing.assert_close(g[1], sigma, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("blocks_per_round", [2, 0])
def test_a_deferred_fields_culled_render_matches_its_dense_reference(blocks_per_round):
    from avatar.field.model import SamplingConfig, render_rays

    model = deferred_avatar(1)
    rays = camera_rays(16)
    bg = torch.rand(16 * 16, 3)
    expression = torch.rand(52)
    with torch.no_grad():
        dense, culled = (render_rays(model, rays, expression, model.latents[1], bg,
                                     SamplingConfig(step=0.5, culling=culling, blocks_per_round=blocks_per_round))
                         for culling in (False, True))
    # every ray ends in the fog: the culled renderer stops them early (T < 1e-3), the dense one takes every step
    assert dense["alpha"].min() > 0.99 and culled["samples"] < dense["samples"]
    torch.testing.assert_close(culled["rgb"], dense["rgb"], atol=3e-3, rtol=0)
    torch.testing.assert_close(culled["alpha"], dense["alpha"], atol=2e-3, rtol=0)


def test_an_engines_channels_last_frame_state_is_the_blend_and_follows_the_parameters():
    """Engines take the frame state channels-last, blended from copies of the planes in that layout: the same
    numbers as blend + channels_last, and new copies once the parameters change."""
    torch.manual_seed(3)
    f = FastField([-10, -10, -10], [10, 10, 10], expression_dim=6, latent_dim=2, resolution=16, channels=4, bases=3,
                  expression_resolution=8)
    with torch.no_grad():
        f.expression_planes.normal_()
    expression, latent = torch.randn(6), torch.randn(2)
    for _ in range(2):
        with torch.inference_mode():
            planes, bias = f.frame_state(expression, latent, channels_last=True)
            want = f.channels_last(f.blend(torch.cat([expression, latent])))
        assert f._layout is not None and planes.is_contiguous()  # (the engines' path was taken)
        torch.testing.assert_close(planes, want)
        with torch.no_grad():  # a training step changes the planes in place
            f.planes.add_(1.0)
            f.expression_planes.mul_(2.0)


@pytest.mark.parametrize("density_hidden", [5, 0])
def test_a_deferred_fields_gather_state_appends_its_density_heads_hidden_layer_per_texel(density_hidden):
    """The fused engine's frame state: each texel's features, then (a hidden head) the hidden layer's share of
    its plane applied to them — made from bases blended channels-last, or from the planes where it cannot be."""
    torch.manual_seed(4)
    f = FastField([-10, -10, -10], [10, 10, 10], expression_dim=6, latent_dim=2, resolution=16, channels=4, bases=3,
                  expression_resolution=8, shading="deferred", density_hidden=density_hidden)
    with torch.no_grad():
        f.expression_planes.normal_()
    expression, latent = torch.randn(6), torch.randn(2)
    with torch.inference_mode():
        state, bias = f.gather_state(expression, latent)
        planes, want_bias = f.frame_state(expression, latent, channels_last=True)
        want = planes
        if density_hidden:
            w = f.density_layer.weight  # [d, 3C]: plane p's texels through columns pC…(p+1)C
            want = torch.cat([planes, torch.stack([planes[p] @ w[:, 4 * p:4 * (p + 1)].T for p in range(3)])], -1)
    assert state.shape == (3, 16 * 16, 4 + density_hidden) and state.is_contiguous()
    torch.testing.assert_close(state, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bias, want_bias)
    state_slow, _ = f.gather_state(expression, latent)  # with gradients on: the planes, then the layer
    torch.testing.assert_close(state_slow.detach(), want, atol=1e-5, rtol=1e-5)
