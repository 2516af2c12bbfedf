"""Check a live recording's full frame: its shape, the room outside the head's box, the avatar inside it.

    python run_live.py --demo --sink file:out.mp4 --max-frames 30
    python bench/fullframe_check.py --video out.mp4 [--target BUNDLE] [--output WxH] [--render-size 256]

Rebuilds the live loop's layout and base picture for BUNDLE (the demo avatar by default; --output as given to
run_live.py) and prints one Markdown table: the frames' size and aspect, the PSNR of the pixels outside the
head's box against the room's plate (the same everywhere but for coding noise: high), and of the pixels inside
it (the avatar's head, not the empty room: low).
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", required=True, help="run_live.py's file sink output")
    p.add_argument("--target", default=str(ROOT / "assets" / "demo" / "avatar"), help="the bundle it ran")
    p.add_argument("--output", help="run_live.py --output, if it was given")
    p.add_argument("--render-size", type=int, default=256, help="run_live.py --render-size")
    args = p.parse_args(argv)

    from avatar.base.errors import UserError
    from avatar.base.metrics import psnr
    from avatar.bundle.bundle import load_bundle
    from avatar.capture.video import iter_frames, parse_frame_size
    from streamer.pipeline import make_compositor

    loaded = load_bundle(args.target)
    comp = make_compositor(loaded, parse_frame_size(args.output, "--output") if args.output else None, args.render_size)
    frames = np.stack(list(iter_frames(args.video)))
    n, h, w = frames.shape[:3]
    if (w, h) != (comp.layout.width, comp.layout.height):
        raise UserError(f"{args.video} is {w}x{h}, but {args.target} at --output {args.output or 'default'} makes "
                        f"{comp.layout.width}x{comp.layout.height}")
    inside = np.zeros((h, w), bool)
    x0, y0, side = (int(round(v)) for v in comp.layout.box)
    inside[max(y0, 0):max(y0 + side, 0), max(x0, 0):max(x0 + side, 0)] = True
    base = comp.base
    frames, base = frames / 255.0, base / 255.0
    out_psnr = np.median([psnr(f[~inside], base[~inside]) for f in frames]) if (~inside).any() else None
    in_psnr = np.median([psnr(f[inside], base[inside]) for f in frames])
    aspect = Fraction(w, h)
    framing = "full frame" if loaded.full_frame is not None else "square crop (version-1 bundle)"
    print("| frames | size | aspect | framing | head box (x0, y0, side) | outside the box vs plate (median) | "
          "inside the box vs plate (median) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {n} | {w}×{h} | {aspect.numerator}:{aspect.denominator} | {framing} | {x0}, {y0}, {side} | "
          f"{'— (the box is the whole frame)' if out_psnr is None else f'{out_psnr:.1f} dB'} | {in_psnr:.1f} dB |")
    return 0


if __name__ == "__main__":
    from avatar.base.errors import run_cli

    run_cli(main)
