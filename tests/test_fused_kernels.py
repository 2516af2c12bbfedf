"""Each numba kernel of the fused engine (avatar/engines/fused_kernels.py) against its plain-torch twin
(avatar/engines/fused_twins.py) on small random inputs: one test per kernel, so a failure names the kernel."""

import numpy as np
import pytest
import torch

from avatar.engines import fused_twins as twins
from avatar.field.fast import DENSITY_CLAMP, DENSITY_SHIFT

kernels = pytest.importorskip("avatar.engines.fused_kernels")
plan_round, pack, gather, composite = kernels.KERNELS[False]  # the serial builds (same Python source as parallel)
T = torch.from_numpy


def rays(rng, n=300, box=10.0):
    """Rays from around a box ``[0, box]³`` towards points inside it; near 0, far 30."""
    origins = rng.uniform(-5, box + 5, (n, 3)).astype(np.float32)
    target = rng.uniform(2, box - 2, (n, 3)).astype(np.float32)
    dirs = ((target - origins) / np.linalg.norm(target - origins, axis=1, keepdims=True)).astype(np.float32)
    near = rng.uniform(0, 2, n).astype(np.float32)
    return origins, dirs, near, np.full(n, 30.0, np.float32)


def round_layout(rng, n, most):
    """A round's bookkeeping: some active rays (not 0…a−1), planned step indices and counts, row offsets."""
    active = np.sort(rng.choice(n, n // 2, replace=False)).astype(np.int64)
    out_n = rng.integers(0, most + 1, active.size).astype(np.int64)
    out_k = np.sort(rng.integers(0, 60, (active.size, most)), axis=1).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(out_n)]).astype(np.int64)
    return active, out_k, out_n, offsets


@pytest.mark.parametrize("coarse", [64, 8])  # the grid tested directly; a coarse level and the grid's bits (×2)
def test_plan_round_kernel_takes_the_next_occupied_steps(coarse):
    rng = np.random.default_rng(1)
    g, step, most = 16, 0.25, 5
    occupied = np.zeros((g, g, g), bool)
    for _ in range(5):
        c = rng.integers(2, g - 2, 3)
        occupied[c[0] - 2:c[0] + 2, c[1] - 1:c[1] + 2, c[2] - 2:c[2] + 1] = True
    origins, dirs, near, far = rays(rng)
    box_min, cells = np.zeros(3, np.float32), np.full(3, g / 10.0, np.float32)
    occupancy = kernels.occupancy_lookup(occupied, np.full(3, 10.0), step, coarse)
    assert occupancy.fine == (2 if coarse == 8 else 1)
    level = occupancy.coarse_skip.shape[0]  # the kernel's cells: the coarse level's
    active = np.arange(origins.shape[0], dtype=np.int64)
    kpos, kpos_twin = np.zeros(active.size, np.int64), torch.zeros(active.size, dtype=torch.long)
    steps = twins.ray_steps(T(near), T(far), step)
    for _ in range(3):  # rounds continue where the last one stopped
        out_k, out_n = np.zeros((active.size, most), np.int64), np.zeros(active.size, np.int64)
        plan_round(origins, dirs, near, far, active, kpos, step, most, *occupancy[:3], box_min,
                   np.full(3, level / 10.0, np.float32), out_k, out_n)
        k_twin, n_twin, kpos_twin = twins.plan_round(T(origins), T(dirs), T(near), T(far), T(active), kpos_twin,
                                                     step, most, T(occupied), T(box_min), T(cells))
        assert out_n.tolist() == n_twin.tolist()
        assert np.where(np.arange(most) < out_n[:, None], out_k, -1).tolist() == k_twin.tolist()
        assert np.minimum(kpos, steps.numpy()).tolist() == kpos_twin.tolist()
    assert (out_n > 0).any() and (out_n < most).any()


def test_pack_kernel_lays_rows_out_in_ray_order():
    rng = np.random.default_rng(2)
    active, out_k, out_n, offsets = round_layout(rng, 200, 6)
    row_ray, row_k = np.full(offsets[-1], -1, np.int64), np.full(offsets[-1], -1, np.int64)
    pack(active, out_k, offsets, row_ray, row_k)
    ray_twin, k_twin = twins.pack(T(active), T(out_k), T(out_n))
    assert row_ray.tolist() == ray_twin.tolist() and row_k.tolist() == k_twin.tolist()


@pytest.mark.parametrize("first", [0, 7])
def test_gather_kernel_looks_up_what_grid_sample_looks_up(first):
    rng = np.random.default_rng(3)
    origins, dirs, near, _ = rays(rng, 50)
    res, ch, step, m = 8, 4, 0.5, 400
    planes = rng.normal(size=(3, res, res, ch)).astype(np.float32)
    row_ray, row_k = rng.integers(0, 50, m).astype(np.int64), rng.integers(0, 60, m).astype(np.int64)
    center, half = np.full(3, 5.0, np.float32), np.full(3, 4.0, np.float32)  # some samples outside: clamped
    feats = np.zeros((m - first, 3 * ch), np.float32)
    gather(origins, dirs, near, row_ray, row_k, first, step, planes, center, (1 / half).astype(np.float32), feats)
    twin = twins.gather(T(origins), T(dirs), T(near), T(row_ray[first:]), T(row_k[first:]), step, T(planes),
                        T(center), T(half))
    torch.testing.assert_close(T(feats), twin, atol=1e-5, rtol=1e-5)


