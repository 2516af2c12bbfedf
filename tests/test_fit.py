import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from avatar.base.errors import UserError
from avatar.bundle.bundle import load_bundle
from avatar.field.training import CHECKPOINT_FILE, checkpoint_step
from tests.conftest import ROOT, TINY_FIT, run_script


@pytest.fixture(scope="module")
def smoke_bundle(dataset64, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "avatar"
    r = run_script("trainer/fit.py", "--data", str(dataset64), "--field", "nerface", "--preset", "smoke",
                   "--max-steps", "120", "--eval-frames", "3", "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_smoke_training_learns_and_is_evaluated(smoke_bundle):
    metrics = json.loads((smoke_bundle / "metrics.json").read_text())
    avatar, baseline = metrics["test"]["avatar"], metrics["test"]["nearest_training_frame"]
    plate = metrics["test"]["background_only"]
    assert avatar["frames"] == baseline["frames"] == plate["frames"] == 3  # the same held-out frames, every row
    assert avatar["psnr"] > metrics["untrained"]["psnr"] + 1.0  # training helped …
    assert avatar["psnr"] > plate["psnr"] + 1.0  # … and drew a head: a field that is only transparent scores `plate`
    assert metrics["training"]["loss_last_100_mean"] < metrics["training"]["loss_first"]
    assert "unavailable" in avatar["lpips"]
    assert "novel_poses" in metrics  # the synthetic subject's unseen head poses are scored too
    assert list((smoke_bundle / "sheets").glob("test_*.png"))
    config = json.loads((smoke_bundle / "config.json").read_text())
    assert config["preset"] == "smoke" and config["max_steps"] == 120


def test_bundle_holds_no_pickles(smoke_bundle):
    for path in smoke_bundle.rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:2]
            assert head != b"\x80\x04" and head != b"\x80\x02" and head != b"PK", f"{path} looks like a pickle/torch zip"
    meta = json.loads((smoke_bundle / "avatar.json").read_text())
    for key in ("version", "field", "field_hparams", "intrinsics", "image_size", "expression_names",
                "expression_stats", "reference_head_pose"):
        assert key in meta
    loaded = load_bundle(smoke_bundle)
    assert loaded.model.latents.shape[1] == 32


def test_bundle_with_wrong_version_or_missing_tensor_is_refused(smoke_bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(smoke_bundle, bad, ignore=shutil.ignore_patterns("tb", "sheets", CHECKPOINT_FILE))
    meta = json.loads((bad / "avatar.json").read_text())
    (bad / "avatar.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(UserError, match="version"):
        load_bundle(bad)
    r = run_script("trainer/evaluate.py", str(bad), "--data", str(bad))
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "version" in r.stderr

    (bad / "avatar.json").write_text(json.dumps(meta))
    tensors = load_file(bad / "weights.safetensors")
    tensors.pop("fine.density.weight")
    save_file(tensors, bad / "weights.safetensors")
    with pytest.raises(UserError, match="fine.density.weight"):
        load_bundle(bad)
    r = run_script("trainer/render.py", str(bad), "--out", str(tmp_path / "x.mp4"))
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "lacks tensor" in r.stderr


def _panels(path, count):
    from avatar.capture.video import iter_frames

    frames = np.stack(list(iter_frames(path))).astype(np.float32)  # [t, h, w * count, 3]
    return np.split(frames, count, axis=2)


def test_render_offline_video(smoke_bundle, tmp_path):
    out, plain = tmp_path / "sweep.mp4", tmp_path / "plain.mp4"
    r = run_script("trainer/render.py", str(smoke_bundle), "--out", str(out), "--frames", "4", "--yaw=-20:20",
                   "--set", "jawOpen=+0.4", "--normals", "--mask")
    assert r.returncode == 0, r.stderr
    r = run_script("trainer/render.py", str(smoke_bundle), "--out", str(plain), "--frames", "4")
    assert r.returncode == 0, r.stderr
    from avatar.capture.video import probe_video

    info = probe_video(out)
    assert (info.width, info.height) == (64 * 3, 64)
    rgb, normals, mask = _panels(out, 3)
    (still,) = _panels(plain, 1)
    assert np.abs(rgb[0] - rgb[-1]).mean() > 2  # the yaw sweep turns the head: first and last frames differ
    assert np.abs(still[0] - still[-1]).max() < 4  # without a sweep nothing moves (video coding noise only)
    # The expression edit alone, at the poses of the plain run:
    edit = tmp_path / "edit.mp4"
    r = run_script("trainer/render.py", str(smoke_bundle), "--out", str(edit), "--frames", "4", "--set", "jawOpen=+0.4")
    assert r.returncode == 0, r.stderr
    (edited,) = _panels(edit, 1)
    # A still clip renders identical frames; H.264 (crf 17) still leaves its P-frames a level or two off the
    # I-frame here and there, so compare means, not maxima: coding noise is far below what the edit changes.
    noise = np.abs(still[-1] - still[0]).mean()
    assert noise < 0.05  # a still clip: identical frames up to coding noise …
    assert np.abs(edited[-1] - edited[0]).mean() > noise + 0.05  # … the edit ramps in and changes the picture
    # (this small avatar barely opens its mouth: 0.17 mean, 5/255 max; a render.py that dropped the edit gives noise)
    from trainer.render import RenderConfig, conditioning

    loaded = load_bundle(smoke_bundle)
    frames = conditioning(loaded, RenderConfig(str(smoke_bundle), "x.mp4", frames=3, yaw="-20:20", set=["jawOpen=+0.4"]))
    jaw = loaded.meta["expression_names"].index("jawOpen")
    neutral = np.asarray(loaded.meta["expression_stats"]["neutral"])
    assert frames[0][1][jaw] == pytest.approx(neutral[jaw]) and frames[-1][1][jaw] == pytest.approx(min(1, neutral[jaw] + 0.4))
    from avatar.capture.camera import matrix_to_euler

    ref = np.asarray(loaded.meta["reference_head_pose"])
    yaws = [matrix_to_euler((np.linalg.inv(ref) @ pose)[:3, :3])[0] for pose, _ in frames]
    assert yaws == pytest.approx([-20, 0, 20], abs=0.5)
    # The mask panel is grey (alpha repeated), with foreground and background; normals are not the colour.
    # (H.264's subsampled chroma leaves grey a level or few off at sharp edges: compare the mean, not the max)
    assert np.abs(mask[..., 0] - mask[..., 1]).mean() < 1 and mask.max() > 128 and mask.min() < 64
    assert np.abs(normals - rgb).mean() > 10


def test_render_driven_by_another_video(smoke_bundle, subject, tmp_path):
    """--drive: the other video's tracked head motion (relative to its first frame) turns the avatar's head."""
    from trainer.render import RenderConfig, conditioning

    loaded = load_bundle(smoke_bundle)
    frames = conditioning(loaded, RenderConfig(str(smoke_bundle), "x.mp4", drive=str(subject / "video.mp4")))
    truth = json.loads((subject / "truth.json").read_text())["frames"]
    assert len(frames) == len(truth)
    from avatar.capture.camera import matrix_to_euler

    ref = np.asarray(loaded.meta["reference_head_pose"])
    yaw = np.array([matrix_to_euler((np.linalg.inv(ref) @ pose)[:3, :3])[0] for pose, _ in frames])
    true_yaw = np.array([f["yaw_pitch_roll_deg"][0] for f in truth])
    assert np.corrcoef(yaw, true_yaw)[0, 1] > 0.8
    out = tmp_path / "driven.mp4"
    r = run_script("trainer/render.py", str(smoke_bundle), "--out", str(out), "--drive", str(subject / "video.mp4"),
                   "--frames", "5")
    assert r.returncode == 0, r.stderr[-2000:]
    (rgb,) = _panels(out, 1)
    assert len(rgb) == 5


def test_interrupted_training_resumes_from_the_checkpoints_weights(dataset64, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "trainer/fit.py", "--data", str(dataset64), "--out", str(out), "--preset", "smoke",
            "--max-steps", "60", "--checkpoint-every", "5", "--no-eval", *TINY_FIT]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / CHECKPOINT_FILE
    deadline = time.time() + 120
    while time.time() < deadline and (checkpoint_step(ckpt) or 0) < 15 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to save: only the periodic checkpoint survives
    proc.wait()
    saved = checkpoint_step(ckpt)
    assert saved is not None and 15 <= saved < 60
    assert not (out / "avatar.json").exists()
    # Mark the checkpoint's weights (training is deterministic: a resume that ignored the checkpoint and trained
    # from scratch up to the same step would reproduce the same weights, so a plain comparison cannot tell).
    from avatar.base.fileio import read_safetensors, safetensors_bytes, write_bytes_atomic

    tensors, meta = read_safetensors(ckpt)
    marked = next(k for k, v in tensors.items() if k.startswith("model.") and v.is_floating_point() and v.dim() == 2)
    tensors[marked] = tensors[marked] + 0.25
    write_bytes_atomic(ckpt, safetensors_bytes(tensors, {k: v for k, v in meta.items() if k != "sha256"}))
    checkpoint = {k[len("model."):]: v for k, v in load_file(ckpt).items() if k.startswith("model.")}
    # Resumed with nothing left to train, the bundle holds exactly the (marked) checkpoint's weights, in fp16.
    r = run_script("trainer/fit.py", "--out", str(out), "--resume", "--max-steps", str(saved), "--no-eval")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "avatar.json").read_text())["step"] == saved
    weights = load_file(out / "weights.safetensors")
    assert set(weights) == set(checkpoint)
    for name, value in checkpoint.items():
        assert torch.equal(weights[name], value.half() if value.is_floating_point() else value), name
    r = run_script("trainer/fit.py", "--out", str(out), "--resume", "--no-eval")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "avatar.json").read_text())["step"] == 60
    assert checkpoint_step(ckpt) == 60


