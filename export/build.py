"""Export a fast-field avatar for fast inference: ONNX graphs, a TensorRT engine, the occupancy cache; time every
engine that runs here (the CPU's fused engine included).

    python export/build.py avatars/me                       # ONNX (+ occupancy cache), parity and timing
    python export/build.py avatars/me --build all           # also TensorRT where an NVIDIA GPU is present
    python export/build.py avatars/me --build tensorrt --fp16

Writes into the bundle: blend.onnx (once per frame: expression, latent code → blended tri-planes), model.onnx
(per sample, dynamic sample count: colour and density; for a deferred-shading field its features and density, and
shade.onnx: the per-pixel colour MLP), occupancy.safetensors (the grid the engines cull with),
model.plan (TensorRT, when built) and engines.json (parity figures and the measured frames/s of every engine
that runs here; `run_live.py --engine auto` takes the fastest), through avatar.bundle.files, each atomically.
engines.json goes last and records the weights' SHA-256: retrain the avatar and its export is stale until this
runs again. Culling and packing stay outside the graphs.
"""

from __future__ import annotations

import argparse
import math
import platform
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import torch
from torch import nn

from avatar.base.cli import add_config_arguments, arg, command_parser, config_from_namespace
from avatar.base.devices import DEVICE_HELP, pick_device, prepare_device
from avatar.base.errors import UserError, run_cli
from avatar.bundle.bundle import LoadedAvatar, load_bundle
from avatar.bundle.files import (
    ENGINES_FILE,
    OCCUPANCY_CACHE,
    ONNX_BLEND,
    ONNX_MODEL,
    ONNX_SHADE,
    TRT_MODEL,
    begin_export,
    export_identity,
    listed_files,
    onnx_destination,
    read_exported,
    save_engines_record,
    save_occupancy_cache,
    save_tensorrt_plan,
)
from avatar.capture.retarget import rotate_about
from avatar.engines.base import RenderEngine
from avatar.engines.choice import time_engine
from avatar.engines.fused import FusedEngine
from avatar.engines.onnx import OnnxEngine
from avatar.engines.tensorrt import TRT_MAX_SAMPLES, TensorRTEngine, sample_profile, tensorrt_unavailable_reason
from avatar.engines.torch_engine import TorchEngine

OPSET = 17


class _Decoder(nn.Module):
    def __init__(self, field):
        super().__init__()
        self.field = field

    def forward(self, planes, latent_bias, points, dirs):
        return self.field.decode_gather(planes, latent_bias, points, dirs)


class _Shade(nn.Module):
    def __init__(self, field):
        super().__init__()
        self.field = field

    def forward(self, features, dirs, latent_bias):
        return self.field.shade(features, dirs, latent_bias)


class _Blend(nn.Module):
    def __init__(self, field):
        super().__init__()
        self.field = field

    def forward(self, expression, latent):
        return self.field.frame_state(expression, latent, channels_last=True)


def _export_graph(module: nn.Module, args: tuple, directory: Path, name: str, input_names: list[str],
                  output_names: list[str], dynamic_axes: dict) -> None:
    """``module`` as the ONNX graph ``name`` of the bundle, exported to a temporary file moved into place."""
    import warnings

    # The TorchScript exporter (deprecated in favour of torch.export) gives a plain opset-17 graph with named
    # dynamic axes that ONNX Runtime and TensorRT take as is; its deprecation notice is noise for users.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with onnx_destination(directory, name) as tmp:
            torch.onnx.export(module, args, str(tmp), input_names=input_names, output_names=output_names,
                              opset_version=OPSET, dynamic_axes=dynamic_axes, dynamo=False)


def onnx_graphs(field) -> list[str]:
    """The ONNX graphs of an avatar with this field: a deferred-shading field has its per-pixel MLP apart."""
    return [ONNX_BLEND, ONNX_MODEL, *([ONNX_SHADE] if field.deferred else [])]


