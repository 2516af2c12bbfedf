"""Score an avatar on held-out frames, beside a nearest-training-frame baseline.

    python trainer/evaluate.py BUNDLE --data DATASET_DIR [--frames N] [--out DIR] [--eval-pose-steps STEPS]

Renders the test frames (tracked expression and pose, the first training frame's latent code — the paper's
protocol; each pose first refined against its frame by the avatar, as a photometric tracker would: the
scores at the raw tracked poses are printed beside) and reports mean L1, PSNR, SSIM (LPIPS only where its
weights are on disk: otherwise marked unavailable, never estimated) for the avatar and for the training image closest in expression and pose.
On a synthetic subject it also scores the novel/ ground-truth head poses. Writes metrics.json and PNG
sheets (ground truth | render | error heat-map | normals from depth | foreground mask) into --out.

Expression fidelity (on by default; --no-fidelity skips it): MediaPipe, the app's own tracker, reads the
renders and the real frames (upscaled to --track-size): AED (mean |Δ| of the 51 non-neutral blendshapes),
head-pose error, mouth/eye-region PSNR, each beside the nearest training frame; controllability of
jawOpen, mouthSmile, eyeBlink, browInnerUp, mouthPucker, mouthFunnel (single group and whole expression
vector, from the neutral expression at the reference head pose); on a synthetic subject, the correlation
of the tracked scores with truth.json. It goes into metrics.json as "fidelity" and is printed as tables.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from avatar.base.cli import add_config_arguments, arg, command_parser, config_from_namespace
from avatar.base.devices import DEVICE_HELP, pick_device, prepare_device
from avatar.base.errors import UserError, run_cli
from avatar.base.fileio import write_json_atomic
from avatar.bundle.bundle import load_bundle
from avatar.eval.evaluation import evaluate
from avatar.eval.fidelity import FidelityConfig
from avatar.field.training import FitConfig


@dataclass
class EvaluateConfig:
    bundle: str = arg(help="avatar bundle directory (made by trainer/fit.py)", positional=True)
    data: str = arg(help="the dataset directory the avatar was trained on")
    frames: int = arg(0, help="test frames to score, evenly spread (0 = all)")
    out: str | None = arg(None, help="where metrics.json and sheets/ go (default: the bundle directory)")
    device: str = arg("auto", help=DEVICE_HELP)
    # trainer/fit.py's setting of the same name (it scores the avatar at the end of training the same way)
    eval_pose_steps: int = arg(FitConfig.eval_pose_steps, metavar="STEPS", deprecated=("--refine-poses",),
                               help="refine each test frame's tracked pose against the frame with the avatar itself "
                                    "before scoring (photometric tracking of 6 numbers: expression and latent code "
                                    "stay as tracked) for STEPS steps; the scores at the tracked poses are printed "
                                    "beside (0 = tracked poses only)")
    fidelity: bool = arg(True, help="measure expression fidelity with MediaPipe")
    track_size: int = arg(FidelityConfig.track_size,
                          help="images are upscaled to this many pixels (longer side) before tracking")
    controllability: bool = arg(FidelityConfig.controllability,
                                help="render and track blendshape edits (a few renders per group)")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(__doc__)
    add_config_arguments(p, EvaluateConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_namespace(EvaluateConfig, build_parser().parse_args(argv))
    if not Path(cfg.data).is_dir():
        raise UserError(f"{cfg.data}: no such dataset directory")
    if cfg.track_size < 128:
        raise UserError(f"--track-size {cfg.track_size} is too small for MediaPipe to find a face; use ≥ 128")
    device = pick_device(cfg.device)
    prepare_device(device)
    loaded = load_bundle(cfg.bundle, device)
    out = Path(cfg.out or cfg.bundle)
    fidelity_cfg = FidelityConfig(track_size=cfg.track_size, controllability=cfg.controllability) \
        if cfg.fidelity else None
    result = evaluate(loaded, cfg.data, out, cfg.frames, fidelity_cfg=fidelity_cfg, refine_iterations=cfg.eval_pose_steps)
    untrained = Path(cfg.bundle) / "untrained_metrics.json"
    if untrained.is_file():
        result["untrained"] = json.loads(untrained.read_text())
    write_json_atomic(out / "metrics.json", result)
    print(f"metrics.json and sheets/ written to {out}")
    return 0


def cli() -> None:
    """The ``nerface-evaluate`` console script."""
    run_cli(main)


if __name__ == "__main__":
    cli()
