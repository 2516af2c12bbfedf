"""The GPU path's CPU-testable parts: the per-ray scan's accuracy, --device everywhere, engine fallbacks, fp16
without mutation, and the TensorRT logic (profiles, error checks) against a fake ``tensorrt`` module."""

import json
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from avatar.base.errors import UserError
from avatar.bundle.bundle import load_bundle
from tests.conftest import run_script


# -- the scan ----------------------------------------------------------------------------------------------------
def test_packed_compositing_is_accurate_at_262k_rays():
    """512² rays × 12 samples, densities spanning orders of magnitude: within 1/255 of a float64 per-ray
    reference (one float32 cumsum over all samples was off by ~200/255 here)."""
    from avatar.render.march import composite_packed

    g = torch.Generator().manual_seed(0)
    n, s, step = 512 * 512, 12, 0.1
    sigma = torch.exp(torch.randn(n * s, generator=g) * 3)
    rgb = torch.rand(n * s, 3, generator=g)
    t = torch.rand(n * s, generator=g)
    rays = torch.arange(n).repeat_interleave(s)
    out = composite_packed(rays, t, sigma, rgb, step, n, torch.ones(n))
    # reference: dense [n, s] layout, transmittance by cumprod, in float64
    alpha = 1 - torch.exp(-sigma.double().reshape(n, s) * step)
    trans = torch.cumprod(torch.cat([torch.ones(n, 1, dtype=torch.float64), 1 - alpha[:, :-1]], 1), 1)
    weights = trans * alpha
    ref_rgb = (weights[..., None] * rgb.double().reshape(n, s, 3)).sum(1)
    assert float((out["rgb"].double() - ref_rgb).abs().max()) * 255 <= 1
    assert float((out["weights"].double() - weights.reshape(-1)).abs().max()) * 255 <= 1
    assert float((out["transmittance"].double() - trans[:, -1] * (1 - alpha[:, -1])).abs().max()) * 255 <= 1


# -- --device ----------------------------------------------------------------------------------------------------
def test_pick_device_names():
    from avatar.base.devices import pick_device

    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(UserError, match="unknown device"):
        pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            pick_device("cuda:0")