def export_onnx(loaded: LoadedAvatar, directory: Path) -> None:
    """blend.onnx, model.onnx (per sample: colour and density, or a deferred field's features and density),
    shade.onnx (a deferred field's per-pixel colour) and the occupancy cache, each written atomically."""
    field = loaded.model.field.eval()
    e = field.hparams["expression_dim"]
    l = field.hparams["latent_dim"]
    with torch.no_grad():
        planes, bias = field.frame_state(torch.zeros(e), torch.zeros(l), channels_last=True)
        n = 64
        pts = torch.rand(n, 3) * (field.half_extent * 2) + field.center - field.half_extent
        dirs = torch.nn.functional.normalize(torch.randn(n, 3), dim=-1)
        first = "features" if field.deferred else "rgb"
        _export_graph(_Decoder(field), (planes, bias, pts, dirs), directory, ONNX_MODEL,
                      ["planes", "latent_bias", "points", "dirs"], [first, "sigma"],
                      {"points": {0: "samples"}, "dirs": {0: "samples"}, first: {0: "samples"}, "sigma": {0: "samples"}})
        if field.deferred:
            feats = torch.randn(n, field.feature_width)
            _export_graph(_Shade(field), (feats, dirs, bias), directory, ONNX_SHADE, ["features", "dirs", "latent_bias"],
                          ["rgb"], {"features": {0: "pixels"}, "dirs": {0: "pixels"}, "rgb": {0: "pixels"}})
        _export_graph(_Blend(field), (torch.zeros(e), torch.zeros(l)), directory, ONNX_BLEND, ["expression", "latent"],
                      ["planes", "latent_bias"], {})
    save_occupancy_cache(directory / OCCUPANCY_CACHE, loaded.model.occupancy, loaded.sampling.step)


def keep_fp32_outside_matmuls(network, trt) -> int:
    """For an fp16 build: pin every float layer except the matrix multiplies to fp32, so coordinates, gather
    indices and interpolation weights, ``exp`` and the sigmoid keep their precision while the MLP's matmuls
    (nearly all of the work) run in half. Returns how many layers were pinned."""
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.MATRIX_MULTIPLY or layer.num_outputs == 0:
            continue
        if layer.get_output(0).dtype == trt.float32:
            layer.precision = trt.float32
            layer.set_output_type(0, trt.float32)
            pinned += 1
    return pinned


