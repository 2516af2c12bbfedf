"""How strongly MediaPipe reads the synthetic subject's expression channels: generate (or read) a subject, track
every frame with the app's tracker, and compare each true channel with the blendshape that should follow it.

    python bench/synth_check.py [--subject S | --frames 300 --size 256 --seed 0]

Prints Markdown tables: per channel the true maximum, MediaPipe's maximum (over all frames and over the frames
where the channel acts alone), the correlation of MediaPipe's score with the true value, and the largest
correlation with any other channel (cross-talk); then the schedule itself (frames alone / in combination,
largest |r| with another channel and with the head pose).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# True channel → the MediaPipe blendshapes (averaged) that should read it. MediaPipe names eyes by the
# subject's side (eyeBlinkLeft = the subject's left eye, on the image's right), as the synthetic head does.
RESPONSE = {
    "jaw_open": ("jawOpen",),
    "smile": ("mouthSmileLeft", "mouthSmileRight"),
    "blink_left": ("eyeBlinkLeft",),
    "blink_right": ("eyeBlinkRight",),
    "brow_raise": ("browInnerUp",),
    "pucker": ("mouthPucker",),
    "funnel": ("mouthFunnel",),
}


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() < 1e-9 or b.std() < 1e-9:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def track_subject(subject: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    """MediaPipe blendshapes ``[t, 52]`` (NaN where no face), their names, and the true expressions ``[t, c]``."""
    from avatar.capture.tracking import FaceTracker
    from avatar.capture.video import iter_frames

    truth = json.loads((subject / "truth.json").read_text())
    expression = np.array([f["expression"] for f in truth["frames"]], float)
    scores, names = [], None
    with FaceTracker("image") as tracker:  # each frame on its own: no temporal smoothing between frames
        for frame in iter_frames(subject / "video.mp4"):
            obs = tracker.track(frame)
            if obs is None:
                scores.append(None)
                continue
            names = names or obs.names
            scores.append(obs.blendshapes)
    n = len(names) if names else 52
    table = np.array([s if s is not None else np.full(n, np.nan) for s in scores], float)
    return table, names or [], expression


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subject", help="an existing trainer/synth.py output (default: generate one)")
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    gen_seconds = None
    with tempfile.TemporaryDirectory() as tmp:
        subject = Path(args.subject) if args.subject else Path(tmp) / "subject"
        if not args.subject:
            from trainer.synth import SynthConfig, make_subject

            start = time.perf_counter()
            make_subject(SynthConfig(out=str(subject), frames=args.frames, size=args.size, seed=args.seed))
            gen_seconds = time.perf_counter() - start
        truth = json.loads((subject / "truth.json").read_text())
        table, names, expression = track_subject(subject)
    channels = truth["expression_names"]
    angles = np.array([f["yaw_pitch_roll_deg"] for f in truth["frames"]], float)
    found = ~np.isnan(table[:, 0])
    size = truth["image_size"][0]
    print(f"Synthetic subject vs MediaPipe, {date.today()}, {platform.processor() or platform.machine()}, "
          f"{len(expression)} frames at {size}², seed {truth['config']['seed']}; face found in "
          f"{found.sum()}/{len(found)} frames" + (f"; generated in {gen_seconds:.1f} s" if gen_seconds else "") + "\n")
    col = {n: i for i, n in enumerate(names)}
    response = {c: table[:, [col[b] for b in RESPONSE[c]]].mean(1) for c in channels if c in RESPONSE}
    active = np.abs(expression) > 0.05  # [t, c]
    print("| channel | true max | MediaPipe blendshape | MediaPipe max | MediaPipe max, channel alone | "
          "correlation | largest cross-talk |")
    print("|---|---|---|---|---|---|---|")
    for k, c in enumerate(channels):
        if c not in response:
            continue
        r = response[c][found]
        alone = found & active[:, k] & (active.sum(1) == 1)
        cross = max(((abs(_corr(expression[found, j], r)), channels[j]) for j in range(len(channels)) if j != k),
                    default=(float("nan"), "-"))
        print(f"| {c} | {expression[:, k].max():.2f} | {'+'.join(RESPONSE[c])} | {r.max():.2f} | "
              f"{response[c][alone].max() if alone.any() else float('nan'):.2f} | "
              f"{_corr(expression[found, k], r):.2f} | {cross[0]:.2f} ({cross[1]}) |")
    print("\n| channel | frames alone (> 0.05) | frames alone ≥ 0.9 | frames with others | largest |r| with "
          "another channel | largest |r| with yaw/pitch/roll |")
    print("|---|---|---|---|---|---|")
    for k, c in enumerate(channels):
        others = [abs(_corr(expression[:, k], expression[:, j])) for j in range(len(channels)) if j != k]
        pose = [abs(_corr(expression[:, k], angles[:, a])) for a in range(3)]
        alone = active[:, k] & (active.sum(1) == 1)
        print(f"| {c} | {alone.sum()} | {(alone & (expression[:, k] >= 0.9)).sum()} | "
              f"{(active[:, k] & (active.sum(1) > 1)).sum()} | {np.nanmax(others):.2f} | {np.nanmax(pose):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
