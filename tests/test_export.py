import json
import shutil

import numpy as np
import pytest
import torch

from avatar.bundle.bundle import load_bundle, save_bundle
from avatar.engines.choice import open_engine
from avatar.engines.onnx import OnnxEngine
from avatar.engines.tensorrt import tensorrt_unavailable_reason
from avatar.engines.torch_engine import TorchEngine
from tests.conftest import run_script

TRT_REASON = tensorrt_unavailable_reason()


@pytest.fixture(scope="module")
def exported(fast_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "avatar"
    shutil.copytree(fast_bundle, out)
    r = run_script("export/build.py", str(out), "--frames", "4", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "parity" in r.stdout
    return out, r.stdout


@pytest.mark.parametrize("bundle", ["deferred_bundle", "linear_density_bundle"])
def test_a_deferred_fields_export_has_its_shading_graph_and_matches_torch(request, bundle, subject, tmp_path):
    """--shading deferred: model.onnx gives each sample's features and density (no view direction), shade.onnx
    the per-pixel colour; ONNX Runtime renders what the torch engine renders (density head hidden or linear)."""
    out = tmp_path / "avatar"
    shutil.copytree(request.getfixturevalue(bundle), out)
    r = run_script("export/build.py", str(out), "--frames", "3", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads((out / "engines.json").read_text())
    assert "shade.onnx" in record["files"]["onnx"] and (out / "shade.onnx").is_file()
    assert record["parity"]["onnxruntime_fp32_max_abs_255"] <= 2
    fused = [k for k in record["parity"] if k.startswith("fused_")]  # bf16 shading where the CPU has it natively
    assert len(fused) == 1 and record["parity"][fused[0]] <= 2
    import onnx

    assert [i.name for i in onnx.load(str(out / "model.onnx")).graph.input] == ["planes", "latent_bias", "points"]
    assert [o.name for o in onnx.load(str(out / "model.onnx")).graph.output] == ["features", "sigma"]
    loaded = load_bundle(out)
    torch_engine, ort_engine = TorchEngine(loaded), OnnxEngine(loaded, out)
    pose = np.asarray(loaded.meta["reference_head_pose"])
    expr = np.asarray(loaded.meta["expression_stats"]["neutral"])
    a, b = (e.render(expr, pose, loaded.latent(1), 48) for e in (torch_engine, ort_engine))
    assert float(((a["rgb"] * 255).round() - (b["rgb"] * 255).round()).abs().max()) <= 2
    assert a["alpha"].max() > 0.5
    (out / "shade.onnx").unlink()  # a damaged export: one line naming what to run
    r = run_script("run_live.py", "--target", str(out), "--engine", "onnxruntime", "--source",
                   str(subject / "video.mp4"), "--max-frames", "1", "--sink", f"file:{tmp_path / 'x.mp4'}", timeout=300)
    assert r.returncode != 0 and "shade.onnx" in r.stderr and "Traceback" not in r.stderr


def test_build_writes_graphs_occupancy_cache_and_engine_record(exported):
    out, stdout = exported
    for name in ("model.onnx", "blend.onnx", "occupancy.safetensors", "engines.json"):
        assert (out / name).is_file(), name
    record = json.loads((out / "engines.json").read_text())
    assert record["parity"]["onnxruntime_fp32_max_abs_255"] <= 2
    assert set(record["fps"]) >= {"torch", "onnxruntime"} and record["auto"] in record["fps"]
    import onnx

    model = onnx.load(str(out / "model.onnx"))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert model.graph.input[2].type.tensor_type.shape.dim[0].dim_param  # dynamic number of samples


def test_onnxruntime_engine_matches_torch_within_2_of_255(exported):
    out, _ = exported
    loaded = load_bundle(out)
    torch_engine, ort_engine = TorchEngine(loaded), OnnxEngine(loaded, out)
    stats = loaded.meta["expression_stats"]
    rng = np.random.default_rng(1)
    for i in range(3):
        expr = np.asarray(stats["min"]) + (np.asarray(stats["max"]) - np.asarray(stats["min"])) * rng.uniform(0, 1, 52)
        pose = np.asarray(loaded.meta["reference_head_pose"])
        a = torch_engine.render(expr, pose, loaded.latent(i), 64)
        b = ort_engine.render(expr, pose, loaded.latent(i), 64)
        assert a["rgb"].shape == (64, 64, 3) and a["alpha"].shape == (64, 64)
        diff = ((a["rgb"] * 255).round() - (b["rgb"] * 255).round()).abs().max()
        assert diff <= 2, diff
        assert a["alpha"].max() > 0.5  # the head is there, not just background
    record = json.loads((out / "engines.json").read_text())
    fastest = max(record["fps"], key=record["fps"].get)
    said = []
    assert open_engine(loaded, out, "auto", log=said.append).name == record["auto"] == fastest and not said


def test_engines_see_an_avatar_and_not_only_background(exported):
    out, _ = exported
    loaded = load_bundle(out)
    frame = OnnxEngine(loaded, out).render(np.asarray(loaded.meta["expression_stats"]["neutral"]),
                                           np.asarray(loaded.meta["reference_head_pose"]), loaded.latent(0), 64)
    bg = torch.nn.functional.interpolate(loaded.background.permute(2, 0, 1)[None], size=(64, 64), mode="bilinear",
                                         antialias=True)[0].permute(1, 2, 0)
    assert (frame["rgb"] - bg).abs().mean() > 0.02


@pytest.mark.skipif(TRT_REASON is not None, reason=TRT_REASON or "")
def test_tensorrt_engine_matches_torch(exported):
    out, _ = exported
    r = run_script("export/build.py", str(out), "--build", "tensorrt", "--frames", "4", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads((out / "engines.json").read_text())
    assert record["parity"]["tensorrt_fp32_max_abs_255"] <= 2


@pytest.mark.skipif(TRT_REASON is None, reason="a TensorRT-capable GPU is present")
def test_tensorrt_without_a_gpu_is_one_clear_line(fast_bundle):
    r = run_script("export/build.py", str(fast_bundle), "--build", "tensorrt")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "NVIDIA GPU" in lines[0]


def test_bad_inputs_are_one_line(tmp_path):
    r = run_script("export/build.py", str(tmp_path / "nothing"))
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    from avatar.field.model import Avatar

    paper = Avatar("nerface", dict(box_min=[-1, -1, -1], box_max=[1, 1, 1], expression_dim=52, width=8, depth=2),
                   num_frames=1)
    save_bundle(tmp_path / "paper", paper, {"intrinsics": [1, 1, 8, 8], "image_size": [16, 16],
                                            "expression_names": ["x"] * 52, "sampling": {}},
                np.zeros((16, 16, 3), np.uint8))
    r = run_script("export/build.py", str(tmp_path / "paper"))
    assert r.returncode == 2 and "fast" in r.stderr and len(r.stderr.strip().splitlines()) == 1
