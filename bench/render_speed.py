"""Rendering speed of the fast field against the paper's field, side by side in one process.

    python bench/render_speed.py --fast avatars/fast [avatars/deferred …] --data DATASET [--paper avatars/paper]

Renders held-out test frames with each method at 128² and 256² on this machine and prints a Markdown table:
method, output size, PSNR (where the dataset has ground truth at that size; every row over the same frames),
median seconds per frame after a warm-up frame, frames per second and the ratio to the paper field. Each fast-field
avatar (volumetric or deferred shading, side by side in this one process) is rendered through each render engine
(torch and fused; ONNX Runtime and TensorRT after export/build.py), with occupancy culling off (the dense
reference), at half size + bilinear upsampling, and at 1/factor + its learned upsampler where it has one
(trainer/upsample.py) — the last two labelled with the size they were rendered at. The paper field skips rays that miss the head box, as the fast
rows do; its speed does not depend on its weights, so without --paper an untrained paper-sized field is timed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from avatar.base.metrics import psnr
from avatar.bundle.bundle import LoadedAvatar, load_bundle
from avatar.data.reader import load_split
from avatar.engines.base import BLACK
from avatar.field.model import Avatar, SamplingConfig, render_image


def scaled(loaded: LoadedAvatar, size: int) -> tuple[np.ndarray, torch.Tensor]:
    w, h = loaded.image_size
    k = loaded.intrinsics * (size / h)
    bg = torch.nn.functional.interpolate(loaded.background.permute(2, 0, 1)[None], size=(size, size), mode="bilinear",
                                         align_corners=False)[0].permute(1, 2, 0)
    return k, bg


def _time_renders(render, frames, size: int, truth=None, upsample_from: int = 0):
    """Median seconds per frame after one untimed warm-up frame, and mean PSNR over all ``frames`` (None without
    truth); ``render(pose, expr, render_size) → rgb``."""
    render_size = upsample_from or size
    with torch.inference_mode():
        render(frames[0][0], frames[0][1], render_size)  # warm-up: lazy caches, compiling, first-touch memory
    times, scores = [], []
    for j, (pose, expr) in enumerate(frames):
        start = time.perf_counter()
        with torch.inference_mode():
            rgb = render(pose, expr, render_size)
            if upsample_from:
                rgb = torch.nn.functional.interpolate(rgb.permute(2, 0, 1)[None], size=(size, size), mode="bilinear",
                                                      align_corners=False)[0].permute(1, 2, 0)
        times.append(time.perf_counter() - start)
        if truth is not None:
            scores.append(psnr(rgb.numpy(), truth[j]))
    return statistics.median(times), (float(np.mean(scores)) if scores else None)


def time_frames(loaded: LoadedAvatar, frames, size: int, sampling: SamplingConfig, truth=None, upsample_from: int = 0):
    """Through ``render_image`` (the trainer's renderer; rays that miss the head box are skipped there too)."""
    k, bg = scaled(loaded, upsample_from or size)
    return _time_renders(lambda pose, expr, s: render_image(loaded.model, pose, expr, loaded.latent(0), k, s, s, bg,
                                                            sampling)["rgb"], frames, size, truth, upsample_from)


def paper_stand_in(loaded_fast: LoadedAvatar) -> LoadedAvatar:
    """An untrained field of the paper's size (8×256, 64+64 samples): its speed is the paper field's speed."""
    meta = dict(loaded_fast.meta)
    hp = loaded_fast.meta["field_hparams"]
    model = Avatar("nerface", dict(box_min=hp["box_min"], box_max=hp["box_max"], expression_dim=hp["expression_dim"],
                                   width=256, depth=8), num_frames=1).eval()
    meta["sampling"] = SamplingConfig(64, 64, 16384).__dict__
    return LoadedAvatar(model, meta, loaded_fast.background)


def bundle_label(loaded: LoadedAvatar, path: str) -> str:
    """How a table names an avatar: its field and its directory."""
    return f"{'deferred field' if loaded.model.field.deferred else 'fast field'} (`{Path(path).name}`)"


def render_head_bilinear(engine, loaded: LoadedAvatar, pose, expr, size: int, factor: int = 2) -> torch.Tensor:
    """The baseline of the learned upsampler, as the live loop would do without one: the head rendered at
    ``size / factor`` over black, its premultiplied RGBA scaled up bilinearly, laid over the full-size background."""
    from avatar.field.upsample import over

    low = engine.render(expr, pose, loaded.latent(0), size // factor, BLACK)
    rgba = torch.cat([low["rgb"], low["alpha"][..., None]], -1).permute(2, 0, 1)[None]
    up = torch.nn.functional.interpolate(rgba, size=(size, size), mode="bilinear", align_corners=False)[0]
    bg = engine.background(size).reshape(size, size, 3)
    return over(up[:3].permute(1, 2, 0), up[3], bg).clamp(0, 1)


def engine_methods(label: str, loaded: LoadedAvatar, engines: dict, size: int) -> list[tuple[str, object]]:
    """(row name, ``render(pose, expr) → rgb [size, size, 3]``) for one avatar: each engine natively, then the fused
    engine at half size with the whole frame bilinear, the head bilinear over the full-size background, and the
    avatar's learned upsampler where it has one."""
    described = {"torch": "torch engine (culled, packed, early termination)",
                 "fused": f"fused engine (numba kernels, {engines['fused'].precision} MLP)",
                 "onnxruntime": "onnxruntime engine", "tensorrt": "tensorrt engine"}
    latent = loaded.latent(0)
    out = [(f"{label}, {described[name]}", lambda pose, expr, e=engine: e.render(expr, pose, latent, size)["rgb"])
           for name, engine in engines.items()]
    from avatar.engines.fused import FusedEngine

    # its own engine for the half-size rows: an engine keeps one size's pixel grid, and rows timed in turns would
    # otherwise rebuild it at every call (the live loop changes size rarely)
    fused = FusedEngine(loaded)

    def whole_bilinear(pose, expr):
        rgb = fused.render(expr, pose, latent, size // 2)["rgb"]
        return torch.nn.functional.interpolate(rgb.permute(2, 0, 1)[None], size=(size, size), mode="bilinear",
                                               align_corners=False)[0].permute(1, 2, 0)

    out.append((f"{label}, fused engine **rendered at {size // 2}², the whole frame bilinear ×2** to {size}²",
                whole_bilinear))
    out.append((f"{label}, fused engine **rendered at {size // 2}², the head bilinear ×2** over the {size}² "
                "background", lambda pose, expr: render_head_bilinear(fused, loaded, pose, expr, size)))
    if loaded.upsampler is not None:
        f = loaded.upsampler.factor
        out.append((f"{label}, fused engine **rendered at {size // f}², learned upsampler ×{f}** to {size}²",
                    lambda pose, expr: fused.render_upsampled(expr, pose, latent, size)["rgb"]))
    return out


def time_interleaved(methods: list[tuple[str, object]], frames, truth, rounds: int) -> list[tuple[float, float | None]]:
    """(median seconds per frame, mean PSNR or None) per method, timed in turns — every frame rendered by each
    method in a row, ``rounds`` times over the frames — so that a slow spell of this shared machine falls on all
    of them alike; one untimed warm-up frame each first."""
    with torch.inference_mode():
        for _, render in methods:
            render(*frames[0])
    times = [[] for _ in methods]
    scores = [[] for _ in methods]
    for r in range(rounds):
        for j, (pose, expr) in enumerate(frames):
            for i, (_, render) in enumerate(methods):
                start = time.perf_counter()
                with torch.inference_mode():
                    rgb = render(pose, expr)
                times[i].append(time.perf_counter() - start)
                if r == 0 and truth is not None:
                    scores[i].append(psnr(rgb.clamp(0, 1).numpy(), truth[j]))
    return [(statistics.median(t), float(np.mean(sc)) if sc else None) for t, sc in zip(times, scores)]


def main(argv: list[str] | None = None) -> int:
    from avatar.engines.fused import FusedEngine
    from avatar.engines.onnx import OnnxEngine
    from avatar.engines.tensorrt import TensorRTEngine, tensorrt_unavailable_reason
    from avatar.engines.torch_engine import TorchEngine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fast", required=True, nargs="+",
                   help="bundle(s) of fast-field avatars trained on --data, e.g. a volumetric and a deferred-shading "
                        "one (--shading deferred): timed side by side (export/build.py adds the ONNX/TensorRT rows, "
                        "trainer/upsample.py the learned-upsampler rows)")
    p.add_argument("--paper", help="bundle of a paper-field avatar (default: an untrained stand-in, timing only)")
    p.add_argument("--data", required=True, help="its dataset (test frames give the conditioning and the truth)")
    p.add_argument("--frames", type=int, default=10, help="held-out frames: every PSNR in the table is their mean")
    p.add_argument("--paper-frames", type=int, default=1,
                   help="frames timed for the untrained paper stand-in (~30 s+ each on a CPU; it has no PSNR)")
    p.add_argument("--sizes", default="128,256")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--rounds", type=int, default=3,
                   help="the engine rows are timed in turns, frame by frame, this many times over the frames")
    p.add_argument("--eval-pose-steps", type=int, default=40, metavar="STEPS",
                   help="refine each held-out frame's tracked pose against it first, with the first --fast avatar, "
                        "as trainer/evaluate.py does (every row then renders the same refined poses; at the tracked "
                        "poses a ~2° misalignment dominates and blur scores better than detail); 0 = tracked poses")
    p.add_argument("--engines-only", action="store_true",
                   help="only the engine rows (the paper field and the dense reference take minutes per frame at 512²)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    bundles = {path: load_bundle(path) for path in args.fast}
    first = next(iter(bundles.values()))
    paper = load_bundle(args.paper) if args.paper else paper_stand_in(first)
    test = load_split(args.data, "test")
    idx = np.linspace(0, len(test) - 1, min(args.frames, len(test))).astype(int)
    frames = [(test.poses[i], test.expressions[i]) for i in idx]
    if args.eval_pose_steps > 0:
        from avatar.eval.evaluation import refine_poses
        from avatar.field.training import padded_box

        w, h = first.image_size
        items = [(test.poses[i], test.expressions[i], test.images[i].astype(np.float32) / 255.0) for i in idx]
        refined, _ = refine_poses(first, items, np.stack([padded_box(test.bboxes[i], w, h) for i in idx]),
                                  args.eval_pose_steps)
        frames = [(pose, expr) for pose, expr, _ in refined]
    data_size = test.image_size[1]
    truth_all = [test.images[i].astype(np.float32) / 255.0 for i in idx]
    engines = {}
    for path, loaded in bundles.items():
        engines[path] = {"torch": TorchEngine(loaded), "fused": FusedEngine(loaded)}
        if (Path(path) / "model.onnx").is_file():
            engines[path]["onnxruntime"] = OnnxEngine(loaded, path)
        if tensorrt_unavailable_reason() is None and (Path(path) / "model.plan").is_file():
            engines[path]["tensorrt"] = TensorRTEngine(loaded, path)
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        truth = truth_all if size == data_size else None
        # The paper field gets the same head-box ray skipping (render_rays) and warm-up as every other row; a
        # trained one is scored on the same frames, the untrained stand-in only timed.
        t_paper = None
        if not args.engines_only:
            paper_frames = frames if args.paper else frames[:max(1, args.paper_frames)]
            t_paper, p_paper = time_frames(paper, paper_frames, size, paper.sampling, truth if args.paper else None)
            rows.append(("paper field (8×256 MLP, 64+64 samples)" + ("" if args.paper else ", untrained stand-in: "
                         f"timing only, {len(paper_frames)} frame(s)"), size, p_paper, t_paper, t_paper))
        methods = []
        for path, loaded in bundles.items():
            label = bundle_label(loaded, path)
            if not args.engines_only:
                sampling = SamplingConfig(**{**loaded.sampling.__dict__, "chunk": size * size, "culling": False})
                t_dense, p_dense = time_frames(loaded, frames, size, sampling, truth)
                rows.append((f"{label}, culling off (dense reference, torch)", size, p_dense, t_dense, t_paper))
            methods += engine_methods(label, loaded, engines[path], size)
        if methods:
            for (name, _), (t, ps) in zip(methods, time_interleaved(methods, frames, truth, args.rounds)):
                rows.append((name, size, ps, t, t_paper))

    print(f"Rendering speed, {date.today()}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__} (CPU); {len(frames)} held-out frames, "
          f"the engine rows timed in turns ({args.rounds} rounds, frame by frame: medians; one warm-up frame each); "
          f"every PSNR is the mean over the same {len(frames)} frames"
          + (f", their poses refined ({args.eval_pose_steps} steps) by {Path(args.fast[0]).name}" if args.eval_pose_steps > 0
             else ", at their tracked poses") + ".\n")
    print("| method | output | PSNR (dB) | s / frame | frames / s | × paper field |")
    print("|---|---|---|---|---|---|")
    for name, size, ps, t, t_paper in rows:
        ratio = "—" if t_paper is None else f"{t_paper / t:.0f}×"
        print(f"| {name} | {size}² | {'—' if ps is None else f'{ps:.2f}'} | {t:.4f} | {1 / t:.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