def test_ctrl_c_saves_a_checkpoint(dataset64, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "trainer/fit.py", "--data", str(dataset64), "--out", str(out), "--preset", "smoke",
            "--max-steps", "100000", "--checkpoint-every", "100000", "--no-eval", *TINY_FIT]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "config.json").exists():
        time.sleep(0.1)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    # --checkpoint-every 100000: only the interrupt handler can have written it (at whatever step it reached).
    assert checkpoint_step(out / CHECKPOINT_FILE) is not None
    assert "--resume" in err and "Traceback" not in err


def test_existing_run_needs_resume_or_overwrite(smoke_bundle):
    r = run_script("trainer/fit.py", "--data", "whatever", "--out", str(smoke_bundle))
    assert r.returncode != 0 and "--resume" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_fit_from_a_video_within_minutes_then_overwrite(subject, dataset64, tmp_path):
    """--video prepares the dataset inside the run; --max-minutes ends it by time; --overwrite starts over."""
    out = tmp_path / "run"
    r = run_script("trainer/fit.py", "--video", str(subject / "video.mp4"), "--background", str(subject / "background.png"),
                   "--size", "64", "--out", str(out), "--preset", "smoke", "--max-steps", "100000",
                   "--max-minutes", "0.05", "--no-eval", "--refine-poses", "0.05", *TINY_FIT)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((out / "avatar.json").read_text())
    assert (out / "dataset" / "transforms_train.json").is_file() and meta["dataset"] == str(out / "dataset")
    # The one command's preparation: the photometric head tracking ran too (as prepare.py and run_live.py --record)
    report = json.loads((out / "dataset" / "report.json").read_text())
    assert report["pose_tracking"]["minutes"] == 0.05 and report["pose_tracking"]["steps_per_held_out_frame"] == 0
    # held-out frames are not fitted one by one (evaluation refines what it scores): one shared correction
    frames = json.loads((out / "dataset" / "transforms_test.json").read_text())["frames"]
    shared = [np.linalg.inv(f["tracked_transform_matrix"]) @ np.asarray(f["transform_matrix"]) for f in frames]
    assert all(np.allclose(c, shared[0], atol=1e-5) for c in shared)
    assert not (out / "dataset" / ".posetrack").exists()
    assert 0 < meta["step"] < 100000 and meta["training"]["seconds_this_session"] < 30
    r = run_script("trainer/fit.py", "--data", str(dataset64), "--out", str(out), "--preset", "smoke",
                   "--max-steps", "7", "--no-eval", "--overwrite", *TINY_FIT)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((out / "avatar.json").read_text())
    assert meta["step"] == 7 and meta["dataset"] == str(dataset64) and checkpoint_step(out / CHECKPOINT_FILE) == 7