@pytest.fixture(scope="module")
def bundle_copy(fast_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpupath") / "avatar"
    shutil.copytree(fast_bundle, out)
    return out


def test_device_cpu_is_accepted_by_every_command(bundle_copy, dataset64, tmp_path):
    r = run_script("export/build.py", str(bundle_copy), "--device", "cpu", "--frames", "2", "--render-size", "32", "--fp16")
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads((bundle_copy / "engines.json").read_text())
    assert record["device"] == "cpu"
    r = run_script("trainer/render.py", str(bundle_copy), "--device", "cpu", "--render-size", "32", "--frames", "2",
                   "--out", str(tmp_path / "r.mp4"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_script("trainer/evaluate.py", str(bundle_copy), "--data", str(dataset64), "--device", "cpu", "--frames",
                   "1", "--out", str(tmp_path / "ev"))
    assert r.returncode == 0, r.stderr[-2000:]
    # fit.py --device cpu runs in tests/test_fit.py (the DDP test); run_live.py takes it as well:
    from streamer.app import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["--target", str(bundle_copy), "--device", "cpu"]))
    assert cfg.device == "cpu"
    for script in ("trainer/fit.py", "trainer/evaluate.py", "trainer/render.py", "export/build.py", "run_live.py"):
        r = run_script(script, "--help")
        assert "--device" in r.stdout, script


def test_bad_device_is_one_line(bundle_copy):
    r = run_script("export/build.py", str(bundle_copy), "--device", "tpu")
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1


# -- engines -----------------------------------------------------------------------------------------------------
def test_auto_falls_back_with_one_line_per_failed_engine(bundle_copy, tmp_path, monkeypatch):
    from avatar.bundle.files import OCCUPANCY_CACHE, export_identity, save_engines_record, save_occupancy_cache
    from avatar.engines.choice import open_engine
    from avatar.engines.onnx import OnnxEngine

    out = tmp_path / "broken"
    shutil.copytree(bundle_copy, out)
    loaded = load_bundle(out)
    save_occupancy_cache(out / OCCUPANCY_CACHE, loaded.model.occupancy, loaded.sampling.step)
    (out / "model.onnx").write_bytes(b"not an onnx graph")
    (out / "blend.onnx").write_bytes(b"not an onnx graph either")
    save_engines_record(out, {"fps": {"tensorrt": 300.0, "onnxruntime": 90.0, "torch": 10.0},
                              "files": {"onnx": ["blend.onnx", "model.onnx"], "occupancy": OCCUPANCY_CACHE}},
                        export_identity(out))
    lines: list[str] = []
    engine = open_engine(load_bundle(out), out, "auto", "cpu", log=lines.append)
    assert engine.name == "torch"
    assert len(lines) == 2 and lines[0].startswith("engine tensorrt unavailable here (") and "onnxruntime" in lines[1]
    assert "cannot load" in lines[1]
    # any failure, not only a UserError (e.g. a CUDA library error inside a provider), falls back the same way
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA driver version is insufficient\nsecond line")

    monkeypatch.setattr(OnnxEngine, "__init__", broken)
    lines.clear()
    assert open_engine(load_bundle(out), out, "auto", "cpu", log=lines.append).name == "torch"
    assert lines[-1] == "engine onnxruntime unavailable here (CUDA driver version is insufficient); trying the next"


def test_engine_on_another_device_leaves_the_shared_model_alone(bundle_copy):
    """An engine on another device renders from its own copy (here: the 'meta' device stands in for CUDA)."""
    from avatar.engines.base import _on_device

    loaded = load_bundle(bundle_copy)
    moved = _on_device(loaded.model, torch.device("meta"))
    assert moved is not loaded.model and next(moved.parameters()).device.type == "meta"
    assert next(loaded.model.parameters()).device.type == "cpu"
    assert _on_device(loaded.model, torch.device("cpu")) is loaded.model


def test_compiled_decoder_matches_eager_and_falls_back_in_one_line(bundle_copy, monkeypatch):
    """The decoder under torch.compile renders what eager does; where compiling fails the
    engine says so once and renders without it."""
    from avatar.engines.torch_engine import TorchEngine
    sys.path.insert(0, str(bundle_copy.parents[2]))
    from export.build import parity_frames

    loaded = load_bundle(bundle_copy)
    frame = parity_frames(loaded, 2, seed=3)[1]
    eager = TorchEngine(loaded, compile=False)
    assert not eager.compiled and not TorchEngine(loaded).compiled  # auto: compiled on CUDA only
    reference = (eager.render(*frame, 24)["rgb"] * 255).round()
    compiled = TorchEngine(loaded, compile=True)
    assert compiled.compiled
    assert float(((compiled.render(*frame, 24)["rgb"] * 255).round() - reference).abs().max()) <= 1

    def no_compiler(fn, **kwargs):
        def fails(*args):
            raise RuntimeError("Compiler: cc not found\nmore")
        return fails

    monkeypatch.setattr(torch, "compile", no_compiler)
    lines = []
    broken = TorchEngine(loaded, compile=True, log=lines.append)
    first = (broken.render(*frame, 24)["rgb"] * 255).round()
    broken.render(*frame, 24)
    assert torch.equal(first, reference) and not broken.compiled
    assert lines == ["torch.compile of the decoder failed here (Compiler: cc not found); rendering without it"]


def test_fixed_block_count_plan_renders_the_same(bundle_copy):
    """The GPU's block plan has a fixed shape (the box diagonal's block count, no host sync): the blocks past
    every ray's end are never kept, so the frame is the same as with the exact count the CPU computes."""
    from avatar.engines.torch_engine import TorchEngine
    from avatar.render.march import block_plan, max_blocks
    from avatar.render.rays import frame_rays, intersect_box, pixel_grid
    sys.path.insert(0, str(bundle_copy.parents[2]))
    from export.build import parity_frames

    loaded = load_bundle(bundle_copy)
    frame = parity_frames(loaded, 2, seed=4)[1]
    exact = TorchEngine(loaded)
    fixed = TorchEngine(loaded)
    fixed._n_blocks = max_blocks(fixed.box_min, fixed.box_max, fixed.step, fixed.grid.block_steps(fixed.step))
    k = torch.as_tensor(loaded.intrinsics * (24 / loaded.image_size[1]), dtype=torch.float32)
    rays = frame_rays(pixel_grid(24, 24), k, torch.as_tensor(frame[1], dtype=torch.float32), fixed.box_min, fixed.box_max)
    args = (fixed.grid, rays["origins"], rays["dirs"], rays["near"], rays["far"], fixed.step)
    a, b = block_plan(*args), block_plan(*args, n_blocks=fixed._n_blocks)
    assert b["keep"].shape[1] > a["keep"].shape[1] > 0
    assert torch.equal(b["keep"][:, :a["keep"].shape[1]], a["keep"]) and not b["keep"][:, a["keep"].shape[1]:].any()
    assert torch.equal(exact.render(*frame, 24)["rgb"], fixed.render(*frame, 24)["rgb"])
    # the bound holds for the longest rays there are (the box's diagonals, steps starting at offset 0), and is
    # tight: one block of slack at most
    rng = np.random.default_rng(0)
    for _ in range(200):
        lo = torch.tensor(rng.uniform(-15, -5, 3), dtype=torch.float32)
        hi = torch.tensor(rng.uniform(5, 15, 3), dtype=torch.float32)
        step, block = float(rng.uniform(0.1, 0.5)), int(rng.integers(1, 33))
        corners = torch.stack([torch.where(torch.tensor([i & 1, i & 2, i & 4]).bool(), hi, lo) for i in range(8)])
        dirs = (corners.flip(0) - corners) / (corners.flip(0) - corners).norm(dim=-1, keepdim=True)
        near, far, _ = intersect_box(corners - dirs * 5.0, dirs, lo, hi)
        needed = -(-int(torch.ceil((far - near).max() / step)) // block)
        assert needed <= max_blocks(lo, hi, step, block) <= needed + 1


def test_graph_capture_failure_falls_back_in_one_line(bundle_copy, monkeypatch):
    from avatar.engines.torch_engine import TorchEngine
    sys.path.insert(0, str(bundle_copy.parents[2]))
    from export.build import parity_frames

    loaded = load_bundle(bundle_copy)
    frame = parity_frames(loaded, 2, seed=5)[1]
    assert not TorchEngine(loaded).graphs  # CUDA only
    lines = []
    spy = TorchEngine(loaded)
    spy.front = lambda size, *a: (captured.append(size), TorchEngine.front(spy, size, *a))[1]
    captured = []
    assert spy.warm_up(20) > 0 and captured == [20]  # the live loop's warm-up renders once at its size
    engine = TorchEngine(loaded, log=lines.append)
    engine.graphs = True  # as on CUDA, where the capture then fails

    def fails(*args):
        raise RuntimeError("operation not permitted when stream is capturing\ndetails")

    monkeypatch.setattr(engine, "_capture", fails)
    first = engine.render(*frame, 24)["rgb"]
    engine.render(*frame, 24)
    assert torch.equal(first, TorchEngine(loaded).render(*frame, 24)["rgb"]) and not engine.graphs
    assert lines == ["CUDA graph capture failed here (operation not permitted when stream is capturing); "
                     "rendering without graphs"]


def test_fp16_parity_does_not_mutate_the_model(bundle_copy):
    sys.path.insert(0, str(bundle_copy.parents[2]))
    from export.build import fp16_parity, parity_frames

    loaded = load_bundle(bundle_copy)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    frames = parity_frames(loaded, 2)
    first = fp16_parity(loaded, frames, 24)
    second = fp16_parity(loaded, frames, 24)
    after = loaded.model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert first == second or (np.isnan(first) and np.isnan(second))
    if not np.isnan(first):
        assert first <= 8


def test_ort_io_binding_writes_outputs_in_place(bundle_copy):
    """The binding path the CUDA provider uses, run here on CPU memory: same numbers as session.run."""
    import onnxruntime as ort

    from avatar.bundle.files import ONNX_MODEL
    from avatar.engines.onnx import run_bound
    from export.build import export_onnx

    loaded = load_bundle(bundle_copy)
    export_onnx(loaded, bundle_copy)
    sess = ort.InferenceSession(str(bundle_copy / ONNX_MODEL), providers=["CPUExecutionProvider"])
    field = loaded.model.field
    with torch.no_grad():
        planes, bias = field.frame_state(torch.zeros(field.hparams["expression_dim"]),
                                         torch.zeros(field.hparams["latent_dim"]), channels_last=True)
    pts = field.center + (torch.rand(100, 3) - 0.5) * field.half_extent
    dirs = torch.nn.functional.normalize(torch.randn(100, 3), dim=-1)
    rgb, sigma = torch.full((100, 3), -1.0), torch.full((100,), -1.0)
    run_bound(sess, {"planes": planes, "latent_bias": bias, "points": pts, "dirs": dirs}, {"rgb": rgb, "sigma": sigma})
    ref_rgb, ref_sigma = sess.run(None, {"planes": planes.numpy(), "latent_bias": bias.numpy(), "points": pts.numpy(),
                                         "dirs": dirs.numpy()})
    assert np.allclose(rgb.numpy(), ref_rgb) and np.allclose(sigma.numpy(), ref_sigma)


def test_onnx_gpu_providers_are_asked_for():
    from avatar.engines.onnx import onnx_providers

    assert onnx_providers("gpu", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["CUDAExecutionProvider",
                                                                                         "CPUExecutionProvider"]
    assert onnx_providers("gpu", ["CPUExecutionProvider", "TensorrtExecutionProvider", "CUDAExecutionProvider"])[0] \
        == "TensorrtExecutionProvider"
    assert onnx_providers("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]


# -- TensorRT against a fake module ------------------------------------------------------------------------------
def _fake_trt(engine=True, context=True, shape_ok=True, run_ok=True):
    trt = types.SimpleNamespace(__version__="10.fake", float32="f32", float16="f16", calls=[])

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Context:
        def set_input_shape(self, name, shape):
            trt.calls.append(("shape", name, shape))
            return shape_ok

        def set_tensor_address(self, name, ptr):
            trt.calls.append(("address", name))
            return True

        def execute_async_v3(self, stream):
            trt.calls.append(("run", stream))
            return run_ok

    class Engine:
        def create_execution_context(self):
            return Context() if context else None

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            return Engine() if engine else None

    trt.Logger, trt.Runtime = Logger, Runtime
    trt.LayerType = types.SimpleNamespace(MATRIX_MULTIPLY="mm", UNARY="unary", GATHER="gather")
    return trt


def test_stale_tensorrt_plan_is_one_clear_line(tmp_path):
    from avatar.engines.tensorrt import load_plan

    with pytest.raises(UserError, match="does not load on this GPU / TensorRT 10.fake"):
        load_plan(_fake_trt(engine=False), b"plan", tmp_path)
    with pytest.raises(UserError, match="execution context"):
        load_plan(_fake_trt(context=False), b"plan", tmp_path)
    assert len(load_plan(_fake_trt(), b"plan", tmp_path)) == 3


def test_tensorrt_call_results_are_checked():
    from avatar.engines.tensorrt import run_plan

    ins = {"points": torch.zeros(5, 3), "dirs": torch.zeros(5, 3)}
    outs = {"rgb": torch.zeros(5, 3), "sigma": torch.zeros(5)}
    trt = _fake_trt()
    run_plan(trt.Runtime(None).deserialize_cuda_engine(b"").create_execution_context(), ins, outs, 7)
    assert ("shape", "points", (5, 3)) in trt.calls and trt.calls[-1] == ("run", 7)
    for kw, msg in (({"shape_ok": False}, "rejected input points"), ({"run_ok": False}, "failed to run")):
        ctx = _fake_trt(**kw).Runtime(None).deserialize_cuda_engine(b"").create_execution_context()
        with pytest.raises(UserError, match=msg):
            run_plan(ctx, ins, outs, 7)


def test_tensorrt_profile_and_fp16_precision_pins():
    from avatar.base.devices import GPU_CHUNK
    from avatar.engines.tensorrt import sample_profile
    from export.build import keep_fp32_outside_matmuls

    lo, opt, hi = sample_profile()
    assert lo == 1 and opt == GPU_CHUNK and hi >= opt  # the opt size is the chunk the marcher actually sends
    assert sample_profile(1000) == (1, 1000, 1000)
    trt = _fake_trt()

    class Tensor:
        def __init__(self, dtype):
            self.dtype = dtype

    class Layer:
        def __init__(self, kind, dtype):
            self.type, self.num_outputs, self._out, self.precision, self.out_type = kind, 1, Tensor(dtype), None, None

        def get_output(self, i):
            return self._out

        def set_output_type(self, i, dtype):
            self.out_type = dtype

    layers = [Layer("gather", "int64"), Layer("unary", "f32"), Layer("mm", "f32"), Layer("gather", "f32")]
    network = types.SimpleNamespace(num_layers=len(layers), get_layer=lambda i: layers[i])
    assert keep_fp32_outside_matmuls(network, trt) == 2
    assert [layer.precision for layer in layers] == [None, "f32", None, "f32"]


def test_tensorrt_import_failure_of_any_kind_is_a_reason(tmp_path, monkeypatch):
    from avatar.engines.tensorrt import tensorrt_unavailable_reason

    (tmp_path / "tensorrt.py").write_text("raise OSError('libnvinfer.so.10: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    reason = tensorrt_unavailable_reason()
    assert reason and "OSError" in reason and "libnvinfer" in reason
