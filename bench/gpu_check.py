"""The NVIDIA GPU path end to end, measured in one short run (≤ --budget-minutes, 6 by default).

    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --data gpu_data --device cuda --budget-minutes 6
    python bench/gpu_check.py --data gpu_data --device cpu --budget-minutes 6     # the same figures on a CPU

Stages (each in its own try/except: a failure prints `stage X failed: reason` and the rest still runs):
  a) train the fast field: the smoke preset, then the default (`cpu`) preset for a share of the budget —
     steps/s and held-out test PSNR beside the nearest-training-frame baseline;
  b) render 256² and 512² with the torch engine on --device: median frames/s over ≥ --frames frames after a
     warm-up, and the largest pixel difference (/255) from the torch engine on the CPU, same frames and bundle;
     b2) on CUDA (or with --variants on), at the largest size: the CPU's marching plan (rounds of 2 blocks), the
     frame's front run eagerly instead of as a CUDA graph, the decoder not compiled, in fp16, with TF32 matmuls
     — and a torch.profiler table of the default engine (profile_<size>.txt);
  c) ONNX export + ONNX Runtime with the best provider present (CUDA/TensorRT when onnxruntime-gpu is
     installed, else CPU — the table says which): frames/s and parity;
  d) a Markdown table (device name, date, torch version) printed and written with a JSON record into $OUT when
     that is set, else --out.

Needs a PREPARED dataset (no MediaPipe, PyAV or aiortc is imported here). Build it on a machine with them, from
the repository root (≈ 9 MB; /gpu_data/ is git-ignored):

    python trainer/synth.py --out /tmp/gpu_synth --frames 300 --size 256 --overwrite
    python trainer/prepare.py /tmp/gpu_synth/video.mp4 --background /tmp/gpu_synth/background.png \\
        --size 128 --out gpu_data --overwrite
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from avatar.base.devices import pick_device, prepare_device


def say(*parts) -> None:
    print(*parts, flush=True)


class Budget:
    """One wall-clock deadline for the whole run; each stage asks for a share of what is left."""

    def __init__(self, minutes: float):
        self.start = time.perf_counter()
        self.deadline = self.start + minutes * 60

    def left(self) -> float:
        return max(0.0, self.deadline - time.perf_counter())

    def share(self, fraction: float) -> float:
        return self.left() * fraction

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def run_stage(name: str, results: dict, fn, *args, budget: Budget | None = None, needs_seconds: float = 2.0):
    say(f"\n== stage {name} ==")
    t = time.perf_counter()
    if budget is not None and budget.left() < needs_seconds:
        say(f"stage {name} skipped: the budget is spent ({budget.left():.0f} s left)")
        results.setdefault("stages", {})[name] = {"ok": False, "seconds": 0.0, "reason": "budget spent"}
        return None
    try:
        value = fn(*args)
        results.setdefault("stages", {})[name] = {"ok": True, "seconds": round(time.perf_counter() - t, 1)}
        return value
    except BaseException as exc:  # noqa: BLE001 — one stage's failure (even a UserError's SystemExit) must not end the run
        if isinstance(exc, KeyboardInterrupt):
            raise
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        say(f"stage {name} failed: {reason}")
        traceback.print_exc()
        sys.stdout.flush()
        results.setdefault("stages", {})[name] = {"ok": False, "seconds": round(time.perf_counter() - t, 1),
                                                  "reason": reason}
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- a) training -------------------------------------------------------------------------------------------------
def train(args, device: torch.device, preset: str, minutes: float, out: Path, eval_frames: int) -> dict:
    from trainer import fit

    # (64³ bundle grids for both runs: the wrap-up after --max-minutes is timed on the smoke run, and the 128³
    # refinement of the default preset adds most of a minute of it on a CPU, over a short budget)
    argv = ["--data", args.data, "--field", "fast", "--preset", preset, "--max-minutes", f"{max(minutes, 0.05):.3f}",
            "--eval-frames", str(eval_frames), "--out", str(out), "--overwrite", "--device", str(device),
            "--bundle-occupancy-resolution", "64"]
    if args.eval_pose_steps is not None:
        argv += ["--eval-pose-steps", str(args.eval_pose_steps)]
    if preset != "smoke":
        argv += ["--max-steps", "1000000"]  # the time budget ends it
    code = fit.main(argv)
    if code:
        raise RuntimeError(f"trainer/fit.py exited with {code}")
    m = json.loads((out / "metrics.json").read_text())
    a, b, t = m["test"]["avatar"], m["test"]["nearest_training_frame"], m["training"]
    row = {"preset": preset, "steps": t["steps"], "seconds": t["seconds_this_session"],
           "steps_per_second": t["steps_per_second"], "test_psnr": round(a["psnr"], 2),
           "baseline_psnr": round(b["psnr"], 2), "test_frames": len(m.get("test_frames", []))}
    say(f"train {preset}: {row['steps']} steps in {row['seconds']} s = {row['steps_per_second']} steps/s; test PSNR "
        f"{row['test_psnr']} dB vs nearest training frame {row['baseline_psnr']} dB ({row['test_frames']} frames)")
    return row


# -- b) rendering ------------------------------------------------------------------------------------------------
def frames_rgb(engine, frames, size: int) -> list[torch.Tensor]:
    return [(engine.render(*f, size)["rgb"] * 255).round() for f in frames]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def timed_fps(engine, frames, size: int, count: int, seconds: float, device: torch.device) -> tuple[float, int]:
    """Median frames/s over ``count`` renders (cycling through ``frames``) after two warm-up renders; stops early
    at ``seconds`` (with at least 3 timed)."""
    for f in frames[:2]:
        engine.render(*f, size)
    times: list[float] = []
    stop = time.perf_counter() + seconds
    while len(times) < count and (len(times) < 3 or time.perf_counter() < stop):
        f = frames[len(times) % len(frames)]
        sync(device)
        t = time.perf_counter()
        engine.render(*f, size)  # returns CPU tensors: the copy back (a real frame's cost) is in the timing
        sync(device)
        times.append(time.perf_counter() - t)
    return 1.0 / statistics.median(times), len(times)


def render_check(args, device: torch.device, bundle: Path, budget: Budget, fraction: float,
                 results: dict) -> list[dict]:
    from avatar.bundle.bundle import load_bundle
    from avatar.engines.torch_engine import TorchEngine
    from export.build import parity_frames

    stage_end = time.perf_counter() + budget.share(fraction)
    variants = args.variants == "on" or (args.variants == "auto" and device.type == "cuda")
    # with variants, the plain rows get less than half of the stage's time (they stop at --frames anyway)
    main_end = stage_end - (stage_end - time.perf_counter()) * (0.55 if variants else 0.0)
    loaded = load_bundle(bundle)  # on the CPU; the device engine takes its own copy
    frames = parity_frames(loaded, max(args.frames, 4), seed=1)
    cpu_engine = TorchEngine(loaded)
    dev_engine = TorchEngine(loaded, device=device)
    rows = []
    sizes = [int(s) for s in args.sizes.split(",")]
    for i, size in enumerate(sizes):
        per_size = max(1.0, (main_end - time.perf_counter()) / (len(sizes) - i))
        fps, n = timed_fps(dev_engine, frames, size, args.frames, per_size * 0.5, device)
        # CPU reference on as many of the same frames as its share of the time allows (at least 2)
        ref_frames, ref, t0 = [], [], time.perf_counter()
        for f in frames:
            if len(ref) >= 2 and (time.perf_counter() - t0 > per_size * 0.35 or len(ref) >= args.frames):
                break
            ref.append(frames_rgb(cpu_engine, [f], size)[0])
            ref_frames.append(f)
        diff = max_diff(ref, frames_rgb(dev_engine, ref_frames, size))
        label = ", ".join(x for x, on in (("CUDA-graph front", dev_engine.graphs),
                                          ("compiled decoder", dev_engine.compiled)) if on)
        row = {"engine": "torch" + (f" ({label})" if label else ""), "device": str(device), "size": size,
               "fps_median": round(fps, 2), "timed_frames": n, "parity_frames": len(ref_frames),
               "max_abs_diff_255": diff, "samples_per_frame": dev_engine.last_samples}
        say(f"render torch on {device} at {size}²: {row['fps_median']} fps (median of {n}); max |Δ| vs CPU "
            f"{diff:.0f}/255 over {len(ref_frames)} frames")
        rows.append(row)
    if variants:
        # its own stage: a failure there must not lose the rows above
        extra = run_stage("b2 render variants", results, render_variants, args, loaded, dev_engine, frames,
                          max(sizes), stage_end, ref_frames, ref, device)
        rows += extra or []
    return rows


def _tf32_engine_class():
    from avatar.engines.torch_engine import TorchEngine

    class Tf32DecoderEngine(TorchEngine):
        """TF32 only for the decoder's matmuls (rays and compositing stay fp32)."""

        def decode(self, state, points, dirs):
            before = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                return super().decode(state, points, dirs)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = before

    return Tf32DecoderEngine


