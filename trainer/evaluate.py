"""Score an avatar on held-out frames, beside a nearest-training-frame baseline.

    python trainer/evaluate.py BUNDLE --data DATASET_DIR [--frames N] [--out DIR]

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
from pathlib import Path

from avatar.base.devices import DEVICE_HELP, pick_device, prepare_device
from avatar.base.errors import UserError, run_cli
from avatar.base.fileio import write_json_atomic
from avatar.bundle.bundle import load_bundle
from avatar.eval.evaluation import evaluate
from avatar.eval.fidelity import FidelityConfig
from avatar.field.training import FitConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="avatar bundle directory (made by trainer/fit.py)")
    p.add_argument("--data", required=True, help="the dataset directory the avatar was trained on")
    p.add_argument("--frames", type=int, default=0, help="test frames to score, evenly spread (0 = all)")
    p.add_argument("--out", help="where metrics.json and sheets/ go (default: the bundle directory)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--refine-poses", type=int, default=FitConfig.eval_pose_steps, metavar="STEPS",
                   help="refine each test frame's tracked pose against the frame with the avatar itself before "
                        "scoring (photometric tracking of 6 numbers: expression and latent code stay as tracked) "
                        "for STEPS steps; the scores at the tracked poses are printed beside (0 = tracked poses only; "
                        "default %(default)s)")
    p.add_argument("--fidelity", action=argparse.BooleanOptionalAction, default=True,
                   help="measure expression fidelity with MediaPipe (default: on)")
    p.add_argument("--track-size", type=int, default=FidelityConfig.track_size,
                   help="images are upscaled to this many pixels (longer side) before tracking")
    p.add_argument("--controllability", action=argparse.BooleanOptionalAction, default=True,
                   help="render and track blendshape edits (a few renders per group; default: on)")
    args = p.parse_args(argv)
    if not Path(args.data).is_dir():
        raise UserError(f"{args.data}: no such dataset directory")
    if args.track_size < 128:
        raise UserError(f"--track-size {args.track_size} is too small for MediaPipe to find a face; use ≥ 128")
    device = pick_device(args.device)
    prepare_device(device)
    loaded = load_bundle(args.bundle, device)
    out = Path(args.out or args.bundle)
    fidelity_cfg = FidelityConfig(track_size=args.track_size, controllability=args.controllability) \
        if args.fidelity else None
    result = evaluate(loaded, args.data, out, args.frames, fidelity_cfg=fidelity_cfg, refine_iterations=args.refine_poses)
    untrained = Path(args.bundle) / "untrained_metrics.json"
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
