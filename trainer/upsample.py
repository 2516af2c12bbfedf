"""Train an avatar's learned upsampler: its head rendered at 1/FACTOR size, brought to full size by a small
convolutional network fitted to the avatar's own training frames.

    python trainer/upsample.py AVATAR --data DATASET_DIR [--factor 2] [--steps 1500]

Renders the training frames at 1/FACTOR of the dataset's size (premultiplied colour and alpha, the live loop's
render) with the avatar's fastest CPU engine, fits the network so that its output laid over the background
matches each full-size training frame, and writes upsampler.safetensors into the bundle (atomically). Then scores
it on held-out test frames (each tracked pose first refined against its frame, as trainer/evaluate.py does)
beside plain bilinear upsampling of the same renders and the native full-size render, and prints that table
(every row labelled with the size it was rendered at).
`run_live.py` uses the upsampler when the head's box is larger than what the renderer holds at the frame rate;
`bench/render_speed.py` times it. `trainer/fit.py --upsample FACTOR` runs this at the end of training.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from avatar.base.cli import add_config_arguments, arg, command_parser, config_from_namespace
from avatar.base.errors import UserError, run_cli
from avatar.base.metrics import psnr
from avatar.bundle.bundle import LoadedAvatar, load_bundle
from avatar.data.reader import load_split
from avatar.engines.base import BLACK, RenderEngine
from avatar.eval.evaluation import refine_poses
from avatar.field import posefit
from avatar.field.training import FitConfig, padded_box
from avatar.field.upsample import UPSAMPLER_FILE, over, save_upsampler, train_upsampler, upsample_render


@dataclass
class UpsampleConfig:
    bundle: str = arg(help="a fast-field avatar bundle (trainer/fit.py)", positional=True)
    data: str = arg(help="the dataset directory the avatar was trained on")
    factor: int = arg(2, help="the render is 1/FACTOR of the size it is shown at (2 or 4)")
    steps: int = arg(1500, help="training steps (batches of random patches)")
    frames: int = arg(150, help="training frames rendered for it, evenly spread (0 = all)")
    test_frames: int = arg(10, help="held-out frames it is scored on, evenly spread (0 = all)")
    channels: int = arg(24, help="width of its convolutions")
    layers: int = arg(3, help="convolutions (3×3, at the low resolution)")
    seed: int = arg(0, help="seed of its initialisation and patches")
    eval_pose_steps: int = arg(FitConfig.eval_pose_steps, metavar="STEPS",
                               help="refine each scored test frame's tracked pose against it first (trainer/"
                                    "evaluate.py's protocol; 0 = score at the tracked poses)")


def _engine(loaded: LoadedAvatar) -> RenderEngine:
    """The fused engine where numba is installed, else the torch engine (the same pictures)."""
    try:
        from avatar.engines.fused import FusedEngine

        return FusedEngine(loaded)
    except UserError:
        from avatar.engines.torch_engine import TorchEngine

        return TorchEngine(loaded)


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)


def training_pairs(loaded: LoadedAvatar, engine: RenderEngine, data: str, factor: int, frames: int
                   ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(low render ``[4, h, w]``, full-size frame ``[3, H, W]``, background ``[3, H, W]``) per training frame, at
    the poses the field was fitted to (tracked poses with the training's corrections)."""
    train = load_split(data, "train")
    size = train.image_size[1]
    if train.image_size[0] != size or size % factor:
        raise UserError(f"{data}: frames of {train.image_size[0]}×{size} do not divide into 1/{factor} squares")
    if len(train) != loaded.model.latents.shape[0]:
        raise UserError(f"{data} has {len(train)} training frames, the avatar {loaded.model.latents.shape[0]}: "
                        "not the dataset it was trained on")
    poses = torch.as_tensor(train.poses, dtype=torch.float32)
    if "pose_corrections" in loaded.meta:
        poses = posefit.apply(poses, torch.as_tensor(loaded.meta["pose_corrections"], dtype=torch.float32))
    idx = np.linspace(0, len(train) - 1, min(frames, len(train)) if frames else len(train)).astype(int)
    bg = engine.background(size).reshape(size, size, 3).permute(2, 0, 1).contiguous()
    pairs = []
    for i in tqdm(idx, desc="rendering training frames", unit="frame", leave=False):
        out = engine.render(train.expressions[i], poses[i], loaded.latent(int(i)), size // factor, BLACK)
        low = torch.cat([out["rgb"], out["alpha"][..., None]], -1).permute(2, 0, 1).contiguous()
        pairs.append((low, _chw(train.images[i]), bg))
    return pairs


def score(loaded: LoadedAvatar, engine: RenderEngine, upsampler, data: str, frames: int, pose_steps: int) -> list[dict]:
    """Held-out PSNR: native full size, 1/factor + bilinear, 1/factor + the upsampler, each test frame's tracked
    pose first refined against it by the avatar for ``pose_steps`` steps (trainer/evaluate.py's protocol: at the
    tracked poses a ~2° misalignment dominates, and blur scores better than detail)."""
    test = load_split(data, "test")
    size = test.image_size[1]
    factor = upsampler.factor
    bg = engine.background(size).reshape(size, size, 3)
    idx = np.linspace(0, len(test) - 1, min(frames, len(test)) if frames else len(test)).astype(int)
    items = [(test.poses[i], test.expressions[i], test.images[i].astype(np.float32) / 255.0) for i in idx]
    if pose_steps > 0:
        w, h = loaded.image_size
        boxes = np.stack([padded_box(test.bboxes[i], w, h) for i in idx])
        items, _ = refine_poses(loaded, items, boxes, pose_steps, progress="refining test poses")
    rows = {"native": [], "bilinear": [], "learned": []}
    for pose, expression, truth in items:
        args = (expression, pose, loaded.latent(0))
        native = engine.render(*args, size, BLACK)
        low = engine.render(*args, size // factor, BLACK)
        rgba = torch.cat([low["rgb"], low["alpha"][..., None]], -1).permute(2, 0, 1)[None]
        bil = torch.nn.functional.interpolate(rgba, scale_factor=factor, mode="bilinear", align_corners=False)[0]
        rgb, alpha = upsample_render(upsampler, low["rgb"], low["alpha"])
        for name, (c, a) in {"native": (native["rgb"], native["alpha"]),
                             "bilinear": (bil[:3].permute(1, 2, 0), bil[3]), "learned": (rgb, alpha)}.items():
            rows[name].append(psnr(over(c, a, bg).clamp(0, 1).numpy(), truth))
    low_size = size // factor
    return [{"method": f"rendered at {size}² (native)", "size": size, "psnr": float(np.mean(rows["native"]))},
            {"method": f"rendered at {low_size}², bilinear ×{factor}", "size": size, "psnr": float(np.mean(rows["bilinear"]))},
            {"method": f"rendered at {low_size}², **learned upsampler ×{factor}**", "size": size,
             "psnr": float(np.mean(rows["learned"]))}]


def build_upsampler(loaded: LoadedAvatar, directory: str | Path, data: str, cfg: UpsampleConfig,
                    log=print) -> list[dict]:
    """Render, train, save into the bundle and score; returns the score rows."""
    engine = _engine(loaded)
    start = time.perf_counter()
    pairs = training_pairs(loaded, engine, data, cfg.factor, cfg.frames)
    rendered = time.perf_counter() - start
    bar = tqdm(total=cfg.steps, desc="training the upsampler", unit="step", leave=False)

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(l1=f"{loss:.4f}")

    upsampler, report = train_upsampler(pairs, cfg.factor, cfg.steps, seed=cfg.seed, channels=cfg.channels,
                                        layers=cfg.layers, progress=progress)
    bar.close()
    report["render_seconds"] = round(rendered, 1)
    rows = score(loaded, engine, upsampler, data, cfg.test_frames, cfg.eval_pose_steps)
    report["held_out_psnr"] = {r["method"]: round(r["psnr"], 2) for r in rows}
    save_upsampler(Path(directory) / UPSAMPLER_FILE, upsampler, report)
    log(f"upsampler ×{cfg.factor}: {len(pairs)} training frames rendered in {rendered:.0f} s, {cfg.steps} steps in "
        f"{report['seconds']:.0f} s; written to {Path(directory) / UPSAMPLER_FILE}")
    poses = f"poses refined ({cfg.eval_pose_steps} steps)" if cfg.eval_pose_steps > 0 else "tracked poses"
    log(f"| method | output | PSNR (dB), {cfg.test_frames or 'all'} held-out frames, {poses} |")
    log("|---|---|---|")
    for r in rows:
        log(f"| {r['method']} | {r['size']}² | {r['psnr']:.2f} |")
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(__doc__)
    add_config_arguments(p, UpsampleConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_namespace(UpsampleConfig, build_parser().parse_args(argv))
    if cfg.factor not in (2, 4):
        raise UserError(f"--factor {cfg.factor}: 2 or 4")
    if cfg.steps < 1 or cfg.channels < 1 or cfg.layers < 2:
        raise UserError("--steps and --channels must be ≥ 1, --layers ≥ 2")
    if not Path(cfg.data).is_dir():
        raise UserError(f"{cfg.data}: no such dataset directory")
    loaded = load_bundle(cfg.bundle)
    if loaded.model.field_name != "fast":
        raise UserError(f"{cfg.bundle} holds a {loaded.model.field_name!r} field; the upsampler is for fast-field "
                        "avatars (the live engines)")
    build_upsampler(loaded, cfg.bundle, cfg.data, cfg)
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
