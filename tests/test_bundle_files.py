"""The bundle's exported files: written atomically through avatar.bundle.files, engines.json checked when read,
and an export made from other weights (or another bundle version) never used as if it were current."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from avatar.base.errors import DamagedFile, UserError
from avatar.bundle.bundle import load_bundle, save_bundle
from avatar.bundle.files import (
    BUNDLE_FILES,
    ENGINES_FILE,
    EXPORT_FILES,
    OCCUPANCY_CACHE,
    ONNX_BLEND,
    ONNX_MODEL,
    TRT_MODEL,
    bundle_files,
    export_identity,
    export_is_current,
    load_occupancy_cache,
    onnx_destination,
    save_engines_record,
    save_occupancy_cache,
    save_tensorrt_plan,
)
from avatar.engines.choice import open_engine
from tests.conftest import ROOT, run_script

DEMO = ROOT / "assets" / "demo" / "avatar"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The demo avatar without its exported files, exported again by export/build.py (small and quick), with
    the names of the files it held before."""
    out = tmp_path_factory.mktemp("bundle_files") / "avatar"
    shutil.copytree(DEMO, out, ignore=shutil.ignore_patterns(*EXPORT_FILES))
    before = {p.name for p in out.iterdir()}
    r = run_script("export/build.py", str(out), "--frames", "2", "--render-size", "32", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return out, before


@pytest.fixture
def bundle(exported, tmp_path):
    out = tmp_path / "avatar"
    shutil.copytree(exported[0], out)
    return out


def _record(out):
    return json.loads((out / ENGINES_FILE).read_text())


def _set_fps(out, fps):
    """engines.json measuring ``fps`` (kept current: the identity of the bundle as it is)."""
    record = {k: v for k, v in _record(out).items() if k not in ("bundle_version", "weights_sha256")}
    save_engines_record(out, {**record, "fps": fps, "auto": max(fps, key=fps.get)}, export_identity(out))


def _retrain(out):
    """What trainer/fit.py --overwrite into the same folder does to a bundle: other weights, same file names."""
    loaded = load_bundle(out)
    with torch.no_grad():
        next(loaded.model.parameters()).add_(0.01)
    full = {k: v for k, v in loaded.meta["full_frame"].items() if k != "plate"}
    save_bundle(out, loaded.model, dict(loaded.meta), (loaded.background.numpy() * 255).astype(np.uint8),
                full_frame=(full, loaded.plate))


def test_bundle_files_covers_what_export_writes(exported):
    out, before = exported
    written = {p.name for p in out.iterdir()} - before
    assert written >= {ONNX_MODEL, ONNX_BLEND, OCCUPANCY_CACHE, ENGINES_FILE}
    assert {p.name for p in bundle_files(out)} == {p.name for p in out.iterdir()}  # nothing unlisted, no temp files
    assert set(BUNDLE_FILES) >= written | {TRT_MODEL}
    record = _record(out)
    assert record["bundle_version"] == 2 and record["weights_sha256"] == export_identity(out)["weights_sha256"]
    assert export_is_current(out)


@pytest.mark.parametrize("case, words", [
    ("not_json", "not valid JSON"), ("fps_text", "'fps'"), ("fps_negative", "positive numbers"),
    ("listed_missing", "blend.onnx, which is missing"), ("listed_outside", "not an exported file"),
    ("files_number", "'files'"), ("sha_short", "SHA-256")])
def test_a_damaged_engines_json_is_refused_in_one_line(bundle, case, words):
    record = _record(bundle)
    edits = {"fps_text": {"fps": "fast"}, "fps_negative": {"fps": {"onnxruntime": -1}},
             "listed_outside": {"files": {"onnx": ["../avatar.json"]}}, "files_number": {"files": {"onnx": [3]}},
             "sha_short": {"weights_sha256": "abc"}}
    if case == "not_json":
        (bundle / ENGINES_FILE).write_text(json.dumps(record)[:40])
    elif case == "listed_missing":
        (bundle / ONNX_BLEND).unlink()
    else:
        (bundle / ENGINES_FILE).write_text(json.dumps({**record, **edits[case]}))
    loaded = load_bundle(bundle)
    for name in ("auto", "torch", "onnxruntime"):  # fatal whichever engine would run: never a fallback
        with pytest.raises(DamagedFile) as err:
            open_engine(loaded, bundle, name, log=pytest.fail)
        assert words in str(err.value) and "\n" not in str(err.value) and "export/build.py" in str(err.value)


def test_live_loop_refuses_a_damaged_engines_json_in_one_line(bundle, tmp_path):
    (bundle / ENGINES_FILE).write_text("{\"fps\": ")
    out = tmp_path / "out.mp4"
    r = run_script("run_live.py", "--target", str(bundle), "--source", str(DEMO.parent / "driver.mp4"), "--sink",
                   f"file:{out}", "--max-frames", "1", "--render-size", "32", "--quiet", timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr[-2000:]
    assert ENGINES_FILE in lines[0] and not out.exists()


def test_a_stale_export_is_never_used(bundle):
    _set_fps(bundle, {"onnxruntime": 100.0, "fused": 2.0, "torch": 1.0})
    said = []
    assert open_engine(load_bundle(bundle), bundle, "auto", log=said.append).name == "onnxruntime" and not said
    _retrain(bundle)  # the avatar retrained into the same folder: the ONNX graphs are of the old weights
    loaded = load_bundle(bundle)
    assert open_engine(loaded, bundle, "auto", log=said.append).name == "fused"
    assert len(said) == 1 and "stale" in said[0] and "weights changed" in said[0]
    assert f"export/build.py {bundle}" in said[0]
    for name in ("onnxruntime", "tensorrt"):
        with pytest.raises(UserError, match="stale") as err:
            open_engine(loaded, bundle, name)
        assert "\n" not in str(err.value) and "export/build.py" in str(err.value)
    assert not export_is_current(bundle)


@pytest.mark.parametrize("edit, words", [
    (lambda r: {k: v for k, v in r.items() if k not in ("bundle_version", "weights_sha256")}, "older exporter"),
    (lambda r: {**r, "bundle_version": 1}, "bundle format version 1")])
def test_an_old_or_other_version_export_is_stale(bundle, edit, words):
    _set_fps(bundle, {"onnxruntime": 100.0, "fused": 2.0, "torch": 1.0})
    (bundle / ENGINES_FILE).write_text(json.dumps(edit(_record(bundle))))
    loaded, said = load_bundle(bundle), []
    assert open_engine(loaded, bundle, "auto", log=said.append).name == "fused"
    assert len(said) == 1 and words in said[0] and "export/build.py" in said[0]
    with pytest.raises(UserError, match=words):
        open_engine(loaded, bundle, "onnxruntime")


def test_tensorrt_needs_a_plan_in_the_current_export(bundle):
    (bundle / TRT_MODEL).write_bytes(b"a plan from some other export")
    with pytest.raises(UserError, match=f"has no {TRT_MODEL}.*--build tensorrt"):
        open_engine(load_bundle(bundle), bundle, "tensorrt", device="cpu")


def _listing(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_export_writes_are_atomic(bundle, monkeypatch):
    """A writer that fails half way leaves every file as it was and no temporary file behind."""
    import export.build as build

    before = _listing(bundle)

    def half_export(module, args, f, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half a graph")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.onnx, "export", half_export)
    with pytest.raises(RuntimeError, match="disk full"):
        build.export_onnx(load_bundle(bundle), bundle)
    assert _listing(bundle) == before
    with pytest.raises(RuntimeError, match="disk full"), onnx_destination(bundle, ONNX_BLEND) as tmp:
        half_export(None, None, tmp)
    assert _listing(bundle) == before

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    grid, step = load_occupancy_cache(bundle / OCCUPANCY_CACHE)
    writers = [lambda: save_occupancy_cache(bundle / OCCUPANCY_CACHE, grid, step),
               lambda: save_tensorrt_plan(bundle, b"plan"),
               lambda: save_engines_record(bundle, {"fps": {"torch": 1.0}}, export_identity(bundle))]
    for write in writers:
        with pytest.raises(OSError, match="No space"):
            write()
        assert _listing(bundle) == before
