"""The fused CPU engine (avatar/fused.py) against the torch engine, its empty-space skipping against stepping
every sample, and the live loop's tracking thread against tracking in turn."""

import json

import numpy as np
import pytest

from avatar.base.errors import UserError
from avatar.bundle.bundle import load_bundle
from avatar.engines.choice import open_engine
from avatar.engines.fused import FusedEngine
from avatar.engines.torch_engine import TorchEngine
from tests.conftest import run_script


def conditions(loaded, count=4, seed=3):
    from export.build import parity_frames

    return parity_frames(loaded, count, seed)


@pytest.mark.parametrize("precision,threads,limit,bundle", [("fp32", 1, 2, "fast_bundle"), ("fp32", 2, 2, "fast_bundle"),
                                                             ("bf16", 1, 8, "fast_bundle"),
                                                             ("fp32", 1, 2, "deferred_bundle"),
                                                             ("fp32", 2, 2, "deferred_bundle"),
                                                             ("fp32", 1, 2, "linear_density_bundle"),
                                                             ("auto", 2, 2, "linear_density_bundle")])
def test_fused_engine_renders_what_the_torch_engine_renders(request, precision, threads, limit, bundle):
    loaded = load_bundle(request.getfixturevalue(bundle))
    assert loaded.model.field.deferred == (bundle != "fast_bundle")
    assert (loaded.model.field.density_layer is None) == (bundle != "deferred_bundle")  # (a linear head or none)
    if bundle == "linear_density_bundle":  # fit.py refined its grid, or says why not
        assert loaded.model.occupancy.resolution == 128 or "psnr_gap_db_refined_128" in loaded.meta["occupancy_threshold"]
    reference = TorchEngine(loaded)
    fused = FusedEngine(loaded, precision=precision, threads=threads)
    for expr, pose, latent in conditions(loaded):
        for size in (64, 50):
            a = reference.render(expr, pose, latent, size)
            b = fused.render(expr, pose, latent, size)
            assert b["rgb"].shape == (size, size, 3) and b["alpha"].shape == (size, size)
            diff = float(((a["rgb"] * 255).round() - (b["rgb"] * 255).round()).abs().max())
            assert diff <= limit, (precision, threads, size, diff)
            assert float((a["alpha"] - b["alpha"]).abs().max()) < limit / 255 + 0.01
            # the same fixed steps (rounds of a few samples per ray instead of blocks): about as many evaluations
            assert 0 < fused.last_samples <= 1.1 * reference.last_samples
    assert a["alpha"].max() > 0.5  # a head, not only background


@pytest.mark.parametrize("coarse", [64, 12])  # the grid itself; a coarse level of 12³ and the grid's bits
def test_empty_space_skipping_never_skips_an_occupied_sample(coarse):
    """The tabled jumps of the planner against stepping through every fixed step, on random grids."""
    from avatar.engines.fused_kernels import KERNELS, occupancy_lookup

    plan = KERNELS[False][0]
    rng = np.random.default_rng(0)
    box_min, box_max = np.zeros(3, np.float32), np.ones(3, np.float32) * 10
    for trial in range(5):
        occupied = np.zeros((24, 24, 24), bool)
        for _ in range(6):  # a few blobs
            c = rng.integers(2, 22, 3)
            occupied[c[0] - 2:c[0] + 2, c[1] - 1:c[1] + 3, c[2] - 2:c[2] + 1] = True
        n = 400
        origins = rng.uniform(-5, 15, (n, 3)).astype(np.float32)
        target = rng.uniform(2, 8, (n, 3)).astype(np.float32)
        dirs = (target - origins) / np.linalg.norm(target - origins, axis=1, keepdims=True)
        near, far = np.zeros(n, np.float32), np.full(n, 30.0, np.float32)
        step = 0.1
        cells = (24 / (box_max - box_min)).astype(np.float32)
        kpos = np.zeros(n, np.int64)
        out_k, out_n = np.zeros((n, 4000), np.int64), np.zeros(n, np.int64)
        occupancy = occupancy_lookup(occupied, box_max - box_min, step, coarse)
        level = occupancy.coarse_skip.shape[0]
        plan(origins, dirs, near, far, np.arange(n), kpos, step, 4000, *occupancy[:3], box_min,
             (level / (box_max - box_min)).astype(np.float32), out_k, out_n)
        for r in range(n):
            t = near[r] + (np.arange(int(np.ceil((far[r] - near[r]) / step - 0.5))) + 0.5) * step
            idx = np.clip(((origins[r] + dirs[r] * t[:, None] - box_min) * cells).astype(int), 0, 23)
            expected = np.flatnonzero(occupied[idx[:, 0], idx[:, 1], idx[:, 2]])
            assert list(out_k[r, :out_n[r]]) == list(expected), (trial, r)


def test_auto_engine_on_a_cpu_without_measurements_is_fused_and_a_gpu_is_refused(fast_bundle):
    loaded = load_bundle(fast_bundle)
    said = []
    assert open_engine(loaded, fast_bundle, "auto", log=said.append).name == "fused" and not said
    assert open_engine(loaded, fast_bundle, "fused").name == "fused"
    with pytest.raises(UserError, match="runs on the CPU"):
        FusedEngine(loaded, device="cuda")


def test_tracking_on_its_own_thread_logs_what_tracking_in_turn_logs(fast_bundle, subject, tmp_path):
    logs = {}
    for overlap in ("on", "off"):
        cond = tmp_path / f"cond_{overlap}.json"
        r = run_script("run_live.py", "--target", str(fast_bundle), "--source", str(subject / "video.mp4"),
                       "--every-frame", "--sink", f"file:{tmp_path / f'{overlap}.mp4'}", "--max-frames", "30",
                       "--render-size", "64", "--fps", "0", "--overlap", overlap, "--conditioning-log", str(cond), "--quiet",
                       timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        logs[overlap] = json.loads(cond.read_text())["frames"]
    on, off = logs["on"], logs["off"]
    assert [c["source_index"] for c in on] == [c["source_index"] for c in off] == list(range(30))
    assert sum(c["state"].startswith("tracking") for c in on) >= 20
    np.testing.assert_allclose([c["expression"] for c in on], [c["expression"] for c in off], atol=1e-5)
    np.testing.assert_allclose([c["head_pose"] for c in on], [c["head_pose"] for c in off], atol=1e-5)
