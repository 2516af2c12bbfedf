"""The learned upsampler (avatar/field/upsample.py, trainer/upsample.py) and the live loop's choice between native
and upsampled renders (streamer/pipeline.py's RenderSizeController)."""

import shutil

import numpy as np
import pytest
import torch

from avatar.base.errors import UserError
from avatar.bundle.bundle import load_bundle
from avatar.field.upsample import Upsampler, load_upsampler, save_upsampler, train_upsampler
from streamer.pipeline import RenderSizeController
from tests.conftest import run_script


def test_an_untrained_upsampler_is_bilinear_and_keeps_colour_premultiplied():
    torch.manual_seed(0)
    up = Upsampler(2, channels=8)
    rgba = torch.rand(1, 4, 10, 12)
    rgba[:, :3] *= rgba[:, 3:]  # premultiplied
    bilinear = torch.nn.functional.interpolate(rgba, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(up(rgba), bilinear)
    with torch.no_grad():
        up.body[-1].bias.normal_()
    out = up(rgba)
    assert out.shape == (1, 4, 20, 24) and (out[:, :3] <= out[:, 3:] + 1e-6).all() and out.min() >= 0


def stripes(size: int, phase: float) -> torch.Tensor:
    """``[3, size, size]`` fine diagonal stripes: detail that a half-size image loses and bilinear cannot bring
    back, but that a network which has seen the pattern can."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    v = 0.5 + 0.4 * torch.sin((x + y + phase) * 2.2)
    return torch.stack([v, 1 - v, 0.5 * v])


def test_training_beats_bilinear_on_held_out_images_of_what_it_was_trained_on():
    """A semi-transparent layer of fine stripes over a grey background: the network sees the layer at half size
    (premultiplied RGBA) and is fitted to the full-size composite, so it must bring back the stripes and leave the
    background to the compositing."""
    alpha, grey = 0.6, torch.full((3, 32, 32), 0.5)

    def pair(phase):
        layer = stripes(32, phase) * alpha  # premultiplied
        low = torch.nn.functional.avg_pool2d(layer[None], 2)[0]
        return torch.cat([low, torch.full((1, 16, 16), alpha)]), layer + (1 - alpha) * grey, grey

    pairs = [pair(p) for p in np.linspace(0, 6, 12)]
    up, report = train_upsampler(pairs, 2, steps=250, crop=12, batch=8, channels=16)
    assert report["steps"] == 250 and report["final_l1"] > 0
    low, truth, _ = pair(1.234)  # a phase it has not seen

    def err(rgba):
        return float((rgba[:3] + (1 - rgba[3:]) * grey - truth).abs().mean())

    bilinear = torch.nn.functional.interpolate(low[None], scale_factor=2, mode="bilinear", align_corners=False)[0]
    with torch.no_grad():
        learned = up(low[None])[0]
    assert err(learned) < 0.6 * err(bilinear), (err(learned), err(bilinear))


def test_an_upsampler_file_round_trips_and_a_bad_one_is_one_line(tmp_path):
    up = Upsampler(4, channels=6, layers=2)
    with torch.no_grad():
        up.body[-1].weight.normal_()
    save_upsampler(tmp_path / "u.safetensors", up, {"steps": 3})
    back, report = load_upsampler(tmp_path / "u.safetensors")
    assert back.factor == 4 and report == {"steps": 3}
    x = torch.rand(1, 4, 5, 5)
    torch.testing.assert_close(back(x), up(x))
    (tmp_path / "bad.safetensors").write_bytes(b"junk" * 10)
    with pytest.raises(UserError, match="bad.safetensors"):
        load_upsampler(tmp_path / "bad.safetensors")


def test_trainer_upsample_adds_an_upsampler_the_engines_and_the_live_loop_use(deferred_bundle, dataset64, subject,
                                                                              tmp_path):
    out = tmp_path / "avatar"
    shutil.copytree(deferred_bundle, out)
    r = run_script("trainer/upsample.py", str(out), "--data", str(dataset64), "--steps", "60", "--frames", "16",
                   "--test-frames", "2", "--eval-pose-steps", "2", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "upsampler.safetensors").is_file()
    assert "learned upsampler ×2" in r.stdout and "bilinear ×2" in r.stdout and "(native)" in r.stdout
    loaded = load_bundle(out)
    assert loaded.upsampler is not None and loaded.upsampler.factor == 2
    from avatar.engines.fused import FusedEngine

    engine = FusedEngine(loaded)
    pose = np.asarray(loaded.meta["reference_head_pose"])
    expr = np.asarray(loaded.meta["expression_stats"]["neutral"])
    frame = engine.render_upsampled(expr, pose, loaded.latent(0), 64)
    native = engine.render(expr, pose, loaded.latent(0), 64)
    assert frame["rgb"].shape == (64, 64, 3) and frame["alpha"].shape == (64, 64)
    assert float((frame["alpha"] - native["alpha"]).abs().mean()) < 0.1  # the same head, at the same place
    # the live loop at a frame rate nothing holds: upsampled frames, said in the stats
    stats = tmp_path / "s.json"
    r = run_script("run_live.py", "--target", str(out), "--source", str(subject / "video.mp4"),
                   "--sink", f"file:{tmp_path / 'o.mp4'}",
                   "--max-frames", "12", "--every-frame", "--fps", "1000", "--render-size", "64", "--stats", str(stats),
                   timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    s = json.loads(stats.read_text())
    assert s["upsampled_share"] > 0.5 and s["render_size_median"] <= 64
    # bad input: one line, nothing written
    r = run_script("trainer/upsample.py", str(out), "--data", str(dataset64), "--factor", "3")
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "--factor 3" in r.stderr
    r = run_script("trainer/fit.py", "--data", str(dataset64), "--out", str(tmp_path / "x"), "--upsample", "3")
    assert r.returncode != 0 and "--upsample 3" in r.stderr and not (tmp_path / "x").exists()


def test_the_live_loop_upsamples_before_it_shrinks_and_goes_back_to_native_when_there_is_room():
    c = RenderSizeController(256, fps=25, factor=2, retry=3)
    assert (c.size, c.upsampled) == (256, False)
    c.update(0.060)  # too slow natively at full size: same size, upsampled
    assert (c.size, c.upsampled) == (256, True)
    c.update(0.060)  # still too slow: now it shrinks
    assert (c.size, c.upsampled) == (240, True)
    for _ in range(4):
        c.update(0.010)  # room again: grow back first …
    assert c.size == 256
    for _ in range(5):
        c.update(0.010)  # … then, after `retry` frames, native
    assert (c.size, c.upsampled) == (256, False)
    plain = RenderSizeController(256, fps=25)  # an avatar without an upsampler: shrink at once
    plain.update(0.060)
    assert (plain.size, plain.upsampled) == (240, False)
