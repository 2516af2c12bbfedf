"""End-to-end check of the live loop: run `run_live.py` on a video into a file, then compare every recorded
frame with an offline render of the conditioning the loop logged, and print the loop's latency statistics.

    python bench/live_check.py --target avatars/me --source clip.mp4 [--frames 100] [--render-size 256] [--fps 15]
        [--output WxH]

--render-size is the head render's largest side (run_live.py's); the output frame is the bundle's full frame
(or --output); a bundle without a full frame outputs --render-size² as before.

Prints a Markdown table: frames recorded, PSNR of recorded vs offline frames (min / median), frames/s,
median and 95th-percentile capture-to-sink latency, the median render size and per-stage medians.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True)
    p.add_argument("--source", required=True, help="a video file (looped)")
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--render-size", type=int, default=256, help="run_live.py --render-size")
    p.add_argument("--fps", type=float, default=15.0, help="frame-rate target (the render size adapts); 0 = fixed")
    p.add_argument("--engine", default="auto")
    p.add_argument("--overlap", choices=["auto", "on", "off"], default="auto", help="run_live.py --overlap")
    p.add_argument("--output", help="run_live.py --output WxH (default: the bundle's framing)")
    args = p.parse_args(argv)

    from avatar.base.metrics import psnr
    from avatar.bundle.bundle import load_bundle
    from avatar.capture.video import iter_frames, parse_frame_size
    from avatar.engines.choice import open_engine
    from streamer.pipeline import BLACK, make_compositor

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        cmd = [sys.executable, "run_live.py", "--target", args.target, "--source", args.source, "--loop", "--sink",
               f"file:{t / 'out.mp4'}", "--max-frames", str(args.frames), "--render-size", str(args.render_size), "--fps",
               str(args.fps), "--engine", args.engine, "--stats", str(t / "stats.json"), "--conditioning-log",
               str(t / "cond.json"), "--quiet", "--overlap", args.overlap,
               *(["--output", args.output] if args.output else [])]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return r.returncode
        stats = json.loads((t / "stats.json").read_text())
        log = json.loads((t / "cond.json").read_text())
        frames = list(iter_frames(t / "out.mp4"))
    loaded = load_bundle(args.target)
    engine = open_engine(loaded, args.target, log["engine"])
    compositor = make_compositor(loaded, parse_frame_size(args.output, "--output") if args.output else None,
                                 args.render_size)
    scores = []
    for frame, c in zip(frames, log["frames"]):
        render = engine.render_upsampled if c.get("upsampled") else engine.render
        out = render(c["expression"], c["head_pose"], loaded.latent(c["latent"]), c["render_size"], BLACK)
        scores.append(psnr(frame / 255.0, compositor(out["rgb"], out["alpha"]) / 255.0))
    w, h = log["output"]
    print(f"Live loop, {date.today()}, {platform.processor() or platform.machine()}, engine {log['engine']}, "
          f"{w}x{h} output, head rendered at up to {log['size']}², --fps {args.fps}, --overlap {args.overlap}, "
          f"source {Path(args.source).name}\n")
    print("| frames in file | PSNR vs offline render (min / median) | frames / s | latency median (ms) | "
          "latency p95 (ms) | render size (median) | stage medians (ms) |")
    print("|---|---|---|---|---|---|---|")
    stages = ", ".join(f"{k} {v:.0f}" for k, v in stats["stages_ms_median"].items())
    print(f"| {len(frames)} | {min(scores):.1f} / {np.median(scores):.1f} dB | {stats['fps']:.1f} | "
          f"{stats['latency_ms_median']:.0f} | {stats['latency_ms_p95']:.0f} | {stats['render_size_median']}²"
          f"{' (%.0f %% learned-upsampled)' % (100 * stats['upsampled_share']) if stats.get('upsampled_share') else ''} | "
          f"{stages} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