def test_composite_kernel_blends_front_to_back_and_stops_rays():
    rng = np.random.default_rng(4)
    n, most, step, min_t = 200, 6, 0.25, 0.05
    active, out_k, out_n, offsets = round_layout(rng, n, most)
    near = rng.uniform(0, 2, n).astype(np.float32)
    raw = np.concatenate([rng.uniform(-4, 6, (offsets[-1], 1)), rng.normal(size=(offsets[-1], 3))], 1).astype(np.float32)
    view_rgb = rng.normal(size=(n, 3)).astype(np.float32)
    color, depth = rng.uniform(0, 0.2, (n, 3)).astype(np.float32), rng.uniform(0, 1, n).astype(np.float32)
    trans = rng.uniform(0.3, 1, n).astype(np.float32)
    twin = twins.composite(T(active), T(out_k), T(out_n), T(near), step, T(raw), T(view_rgb), T(color), T(depth),
                           T(trans), min_t)
    never_stopping = twins.composite(T(active), T(out_k), T(out_n), T(near), step, T(raw), T(view_rgb), T(color),
                                     T(depth), T(trans), 0.0)
    assert (never_stopping[2] < twin[2]).any()  # these inputs stop some rays inside the round
    composite(active, offsets, out_k, near, step, raw, view_rgb, color, depth, trans, min_t, DENSITY_CLAMP,
              DENSITY_SHIFT)
    for got, want in zip((color, depth, trans), twin):
        torch.testing.assert_close(T(got), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hidden,coarse,ch", [(0, 64, 3), (5, 64, 3), (5, 8, 3), (0, 64, 8), (16, 64, 12)])
# a linear density head; a hidden layer read from per-frame planes; the grid through a coarse level and its bits;
# rows of whole vectors (LANES = 8) and of vectors and a scalar remainder
def test_deferred_march_kernel_marches_gathers_and_composites_each_ray_in_one_pass(hidden, coarse, ch):
    rng = np.random.default_rng(6)
    g, res, step, min_t = 16, 8, 0.25, 0.05
    occupied = np.zeros((g, g, g), bool)
    for _ in range(5):
        c = rng.integers(2, g - 2, 3)
        occupied[c[0] - 2:c[0] + 2, c[1] - 1:c[1] + 2, c[2] - 2:c[2] + 1] = True
    origins, dirs, near, far = rays(rng, 200)
    hit = rng.uniform(size=200) < 0.8
    planes = rng.normal(size=(3, res, res, ch)).astype(np.float32)
    center, half = np.full(3, 5.0, np.float32), np.full(3, 5.0, np.float32)
    box_min, box_max = np.zeros(3, np.float32), np.full(3, 10.0, np.float32)
    w, b = rng.normal(size=3 * ch).astype(np.float32) * (hidden == 0), 1.5  # (a hidden head has no linear term)
    weight = rng.normal(size=(hidden, 3 * ch)).astype(np.float32)
    bias, out_weight = rng.normal(size=hidden).astype(np.float32), rng.normal(size=hidden).astype(np.float32)
    # the hidden layer moved onto each plane's texels, after their features (what the field does once per frame)
    hidden_planes = np.stack([planes[p] @ weight[:, p * ch:(p + 1) * ch].T for p in range(3)]).astype(np.float32)
    rays_hit = np.flatnonzero(hit)
    cells = T(np.full(3, g / 10.0, np.float32))
    layer = dict(weight=T(weight), bias=T(bias), out_weight=T(out_weight)) if hidden else {}
    twin = twins.march_deferred(T(origins), T(dirs), T(near), T(far), T(rays_hit), step, T(occupied), T(box_min),
                                cells, T(planes), T(center), T(half), T(w), b, min_t, **layer)
    never_stopping = twins.march_deferred(T(origins), T(dirs), T(near), T(far), T(rays_hit), step, T(occupied),
                                          T(box_min), cells, T(planes), T(center), T(half), T(w), b, 0.0, **layer)
    assert (never_stopping[1] > twin[1]).any() and (twin[1] > 0).any() and (twin[1] == 0).any()
    for threads in (1, 3):
        out = kernels.march_deferred(origins, dirs, near, far, hit, np.concatenate([planes, hidden_planes], -1), center,
                                     (1 / half).astype(np.float32),
                                     kernels.occupancy_lookup(occupied, box_max - box_min, step, coarse), box_min, box_max,
                                     step, (w, b, bias, out_weight), min_t, threads=threads, block=7,
                                     density_clamp=DENSITY_CLAMP, density_shift=DENSITY_SHIFT)
        assert out["rays"].tolist() == rays_hit.tolist()
        for got, want in zip((out["feature_sum"], out["alpha"], out["depth"]), twin):
            torch.testing.assert_close(T(np.array(got)), want, atol=1e-4, rtol=1e-4)