def render_variants(args, loaded, engine, frames, size: int, stage_end: float, ref_frames, ref,
                    device: torch.device) -> list[dict]:
    """At the largest size, beside the default engine: the CPU's marching plan (rounds of 2 blocks with early
    termination), the front without CUDA graphs, the decoder eager, in fp16 and with TF32 matmuls; then a profile
    of the default engine (top ops by CUDA time, into $OUT)."""
    from avatar.engines.torch_engine import TorchEngine
    from export.build import HalfTorchEngine

    Tf32DecoderEngine = _tf32_engine_class()
    rows = []
    default = engine.blocks_per_round
    variants = [("rounds of 2 blocks (the CPU plan)", lambda: engine, 2),
                ("front without CUDA graphs", lambda: TorchEngine(loaded, device=device, graphs=False), default),
                ("eager decoder (no torch.compile)", lambda: TorchEngine(loaded, device=device, compile=False), default),
                ("fp16 decoder", lambda: HalfTorchEngine(loaded, device=device), default),
                ("TF32 decoder matmuls, eager", lambda: Tf32DecoderEngine(loaded, device=device, compile=False), default)]
    for i, (label, make, bpr) in enumerate(variants):
        if time.perf_counter() > stage_end:
            say(f"variant {label} skipped: the stage's time is spent")
            break
        eng = make()
        eng.blocks_per_round = bpr
        t0 = time.perf_counter()
        eng.render(*frames[0], size)  # (torch.compile compiles here)
        first = time.perf_counter() - t0
        share = max(1.0, (stage_end - time.perf_counter()) / (len(variants) - i) * 0.6)
        fps, n = timed_fps(eng, frames, size, args.frames, share, device)
        diff = max_diff(ref, frames_rgb(eng, ref_frames, size))
        row = {"engine": f"torch, {label}", "device": str(device), "size": size, "fps_median": round(fps, 2),
               "timed_frames": n, "parity_frames": len(ref_frames), "max_abs_diff_255": diff,
               "samples_per_frame": eng.last_samples, "first_frame_seconds": round(first, 2)}
        say(f"render torch, {label}, at {size}²: {row['fps_median']} fps (median of {n}), {eng.last_samples} samples; "
            f"max |Δ| vs CPU {diff:.0f}/255; first frame {first:.1f} s")
        rows.append(row)
    engine.blocks_per_round = default
    try:
        from torch.profiler import ProfilerActivity, profile

        cuda = device.type == "cuda"
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for f in frames[:5]:
                engine.render(*f, size)
        table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=30)
        dest = Path(os.environ.get("OUT") or args.out)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / f"profile_{size}.txt").write_text(table + "\n")
        say(f"profile of 5 frames at {size}² (top ops by {'CUDA' if cuda else 'CPU'} time):\n" + "\n".join(table.splitlines()[:18]))
    except Exception as exc:  # noqa: BLE001 — the profile is extra information, never a failure of the stage
        say(f"profile unavailable: {type(exc).__name__}: {exc}")
    return rows