def test_missing_dataset_is_one_line(tmp_path):
    r = run_script("trainer/fit.py", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error:")
    assert not (tmp_path / "o").exists()


def test_ddp_two_cpu_processes_end_with_identical_weights(dataset64, tmp_path):
    """--device cpu forces gloo even where a GPU is present; a time budget (not a step count) ends the run, so
    the ranks must agree on when to stop (each on its own clock would hang the next all-reduce)."""
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "trainer/fit.py", "--data", str(dataset64), "--out", str(out), "--preset", "smoke",
                        "--max-steps", "100000", "--max-minutes", "0.03", "--no-eval", "--device", "cpu", *TINY_FIT],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    dist = json.loads((out / "avatar.json").read_text())["training"]["distributed"]
    assert dist["world_size"] == 2 and dist["backend"] == "gloo"
    assert dist["ranks_identical"] and len(set(dist["param_checksums"])) == 1


def test_fast_field_trains_and_culls_like_the_dense_reference(dataset64, fast_bundle):
    out = fast_bundle
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["avatar"]["psnr"] > metrics["untrained"]["psnr"] + 3.0
    assert metrics["test"]["avatar"]["psnr"] > metrics["test"]["background_only"]["psnr"] + 1.0  # not transparent
    loaded = load_bundle(out)
    # The density threshold may fall to 0 on this young (200-step) field when a higher one would move its
    # pictures by more than 0.03 dB (a knife edge that depends on the CPU's float rounding), so the density grid
    # may be full; carving by what the training views see still empties part of the box.
    occupied = loaded.meta["occupied_fraction"]
    assert loaded.meta["field"] == "fast" and 0.0 < occupied["after_carving"] <= occupied["density"] <= 1.0
    assert occupied["after_carving"] < 1.0
    # Pose refinement: per-frame corrections learned with the field, and held-out poses refined before scoring
    # (the tracked-pose scores beside them).
    corrections = np.asarray(loaded.meta["pose_corrections"])
    assert corrections.shape == (loaded.model.latents.shape[0], 6) and np.abs(corrections).max() > 0
    assert loaded.meta["pose_refinement"]["frames"] == len(corrections)
    assert metrics["test_pose_refinement"]["iterations"] > 0 and "test_tracked_pose" in metrics

    import dataclasses

    from avatar.base.metrics import psnr
    from avatar.data.reader import load_split
    from avatar.field.model import render_image

    test = load_split(dataset64, "test")
    w, h = loaded.image_size
    dense = dataclasses.replace(loaded.sampling, culling=False)
    # Every sample the culled marcher hands to the field lies in an occupied cell, and there are far fewer of
    # them than the dense reference's (every step of every ray through the head box).
    from avatar.render import rays as ray_utils
    from avatar.render.march import march_culled, march_dense

    expr = torch.as_tensor(test.expressions[0], dtype=torch.float32)
    cond = torch.cat([expr, loaded.latent(0)])
    planes, bias = loaded.model.field.blend(cond), loaded.model.field.latent_bias(cond)
    seen = []

    def query(points, dirs):
        seen.append(points)
        return loaded.model.field.decode(planes, bias, points, dirs)

    rays = ray_utils.frame_rays(ray_utils.pixel_grid(w, h, "cpu"), torch.as_tensor(loaded.intrinsics, dtype=torch.float32),
                                torch.as_tensor(test.poses[0], dtype=torch.float32), loaded.model.box_min, loaded.model.box_max)
    bg = loaded.background.reshape(-1, 3)
    with torch.no_grad():
        culled = march_culled(query, loaded.model.occupancy, rays["origins"], rays["dirs"], rays["near"], rays["far"],
                              bg, loaded.sampling.step, blocks_per_round=0)
        points = torch.cat(seen)
        assert culled["samples"] == points.shape[0] > 0 and bool(loaded.model.occupancy.occupied(points).all())
        seen.clear()
        march_dense(query, rays["origins"], rays["dirs"], rays["near"], rays["far"], bg, loaded.sampling.step)
    dense_samples = sum(int(((p >= loaded.model.box_min) & (p <= loaded.model.box_max)).all(-1).sum()) for p in seen)
    # 0.61 on this tiny avatar when the trainer kept a density threshold; at threshold 0 (see above) only the
    # carving culls (0.95).
    kept = 0.8 if loaded.meta["occupancy_threshold"]["density_per_cm"] > 0 else 0.99
    assert culled["samples"] < kept * dense_samples, (culled["samples"], dense_samples)
    for i in range(min(3, len(test))):
        args = (loaded.model, test.poses[i], test.expressions[i], loaded.latent(0), loaded.intrinsics, w, h,
                loaded.background)
        culled_img = render_image(*args, loaded.sampling)["rgb"].numpy()
        dense_img = render_image(*args, dense)["rgb"].numpy()
        truth = test.images[i] / 255.0
        assert abs(psnr(culled_img, truth) - psnr(dense_img, truth)) <= 0.1
        assert np.abs(culled_img - dense_img).max() < 0.05


