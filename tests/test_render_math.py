import torch

from avatar.field.encoding import positional_encoding
from avatar.field.paper import NerfaceField
from avatar.render import rays, volrend


def test_positional_encoding_dims():
    x = torch.rand(5, 3)
    assert positional_encoding(x, 10).shape == (5, 63)
    assert positional_encoding(x, 4).shape == (5, 27)


def test_composite_empty_space_shows_background():
    n, s = 4, 8
    t = torch.linspace(1, 2, s).expand(n, s)
    bg = torch.rand(n, 3)
    out = volrend.composite(torch.rand(n, s, 3), torch.zeros(n, s), t, torch.full((n,), 2.0), bg)  # density 0
    torch.testing.assert_close(out["rgb"], bg)
    torch.testing.assert_close(out["alpha"], torch.zeros(n))


def test_composite_opaque_first_sample_hides_background():
    n, s = 3, 6
    t = torch.linspace(1, 2, s).expand(n, s)
    rgb = torch.rand(n, s, 3)
    sigma = torch.zeros(n, s)
    sigma[:, 0] = 1e4
    out = volrend.composite(rgb, sigma, t, torch.full((n,), 2.0), torch.rand(n, 3))
    torch.testing.assert_close(out["rgb"], rgb[:, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out["alpha"], torch.ones(n), atol=1e-4, rtol=0)
    torch.testing.assert_close(out["depth"], t[:, 0], atol=1e-3, rtol=0)


def test_importance_samples_follow_the_weights():
    t = torch.linspace(0, 10, 33).expand(2, 33).contiguous()
    w = torch.zeros(2, 33)
    w[:, 20] = 1.0  # all weight near t = 6.25
    fine = volrend.importance_samples(t, w, 64, perturb=True)
    assert ((fine > 5.5) & (fine < 7.0)).float().mean() > 0.9


def test_rays_hit_the_head_box_and_miss_outside():
    k = torch.tensor([100.0, 100.0, 64.0, 64.0])
    pose = torch.eye(4)
    pose[2, 3] = -50.0  # head 50 cm in front of the camera
    px = torch.tensor([[64, 64], [0, 0]])
    r = rays.frame_rays(px, k, pose, torch.tensor([-10.0, -10, -10]), torch.tensor([10.0, 10, 10]))
    assert bool(r["hit"][0]) and not bool(r["hit"][1])
    assert abs(float(r["near"][0]) - 40.0) < 0.5 and abs(float(r["far"][0]) - 60.0) < 0.5
    # Rays are in canonical space: the camera centre sits at +50 on z.
    torch.testing.assert_close(r["origins"][0], torch.tensor([0.0, 0.0, 50.0]))


def test_field_depends_on_conditioning():
    torch.manual_seed(0)
    f = NerfaceField([-10, -10, -10], [10, 10, 10], expression_dim=52, latent_dim=32, width=64)
    pts, dirs = torch.rand(16, 3), torch.nn.functional.normalize(torch.rand(16, 3), dim=-1)
    rgb_a, sigma_a = f(pts, dirs, torch.zeros(84))
    cond = torch.zeros(84)
    cond[25] = 1.0  # jawOpen
    rgb_b, sigma_b = f(pts, dirs, cond)
    assert rgb_a.shape == (16, 3) and sigma_a.shape == (16,)
    assert not torch.allclose(sigma_a, sigma_b)


def test_distortion_loss_of_packed_samples_matches_the_pair_sum_across_rounds():
    """mip-NeRF 360's distortion, Σ w_i w_j |t_i − t_j| + ⅓ Σ w_i² δ per ray, from the prefix-sum form the marcher
    uses, also when a ray's samples come in two rounds (the carried sums join them); a thin surface scores less."""
    from avatar.render.march import distortion_terms

    torch.manual_seed(0)
    step, n = 0.5, 3
    rays = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    t = torch.tensor([1.0, 1.5, 2.0, 1.0, 3.0, 0.5, 1.0, 1.5, 2.0])
    w = torch.rand(9) * 0.3
    expected = torch.stack([
        (w[rays == k][:, None] * w[rays == k][None] * (t[rays == k][:, None] - t[rays == k][None]).abs()).sum()
        + w[rays == k].square().sum() * step / 3 for k in range(n)])
    zeros = torch.zeros(n)
    whole, _, _ = distortion_terms(rays, t, w, step, n, zeros, zeros)
    assert torch.allclose(whole, expected, atol=1e-6)
    first = torch.tensor([1, 1, 0, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    a, w_sum, wt_sum = distortion_terms(rays[first], t[first], w[first], step, n, zeros, zeros)
    b, _, _ = distortion_terms(rays[~first], t[~first], w[~first], step, n, w_sum, wt_sum)
    assert torch.allclose(a + b, expected, atol=1e-6)
    one = torch.tensor([0, 0, 0, 0])
    thin, _, _ = distortion_terms(one, torch.arange(4.0), torch.tensor([0.0, 0.9, 0.0, 0.0]), 1.0, 1, zeros[:1], zeros[:1])
    spread, _, _ = distortion_terms(one, torch.arange(4.0), torch.tensor([0.3, 0.3, 0.3, 0.0]), 1.0, 1, zeros[:1], zeros[:1])
    assert thin.item() < spread.item()