# -- c) ONNX -----------------------------------------------------------------------------------------------------
def onnx_check(args, device: torch.device, bundle: Path, budget: Budget, fraction: float) -> dict:
    from avatar.bundle.bundle import load_bundle
    from avatar.engines.onnx import OnnxEngine
    from avatar.engines.torch_engine import TorchEngine
    from export.build import export_onnx, parity_frames

    stage_end = time.perf_counter() + budget.share(fraction)
    loaded = load_bundle(bundle)
    export_onnx(loaded, bundle)
    engine = OnnxEngine(loaded, bundle, device=device)
    size = min(int(s) for s in args.sizes.split(","))
    frames = parity_frames(loaded, max(args.frames, 4), seed=2)
    ref = frames_rgb(TorchEngine(loaded), frames[:2], size)
    diff = max_diff(ref, frames_rgb(engine, frames[:2], size))
    fps, n = timed_fps(engine, frames, size, args.frames, max(1.0, stage_end - time.perf_counter()), engine.device)
    row = {"engine": "onnxruntime", "provider": engine.providers[0], "device": str(engine.device), "size": size,
           "fps_median": round(fps, 2), "timed_frames": n, "parity_frames": 2, "max_abs_diff_255": diff}
    say(f"ONNX Runtime with {engine.providers[0]} (marching on {engine.device}) at {size}²: {row['fps_median']} fps "
        f"(median of {n}); max |Δ| vs torch CPU {diff:.0f}/255")
    return row


