"""Training speed and quality for a fixed wall-time budget: the fast field against the paper's field.

    python bench/train_speed.py --data DATASET [--minutes 10] [--out runs/bench_train] [--eval-frames 0]

Trains `--field fast --preset cpu` and `--field nerface --preset cpu` one after the other in this process,
each for the same wall time, evaluates both on the held-out test frames, and prints a Markdown table:
method, resolution, minutes, steps, steps/s, test PSNR/SSIM, the nearest-training-frame baseline beside
them, and the difference to the baseline.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import date
from pathlib import Path

import torch

from trainer import fit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset (e.g. the 300-frame synthetic subject at 128²)")
    p.add_argument("--minutes", type=float, default=10.0, help="training wall time per field")
    p.add_argument("--out", default="runs/bench_train", help="where the two avatars go")
    p.add_argument("--eval-frames", type=int, default=0, help="test frames scored (0 = all)")
    p.add_argument("--fields", default="fast,nerface")
    args = p.parse_args(argv)

    results = {}
    for field in args.fields.split(","):
        out = Path(args.out) / field
        fit.main(["--data", args.data, "--field", field, "--preset", "cpu", "--max-minutes", str(args.minutes),
                  "--max-steps", "1000000", "--eval-frames", str(args.eval_frames), "--out", str(out), "--overwrite"])
        results[field] = json.loads((out / "metrics.json").read_text())

    size = json.loads((Path(args.data) / "transforms_test.json").read_text())["image_size"][1]
    print(f"\nTraining for {args.minutes:g} minutes, {date.today()}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads (CPU), test frames of {args.data}.\n")
    print("| method | resolution | minutes | steps | steps / s | test PSNR (dB) | test SSIM | nearest training frame PSNR | Δ to baseline |")
    print("|---|---|---|---|---|---|---|---|---|")
    for field, m in results.items():
        a, b, t = m["test"]["avatar"], m["test"]["nearest_training_frame"], m["training"]
        name = {"fast": "fast field (tri-planes + occupancy)", "nerface": "paper field (8×MLP)"}.get(field, field)
        print(f"| {name} | {size}² | {t['seconds_this_session'] / 60:.1f} | {t['steps']} | {t['steps_per_second']:.2f} | "
              f"{a['psnr']:.2f} | {a['ssim']:.3f} | {b['psnr']:.2f} | {a['psnr'] - b['psnr']:+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