def test_a_256_fast_avatar_bundle_is_at_most_50_mb(tmp_path):
    import numpy as np

    from avatar.bundle.bundle import save_bundle
    from avatar.field.expressions import EXPRESSION_GROUPS
    from avatar.field.model import Avatar
    from avatar.field.training import config_with_preset

    cfg = config_with_preset("paper", "fast")  # the 256²+ setting: the largest planes we ship
    model = Avatar("fast", dict(box_min=[-12, -17, -14], box_max=[12, 15, 10], expression_dim=52,
                                resolution=cfg.plane_resolution, channels=cfg.plane_channels,
                                bases=len(EXPRESSION_GROUPS) + cfg.residual_bases, hidden=cfg.hidden,
                                expression_resolution=cfg.expression_resolution), num_frames=3000)
    save_bundle(tmp_path / "b", model, {"intrinsics": [1, 1, 128, 128], "image_size": [256, 256]},
                np.zeros((256, 256, 3), np.uint8))
    total = sum(p.stat().st_size for p in (tmp_path / "b").iterdir())
    assert total <= 50 * 2**20, total


def test_expression_warmup_renders_the_calmest_expression_first(dataset64, tmp_path, monkeypatch):
    """--expression-warmup N: the first N steps see one neutral expression (the calmest training frame's), the
    rest each frame's own — prepare's pose tracking relies on it to let the poses, not the bases, move the head."""
    import numpy as np

    from avatar.bundle.reference import expression_stats
    from avatar.data.reader import load_split
    from avatar.field.model import Avatar
    from trainer import fit

    seen = []
    forward = Avatar.forward

    def spy(self, rays, expression, *args, **kwargs):
        seen.append(expression.detach().clone())
        return forward(self, rays, expression, *args, **kwargs)

    monkeypatch.setattr(Avatar, "forward", spy)
    code = fit.main(["--data", str(dataset64), "--out", str(tmp_path / "a"), "--preset", "smoke", "--max-steps", "12",
                     "--expression-warmup", "8", "--no-eval", "--seed", "3"])
    assert code == 0 and len(seen) >= 12
    train = load_split(dataset64, "train", with_images=False).expressions
    calmest = np.asarray(expression_stats(train)["neutral"])  # the avatar's neutral (least expressive frame)
    first, rest = seen[:8], seen[8:12]
    assert all(np.allclose(e.numpy(), calmest) for e in first)
    assert not all(np.allclose(e.numpy(), calmest) for e in rest)
