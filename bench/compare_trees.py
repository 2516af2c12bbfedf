"""Is a refactor behaviour-neutral? This checkout beside an earlier one, side by side in one run.

    git worktree add /tmp/before 8998d6d          # the earlier commit, any checkout with the same commands
    python bench/compare_trees.py --baseline /tmp/before --bundle avatars/x --data data/x [--rounds 3]

Runs the same commands in both trees (each with its own code on PYTHONPATH), alternating so that both see the
same machine load, and prints Markdown tables:
1. ``bench/render_speed.py --engines-only`` (torch and fused engines): PSNR per tree and the median frames/s
   over the rounds, with the ratio after / before;
2. ``trainer/evaluate.py`` on the same bundle and dataset: whether every printed table line is identical;
3. ``run_live.py --demo --every-frame --fps 0`` (a fixed render size, no smoothing race): the decoded output
   frames of both trees compared pixel by pixel, per engine.
The bundle should have been made by the earlier tree (the point is that old avatars render the same).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENGINE_ROWS = {"torch": "fast field, torch engine (culled", "fused": "fast field, fused engine ("}


def run(tree: Path, *args: str, timeout: float = 1800) -> str:
    """``python ARGS`` in ``tree`` with that tree's code first on the path; stdout, or exit with its stderr."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, *args], cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise SystemExit(f"error: {' '.join(args[:2])} failed in {tree}:\n{r.stderr[-3000:]}")
    return r.stdout


def speed_rows(table: str) -> dict[tuple[str, int], tuple[float | None, float]]:
    """(engine, size) → (PSNR or None, seconds per frame) from render_speed.py's table (full-size rows only)."""
    out = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 5 or "rendered at" in cells[0]:
            continue
        for engine, prefix in ENGINE_ROWS.items():
            if cells[0].startswith(prefix):
                size = int(cells[1].rstrip("²"))
                out[(engine, size)] = (None if cells[2] == "—" else float(cells[2]), float(cells[3]))
    return out


def decoded(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def compare_speed(trees: dict[str, Path], args) -> None:
    seconds: dict[str, dict] = {name: {} for name in trees}
    psnrs: dict[str, dict] = {name: {} for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            rows = speed_rows(run(tree, "bench/render_speed.py", "--fast", str(args.bundle), "--data", str(args.data),
                                  "--frames", str(args.frames), "--sizes", args.sizes, "--engines-only"))
            for key, (p, t) in rows.items():
                seconds[name].setdefault(key, []).append(t)
                psnrs[name][key] = p
    print(f"\n### Render speed ({args.rounds} alternating rounds, median of {args.frames} frames each)\n")
    print("| engine | size | PSNR before | PSNR after | frames/s before | frames/s after | after / before |")
    print("|---|---|---|---|---|---|---|")
    for key in sorted(seconds["before"]):
        before, after = (statistics.median(seconds[n][key]) for n in ("before", "after"))
        pb, pa = psnrs["before"][key], psnrs["after"].get(key)
        print(f"| {key[0]} | {key[1]}² | {_dB(pb)} | {_dB(pa)} | {1 / before:.1f} | {1 / after:.1f} | "
              f"{before / after:.2f} |")


def compare_evaluation(trees: dict[str, Path], args, scratch: Path) -> None:
    tables = {}
    for name, tree in trees.items():
        out = run(tree, "trainer/evaluate.py", str(args.bundle), "--data", str(args.data), "--frames",
                  str(args.eval_frames), "--out", str(scratch / f"eval_{name}"))
        tables[name] = [line for line in out.splitlines() if line.startswith("|")]
    differ = [(a, b) for a, b in zip(tables["before"], tables["after"]) if a != b]
    same = not differ and len(tables["before"]) == len(tables["after"])
    print(f"\n### trainer/evaluate.py ({args.eval_frames} test frames): {len(tables['after'])} table lines, "
          f"{'identical to the printed digit' if same else f'{len(differ)} differ'}\n")
    for a, b in differ:
        print(f"- before: `{a}`\n- after:  `{b}`")


def compare_live(trees: dict[str, Path], args, scratch: Path) -> None:
    print(f"\n### run_live.py --demo --every-frame --fps 0 --size {args.live_size} ({args.live_frames} frames)\n")
    print("| engine | frames before | frames after | max abs difference (0–255) | identical |")
    print("|---|---|---|---|---|")
    for engine in ("fused", "torch"):
        videos = {}
        for name, tree in trees.items():
            videos[name] = scratch / f"live_{engine}_{name}.mp4"
            # --size, not --render-size: the earlier checkout may predate the new spelling (this one warns)
            run(tree, "run_live.py", "--demo", "--every-frame", "--fps", "0", "--size", str(args.live_size),
                "--engine", engine, "--sink", f"file:{videos[name]}", "--max-frames", str(args.live_frames), "--quiet")
        a, b = decoded(videos["before"]), decoded(videos["after"])
        diff = max((int(np.abs(x.astype(int) - y.astype(int)).max()) for x, y in zip(a, b)), default=-1)
        print(f"| {engine} | {len(a)} | {len(b)} | {diff} | {'yes' if diff == 0 and len(a) == len(b) else 'no'} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, type=Path, help="a checkout of the earlier commit")
    p.add_argument("--bundle", required=True, type=Path, help="a fast-field bundle (made by the earlier tree), exported")
    p.add_argument("--data", required=True, type=Path, help="its dataset")
    p.add_argument("--rounds", type=int, default=3, help="alternating render_speed.py runs per tree")
    p.add_argument("--frames", type=int, default=10, help="held-out frames per render_speed.py run")
    p.add_argument("--sizes", default="256", help="render sizes for render_speed.py")
    p.add_argument("--eval-frames", type=int, default=6, help="test frames for trainer/evaluate.py")
    p.add_argument("--live-size", type=int, default=128, help="the fixed head render size of the live comparison")
    p.add_argument("--live-frames", type=int, default=40)
    p.add_argument("--skip", action="append", default=[], choices=["speed", "evaluate", "live"])
    args = p.parse_args(argv)
    args.bundle, args.data = args.bundle.resolve(), args.data.resolve()
    if not (args.baseline / "run_live.py").is_file():
        raise SystemExit(f"error: {args.baseline} is not a checkout of this project")
    trees = {"before": args.baseline.resolve(), "after": ROOT}
    print(f"before: {trees['before']} ({_commit(trees['before'])}), after: {ROOT} ({_commit(ROOT)})")
    with tempfile.TemporaryDirectory() as tmp:
        if "speed" not in args.skip:
            compare_speed(trees, args)
        if "evaluate" not in args.skip:
            compare_evaluation(trees, args, Path(tmp))
        if "live" not in args.skip:
            compare_live(trees, args, Path(tmp))
    return 0


def _dB(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _commit(tree: Path) -> str:
    r = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=tree, capture_output=True, text=True)
    return re.sub(r"\s+", "", r.stdout) or "not a git checkout"


if __name__ == "__main__":
    sys.exit(main())