# -- d) report ---------------------------------------------------------------------------------------------------
def markdown(results: dict) -> str:
    info = results["info"]
    lines = [f"GPU check on **{info['device_name']}** ({info['device']}), {info['date']}, torch {info['torch']}, "
             f"dataset {info['data']} ({info['image_size']}²), budget {info['budget_minutes']} min, "
             f"ran {info['seconds']:.0f} s.", "",
             "| stage | setting | figure | beside |", "|---|---|---|---|"]
    for r in results.get("train", []):
        if r:
            lines.append(f"| train fast field, preset {r['preset']} | {r['seconds']:.0f} s, {r['steps']} steps | "
                         f"{r['steps_per_second']:.2f} steps/s, test PSNR {r['test_psnr']:.2f} dB | nearest training "
                         f"frame {r['baseline_psnr']:.2f} dB ({r['test_frames']} test frames) |")
    for r in results.get("render", []) or []:
        samples = f", {r['samples_per_frame'] / 1e6:.2f} M samples/frame" if "samples_per_frame" in r else ""
        lines.append(f"| render, {r['engine']} on {r['device']} | {r['size']}² | {r['fps_median']:.1f} fps (median of "
                     f"{r['timed_frames']}){samples} | max Δ vs CPU render {r['max_abs_diff_255']:.0f}/255 over "
                     f"{r['parity_frames']} frames |")
    o = results.get("onnx")
    if o:
        lines.append(f"| render, ONNX Runtime ({o['provider']}) | {o['size']}² | {o['fps_median']:.1f} fps (median of "
                     f"{o['timed_frames']}) | max Δ vs CPU torch {o['max_abs_diff_255']:.0f}/255 |")
    failed = [f"{k}: {v['reason']}" for k, v in results.get("stages", {}).items() if not v["ok"]]
    if failed:
        lines += ["", "Failed stages: " + "; ".join(failed)]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset directory (see above)")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, cpu, auto")
    p.add_argument("--budget-minutes", type=float, default=6.0, help="wall time for everything (default 6)")
    p.add_argument("--sizes", default="256,512", help="render sizes (default 256,512)")
    p.add_argument("--frames", type=int, default=20, help="timed frames per size (default 20)")
    p.add_argument("--eval-frames", type=int, default=12, help="held-out test frames scored per training run")
    p.add_argument("--eval-pose-steps", type=int, default=None,
                   help="pose-refinement steps per scored test frame (trainer/fit.py's default when left out)")
    p.add_argument("--variants", choices=["auto", "on", "off"], default="auto",
                   help="at the largest size, also time the CPU's marching plan, the front without CUDA graphs, the "
                        "eager, fp16 and TF32 decoders, and profile the default engine (auto: on CUDA only)")
    p.add_argument("--bundle", default=None,
                   help="render/ONNX stages on this trained avatar instead of training one (stages a are skipped)")
    p.add_argument("--stages", default="a1,a2,b,c", help="which stages to run (default all: a1,a2,b,c)")
    p.add_argument("--work", default="runs/gpu_check", help="where the trained avatars go")
    p.add_argument("--out", default="runs/gpu_check", help="where gpu_check.md/.json go when $OUT is not set")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    budget = Budget(args.budget_minutes)
    device = pick_device(args.device)
    prepare_device(device)
    if not (Path(args.data) / "transforms_train.json").is_file():
        say(f"error: {args.data} is not a prepared dataset (no transforms_train.json); see the top of this file")
        return 2
    work = Path(args.work)
    size = json.loads((Path(args.data) / "transforms_test.json").read_text())["image_size"][1]
    results: dict = {"info": {
        "device": str(device), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        (platform.processor() or platform.machine()) + f", {torch.get_num_threads()} torch threads",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "data": args.data, "image_size": size, "budget_minutes": args.budget_minutes}}
    say(f"gpu_check: {results['info']['device_name']} ({device}), torch {torch.__version__}, budget "
        f"{args.budget_minutes} min")
    # a) training: the smoke preset (pipeline check), then the default preset for most of the training share.
    # fit.py's own wrap-up (occupancy finalisation, evaluation) comes after --max-minutes: the shares leave room.
    stages = set(args.stages.split(","))
    if args.bundle:
        stages -= {"a1", "a2"}
    smoke = run_stage("a1 train smoke", results, train, args, device, "smoke", budget.share(0.06) / 60,
                      work / "smoke", 2) if "a1" in stages else None
    # fit.py's wrap-up after --max-minutes (occupancy, evaluation) took this long for the smoke run: keep room for it
    wrap_up = results["stages"]["a1 train smoke"]["seconds"] - smoke["seconds"] if smoke else 20.0
    main_minutes = (budget.share(0.55) - 1.2 * wrap_up) / 60
    main_row = run_stage("a2 train cpu preset", results, train, args, device, "cpu", main_minutes, work / "cpu",
                         args.eval_frames, budget=budget, needs_seconds=wrap_up + 3) if "a2" in stages else None
    results["train"] = [r for r in (smoke, main_row) if r]
    bundle = Path(args.bundle) if args.bundle else work / "cpu" if main_row else work / "smoke" if smoke else None
    if bundle is not None and (bundle / "avatar.json").is_file():
        if "b" in stages:
            results["render"] = run_stage("b render torch", results, render_check, args, device, bundle, budget, 0.7,
                                          results, budget=budget)
        if "c" in stages:
            results["onnx"] = run_stage("c onnx runtime", results, onnx_check, args, device, bundle, budget, 0.8,
                                        budget=budget)
    else:
        say("stages b and c skipped: no trained avatar (stage a failed)")
    results["info"]["seconds"] = round(budget.elapsed(), 1)
    table = markdown(results)
    say("\n" + table)
    dest = Path(os.environ.get("OUT") or args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "gpu_check.md").write_text(table + "\n")
    (dest / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    say(f"\nwrote {dest / 'gpu_check.md'} and {dest / 'gpu_check.json'} ({budget.elapsed():.0f} s)")
    return 0 if all(v["ok"] for v in results.get("stages", {}).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