def build_tensorrt(directory: Path, fp16: bool, max_samples: int = TRT_MAX_SAMPLES) -> None:
    """model.plan from model.onnx (TensorRT 10 Python API) with an optimisation profile over the ragged sample
    count: ``sample_profile`` (1, the GPU chunk size the marcher sends, ``max_samples``)."""
    reason = tensorrt_unavailable_reason()
    if reason:
        raise UserError(reason)
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(read_exported(directory, ONNX_MODEL)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {ONNX_MODEL}: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        keep_fp32_outside_matmuls(network, trt)
    lo, opt, hi = sample_profile(max_samples)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        shape = list(inp.shape)
        if shape[0] == -1:  # points / dirs: [samples, 3]
            profile.set_shape(inp.name, (lo, *shape[1:]), (opt, *shape[1:]), (hi, *shape[1:]))
        else:
            profile.set_shape(inp.name, shape, shape, shape)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError("TensorRT failed to build an engine from model.onnx (see its log above)")
    save_tensorrt_plan(directory, bytes(plan))


def parity_frames(loaded: LoadedAvatar, count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Conditionings inside the avatar's training range: expressions between its per-blendshape min and max,
    head turns up to ±15° around its reference pose, its latent codes."""
    rng = np.random.default_rng(seed)
    stats = loaded.meta["expression_stats"]
    lo, hi = np.asarray(stats["min"]), np.asarray(stats["max"])
    ref = np.asarray(loaded.meta["reference_head_pose"], dtype=np.float64)
    bounds = loaded.meta["head_bounds"]
    centre = (np.asarray(bounds["min"]) + np.asarray(bounds["max"])) / 2
    out = []
    for i in range(count):
        mix = rng.uniform(0, 1, lo.shape) ** 2  # mostly mild expressions, as in speech
        expr = lo + (hi - lo) * mix if i else np.asarray(stats["neutral"])
        yaw, pitch = rng.uniform(-15, 15), rng.uniform(-8, 8)
        pose = rotate_about(ref, centre, yaw, pitch, 0.0)
        latent = loaded.latent(int(rng.integers(loaded.model.latents.shape[0]))).numpy()
        out.append((expr.astype(np.float32), pose.astype(np.float32), latent))
    return out


def max_pixel_difference(a: RenderEngine, b: RenderEngine, frames, size: int) -> float:
    """Largest absolute difference of any channel of any pixel, on the 0–255 scale of the frames sent out."""
    worst = 0.0
    for f in frames:
        x = (a.render(*f, size)["rgb"] * 255).round()
        y = (b.render(*f, size)["rgb"] * 255).round()
        worst = max(worst, float((x - y).abs().max()))
    return worst


@dataclass
class ExportConfig:
    bundle: str = arg(help="a fast-field avatar bundle from trainer/fit.py --field fast", positional=True)
    # which engines to build (run_live.py's --engine is the one that renders)
    build: str = arg("onnx", choices=["onnx", "tensorrt", "all"], deprecated=("--engine",),
                     help="onnx: ONNX graphs + ONNX Runtime; tensorrt: also a TensorRT engine (NVIDIA GPU needed); "
                          "all: ONNX, and TensorRT where it can be built")
    render_size: int = arg(0, deprecated=("--size",),
                           help="frame size for the parity check and timing (0: the avatar's training size)")
    fp16: bool = arg(False, help="build the TensorRT engine in half precision; also report fp16 parity of the torch "
                                 "engine")
    frames: int = arg(20, help="frames for the parity check and the timing (median)")
    device: str = arg("auto", help=f"where the engines are timed: {DEVICE_HELP}; parity is always against the torch "
                                   "engine on the CPU")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(__doc__)
    add_config_arguments(p, ExportConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    args = config_from_namespace(ExportConfig, build_parser().parse_args(argv))
    directory = Path(args.bundle)
    if args.build == "tensorrt":
        reason = tensorrt_unavailable_reason()
        if reason:
            raise UserError(reason)
    loaded = load_bundle(directory)
    if loaded.model.field_name != "fast":
        raise UserError(f"{directory} holds a {loaded.model.field_name!r} field; only fast-field avatars export "
                        "(train one with trainer/fit.py --field fast)")
    size = args.render_size or loaded.image_size[1]
    if size < 8 or size > 2048:
        raise UserError(f"--render-size {size}: choose 8–2048 pixels")
    device = pick_device(args.device)
    prepare_device(device)
    identity = export_identity(directory)  # what ties this export to these weights
    previous = begin_export(directory)
    export_onnx(loaded, directory)
    frames = parity_frames(loaded, max(2, args.frames))
    reference = TorchEngine(loaded)  # the CPU torch engine: what every other engine must reproduce
    torch_engine = reference if device.type == "cpu" else TorchEngine(loaded, device=device)
    ort_engine = OnnxEngine(loaded, directory, device=device)
    parity = {"onnxruntime_fp32_max_abs_255": max_pixel_difference(reference, ort_engine, frames, size)}
    print(f"parity at {size}²: ONNX Runtime ({', '.join(ort_engine.providers)}) vs torch (CPU), max abs pixel "
          f"difference {parity['onnxruntime_fp32_max_abs_255']:.0f}/255 over {len(frames)} frames")
    if torch_engine is not reference:
        parity[f"torch_{device.type}_max_abs_255"] = max_pixel_difference(reference, torch_engine, frames, size)
        print(f"parity at {size}²: torch on {device} vs torch (CPU): {parity[f'torch_{device.type}_max_abs_255']:.0f}/255")
    engines: dict[str, RenderEngine] = {"torch": torch_engine, "onnxruntime": ort_engine}
    files = {"onnx": onnx_graphs(loaded.model.field), "occupancy": OCCUPANCY_CACHE}
    if TRT_MODEL in listed_files(previous):  # built from these weights by an earlier run: still valid
        files["tensorrt"] = TRT_MODEL
    if device.type == "cpu":  # the fused engine is the CPU's (numba kernels)
        fused = FusedEngine(loaded)
        key = f"fused_{fused.precision}_max_abs_255"
        parity[key] = max_pixel_difference(reference, fused, frames, size)
        print(f"parity at {size}²: fused ({fused.precision}) vs torch (CPU): {parity[key]:.0f}/255")
        engines["fused"] = fused
    if args.build in ("tensorrt", "all"):
        reason = tensorrt_unavailable_reason()
        if reason:
            print(f"TensorRT skipped: {reason}")
        else:
            build_tensorrt(directory, args.fp16)
            files["tensorrt"] = TRT_MODEL
            trt_engine = TensorRTEngine(loaded, directory, device if device.type == "cuda" else "cuda")
            key = f"tensorrt_{'fp16' if args.fp16 else 'fp32'}_max_abs_255"
            parity[key] = max_pixel_difference(reference, trt_engine, frames, size)
            print(f"parity at {size}²: TensorRT ({'fp16' if args.fp16 else 'fp32'}) vs torch (CPU): {parity[key]:.0f}/255")
            engines["tensorrt"] = trt_engine
    if args.fp16:
        value = fp16_parity(loaded, frames, size, device)
        if math.isnan(value):
            parity["torch_fp16_max_abs_255"] = f"unavailable: torch's {device.type} kernels here do not run this field in fp16"
            print(f"parity at {size}²: fp16 torch: {parity['torch_fp16_max_abs_255']} (TensorRT --fp16 is measured "
                  "on a GPU)")
        else:
            parity["torch_fp16_max_abs_255"] = value
            print(f"parity at {size}²: torch with fp16 field vs fp32: {value:.0f}/255")
    fps = {name: round(1.0 / time_engine(engine, frames, size), 2) for name, engine in engines.items()}
    best = max(fps, key=fps.get)
    record = {"date": str(date.today()), "machine": platform.processor() or platform.machine(),
              "torch_threads": torch.get_num_threads(),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device), "size": size, "frames": len(frames), "parity": parity,
              "fps": fps, "auto": best, "files": files}
    save_engines_record(directory, record, identity)
    print(f"frames/s at {size}² (median of {len(frames)}): " + ", ".join(f"{k} {v:.1f}" for k, v in fps.items())
          + f"; --engine auto will use {best}")
    print(f"wrote {', '.join(files['onnx'])}, {OCCUPANCY_CACHE}, {ENGINES_FILE} into {directory}")
    return 0


class HalfTorchEngine(TorchEngine):
    """The torch engine with the decoder under fp16 autocast: matmuls in half; coordinates, grid lookups and
    ``exp`` stay fp32 (autocast's fp32 list). The model's weights are never converted, so nothing is mutated."""

    def decode(self, state, points, dirs):
        with torch.autocast(self.device.type, dtype=torch.float16):
            rgb, sigma = self._decode(state[0], state[1], points, dirs)
        return rgb.float(), sigma.float()


def fp16_parity(loaded: LoadedAvatar, frames, size: int, device: torch.device | str = "cpu") -> float:
    """Max pixel difference of the torch engine with an fp16 decoder (on ``device``) vs fp32 on the CPU; NaN
    where this torch has no fp16 kernels for it on that device."""
    try:
        return max_pixel_difference(TorchEngine(loaded), HalfTorchEngine(loaded, device=device), frames[:4], size)
    except RuntimeError:
        return math.nan


def cli() -> None:
    """The ``nerface-export`` console script."""
    run_cli(main)


if __name__ == "__main__":
    cli()
