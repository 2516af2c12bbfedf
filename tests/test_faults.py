"""Damaged files and failing writes: one clear line and a non-zero exit, and nothing that was whole is lost."""

import json
import resource
import shutil
import sys

import numpy as np
import pytest

from avatar.base.errors import UserError
from avatar.bundle.bundle import load_bundle, save_bundle
from avatar.bundle.files import OCCUPANCY_CACHE, save_occupancy_cache
from avatar.field.training import CHECKPOINT_FILE, checkpoint_step
from tests.conftest import ROOT, TINY_FIT, run_script


@pytest.fixture(scope="module")
def exported_copy(fast_bundle, tmp_path_factory):
    """The fast avatar with its occupancy cache written beside it (what export/build.py adds for the engines)."""
    out = tmp_path_factory.mktemp("faults") / "avatar"
    shutil.copytree(fast_bundle, out, ignore=shutil.ignore_patterns("tb", "sheets", CHECKPOINT_FILE))
    loaded = load_bundle(out)
    save_occupancy_cache(out / OCCUPANCY_CACHE, loaded.model.occupancy, loaded.sampling.step)
    return out


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0x10  # a bit in the tensor data: the header still parses
    path.write_bytes(bytes(data))


def _wrong_shapes(meta):
    return {**meta, "intrinsics": [100.0, 100.0]}


def _wrong_pose(meta):
    return {**meta, "reference_head_pose": [[1, 0, 0], [0, 1, 0]]}


def _wrong_names(meta):
    return {**meta, "expression_names": meta["expression_names"][:10]}


def _wrong_stats(meta):
    return {**meta, "expression_stats": {**meta["expression_stats"], "neutral": "calm"}}


@pytest.mark.parametrize("case, words", [
    ("weights_truncated", "weights"), ("weights_flipped", "checksum"), ("occupancy_truncated", "occupancy"),
    ("occupancy_flipped", "checksum"), ("intrinsics", "'intrinsics'"), ("pose", "'reference_head_pose'"),
    ("names", "'expression_names'"), ("stats", "'expression_stats'")])
def test_damaged_bundle_is_one_line_for_the_live_loop(exported_copy, subject, tmp_path, case, words):
    bad = tmp_path / "bad"
    shutil.copytree(exported_copy, bad)
    fixers = {"intrinsics": _wrong_shapes, "pose": _wrong_pose, "names": _wrong_names, "stats": _wrong_stats}
    if case in fixers:
        meta = json.loads((bad / "avatar.json").read_text())
        (bad / "avatar.json").write_text(json.dumps(fixers[case](meta)))
    else:
        target = bad / ("weights.safetensors" if case.startswith("weights") else OCCUPANCY_CACHE)
        (_truncate if case.endswith("truncated") else _flip)(target)
    out = tmp_path / "out.mp4"
    r = run_script("run_live.py", "--target", str(bad), "--source", str(subject / "video.mp4"), "--sink",
                   f"file:{out}", "--max-frames", "2", "--render-size", "64", "--quiet", timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr[-2000:]
    assert words in lines[0], lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_the_auto_engine_does_not_fall_back_past_a_damaged_cache(exported_copy, tmp_path):
    """A missing library is a reason to try the next engine; a damaged file in the bundle is not."""
    from avatar.base.errors import DamagedFile
    from avatar.bundle.files import export_identity, save_engines_record
    from avatar.engines.choice import open_engine

    bad = tmp_path / "bad"
    shutil.copytree(exported_copy, bad)
    save_engines_record(bad, {"fps": {"onnxruntime": 9.0, "torch": 1.0}, "auto": "onnxruntime"}, export_identity(bad))
    loaded = load_bundle(bad)
    said = []
    # No model.onnx here: onnxruntime cannot open, and auto falls back to torch, saying why in one line.
    assert open_engine(loaded, bad, "auto", log=said.append).name == "torch"
    assert len(said) == 1 and "onnxruntime unavailable" in said[0] and "model.onnx" in said[0]
    _flip(bad / OCCUPANCY_CACHE)
    with pytest.raises(DamagedFile, match="checksum"):
        open_engine(loaded, bad, "auto", log=said.append)
    with pytest.raises(DamagedFile):
        open_engine(loaded, bad, "torch")


class torch_zeroed:
    """Temporarily zero a model's parameters (so a second save would write different bytes)."""

    def __init__(self, model):
        self.model, self.saved = model, None

    def __enter__(self):
        import torch

        self.saved = {k: v.clone() for k, v in self.model.state_dict().items()}
        with torch.no_grad():
            for p in self.model.parameters():
                p.zero_()

    def __exit__(self, *exc):
        self.model.load_state_dict(self.saved)


def test_a_bundle_write_that_fails_half_way_leaves_the_previous_bundle_whole(fast_bundle, tmp_path):
    """RLIMIT_FSIZE stops the second save half way through its weights: the first bundle must still load."""
    out = tmp_path / "avatar"
    loaded = load_bundle(fast_bundle)
    bg = (loaded.background.numpy() * 255).astype(np.uint8)
    save_bundle(out, loaded.model, {k: v for k, v in loaded.meta.items()}, bg)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    weights_size = len(before["weights.safetensors"])
    with torch_zeroed(loaded.model):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (weights_size // 2, hard))
        try:
            with pytest.raises(UserError, match="cannot write the avatar bundle"):
                save_bundle(out, loaded.model, dict(loaded.meta), bg)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == before  # no temporary leftovers, every file as it was
    reloaded = load_bundle(out)
    assert any(float(p.detach().abs().sum()) > 0 for p in reloaded.model.parameters())


def test_a_checkpoint_write_that_fails_half_way_is_one_line_and_keeps_the_previous_one(dataset64, tmp_path):
    import subprocess

    out = tmp_path / "run"
    r = run_script("trainer/fit.py", "--data", str(dataset64), "--out", str(out), "--preset", "smoke",
                   "--max-steps", "10", "--checkpoint-every", "5", "--no-eval", *TINY_FIT)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = out / CHECKPOINT_FILE
    saved = ckpt.read_bytes()
    assert checkpoint_step(ckpt) == 10
    limit = len(saved) // 2

    def limit_file_size():  # CPython ignores SIGXFSZ, so an oversized write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    p = subprocess.run([sys.executable, "trainer/fit.py", "--out", str(out), "--resume", "--max-steps", "20",
                        "--no-eval"], cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: cannot write checkpoint"), p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert ckpt.read_bytes() == saved and checkpoint_step(ckpt) == 10
    assert not [f for f in out.iterdir() if f.name.startswith(f".{CHECKPOINT_FILE}")]
    r = run_script("trainer/fit.py", "--out", str(out), "--resume", "--max-steps", "15", "--no-eval")
    assert r.returncode == 0, r.stderr[-2000:]  # and training goes on from it
    assert checkpoint_step(ckpt) == 15
