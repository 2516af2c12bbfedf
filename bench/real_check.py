"""Real-footage check: each target clip through the user's one command, scored on its held-out frames and
driven by a different real person.

    python bench/real_check.py --clips /data/real --pair d6:d13 --pair d3:d10 --pair d9:d14 --work /data/real_check
        [--make-preset cpu] [--eval-frames 20] [--drive-frames 0] [--render-size 256]

For each ``TARGET:DRIVER`` pair (clip names in --clips, without .mp4):
1. ``WORK/TARGET/video.mp4`` ← the target clip, then ``run_live.py --target WORK/TARGET --source DRIVER.mp4
   --every-frame --fps 0 --sink file:…`` — the user's one command: prepare (256², photometric head tracking) →
   fit → export, each step skipped when current, then the live loop on every frame of the driver's clip. The
   minutes of each step come from its output files' times.
2. ``trainer/evaluate.py`` on the held-out frames: PSNR / SSIM beside the nearest training frame, and the
   expression-fidelity block (AED beside the nearest frame's, controllability single / whole).
3. Cross-identity: MediaPipe reads the driver's frames and the avatar's output frames (each frame alone, image
   mode); per group (jaw, smile, blink, brow, pucker) the Pearson r over the frames where both show a face, the
   two 5–95 % ranges, and what the avatar does while the driver is calm (the driver's calmest 10 % of frames).
   A picture ``WORK/TARGET/cross_DRIVER.png``: driver above avatar at the driver's calm, jaw-open, smile and
   blink peaks.

Writes ``WORK/real_check.json`` and prints Markdown tables. Clips stay out of the repository (the LivePortrait
repository's MIT-licensed ``assets/examples/driving/d*.mp4`` are the ones the README quotes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# The groups the cross-identity check correlates (a group's value: the mean of its members' scores).
GROUPS: dict[str, tuple[str, ...]] = {
    "jaw": ("jawOpen",),
    "smile": ("mouthSmileLeft", "mouthSmileRight"),
    "blink": ("eyeBlinkLeft", "eyeBlinkRight"),
    "brow": ("browInnerUp",),
    "pucker": ("mouthPucker",),
}
# The faces a calm driver should not make: the avatar's mean of these while the driver is calm.
CALM_WATCH: dict[str, tuple[str, ...]] = {
    **GROUPS,
    "squint": ("eyeSquintLeft", "eyeSquintRight"),
    "frown": ("mouthFrownLeft", "mouthFrownRight"),
}


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson r of ``a [n]`` and ``b [n]``; None when either does not vary or n < 3."""
    if len(a) < 3 or a.std() < 1e-6 or b.std() < 1e-6:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def group_table(scores: np.ndarray, names: list[str], groups: dict[str, tuple[str, ...]]) -> dict[str, np.ndarray]:
    """``scores [t, 52]`` (NaN rows: no face) → per group ``[t]``."""
    return {g: scores[:, [names.index(m) for m in members]].mean(1) for g, members in groups.items()}


def track_video(path: Path, frames: int = 0) -> tuple[np.ndarray, list[str], list[np.ndarray]]:
    """MediaPipe blendshapes ``[t, 52]`` of every frame (image mode: no smoothing across frames; NaN rows where no
    face is found), their names and the frames themselves (RGB uint8)."""
    from avatar.capture.tracking import FaceTracker
    from avatar.capture.video import iter_frames

    rows, images, names = [], [], None
    with FaceTracker("image") as tracker:
        for i, frame in enumerate(iter_frames(path)):
            if frames and i >= frames:
                break
            obs = tracker.track(frame)
            names = names or (obs.names if obs is not None else None)
            rows.append(None if obs is None else np.asarray(obs.blendshapes, float))
            images.append(frame)
    n = len(names) if names else 52
    return np.array([r if r is not None else np.full(n, np.nan) for r in rows]), list(names or []), images


def cross_identity(driver: np.ndarray, avatar: np.ndarray, names: list[str]) -> dict:
    """Per group: Pearson r of the driver's and the avatar's tracked scores (``[t, 52]`` each, same frames), their
    5–95 % ranges; the avatar's scores while the driver is calm (its calmest 10 % of frames by summed groups)."""
    both = ~np.isnan(driver).any(1) & ~np.isnan(avatar).any(1)
    d, a = group_table(driver[both], names, GROUPS), group_table(avatar[both], names, GROUPS)
    out: dict = {"frames": int(len(driver)), "both_tracked": int(both.sum()), "groups": {}}
    for g in GROUPS:
        out["groups"][g] = {"r": pearson(d[g], a[g]),
                            "driver_range": [float(np.percentile(d[g], 5)), float(np.percentile(d[g], 95))],
                            "avatar_range": [float(np.percentile(a[g], 5)), float(np.percentile(a[g], 95))]}
    activity = sum(d[g] for g in GROUPS)
    calm = np.argsort(activity)[: max(1, len(activity) // 10)]
    dc, ac = group_table(driver[both][calm], names, CALM_WATCH), group_table(avatar[both][calm], names, CALM_WATCH)
    out["calm"] = {g: {"driver": float(dc[g].mean()), "avatar": float(ac[g].mean())} for g in CALM_WATCH}
    return out


def peak_frames(driver: np.ndarray, names: list[str]) -> dict[str, int]:
    """Frame indices of the driver's calm moment and its jaw, smile and blink peaks (tracked frames only)."""
    ok = ~np.isnan(driver).any(1)
    g = group_table(np.where(ok[:, None], driver, 0.0), names, GROUPS)
    # calm: held for a quarter second (the live loop's filter lags a fast change by a few frames)
    held = np.convolve(np.pad(sum(g.values()), 3, mode="edge"), np.ones(7) / 7, mode="valid")
    activity = np.where(ok, held, np.inf)
    return {"calm": int(np.argmin(activity)),
            **{k: int(np.argmax(np.where(ok, g[k], -np.inf))) for k in ("jaw", "smile", "blink")}}


def picture(path: Path, driver_frames: list[np.ndarray], avatar_frames: list[np.ndarray], peaks: dict[str, int],
            height: int = 256) -> None:
    """Driver (top) above avatar (bottom), one column per moment in ``peaks``, labelled; written atomically."""
    import cv2

    from avatar.base.fileio import write_bytes_atomic

    def fit(img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        return cv2.resize(img, (round(w * height / h), height), interpolation=cv2.INTER_AREA)

    columns = []
    for label, i in peaks.items():
        top, bottom = fit(driver_frames[i]), fit(avatar_frames[min(i, len(avatar_frames) - 1)])
        width = max(top.shape[1], bottom.shape[1])
        col = np.zeros((2 * height, width, 3), np.uint8)
        col[:height, : top.shape[1]], col[height:, : bottom.shape[1]] = top, bottom
        cv2.putText(col, f"{label} (frame {i})", (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 2)
        columns.append(col)
    sheet = np.concatenate(columns, 1)
    ok, png = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    write_bytes_atomic(path, png.tobytes())


def one_command(folder: Path, driver: Path, cfg: argparse.Namespace) -> dict:
    """Run the user's one command on ``folder`` (a recording) driven by ``driver``; the minutes of each step."""
    drive = folder / f"drive_{driver.stem}.mp4"
    log = folder / f"drive_{driver.stem}.json"
    cmd = [sys.executable, "run_live.py", "--target", str(folder), "--make-preset", cfg.make_preset,
           "--source", str(driver), "--every-frame", "--fps", "0", "--render-size", str(cfg.render_size),
           "--sink", f"file:{drive}", "--conditioning-log", str(log), "--quiet"]
    if cfg.drive_frames:
        cmd += ["--max-frames", str(cfg.drive_frames)]
    print("$ " + " ".join(cmd), flush=True)
    start = time.time()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=ROOT, env=env)
    if r.returncode != 0:
        raise SystemExit(f"real_check: the one command failed on {folder} (exit {r.returncode})")
    done = {"prepare": folder / "dataset" / "report.json", "fit": folder / "avatar" / "avatar.json",
            "export": folder / "avatar" / "engines.json"}
    marks = {k: p.stat().st_mtime for k, p in done.items()}
    minutes = {}
    last = start
    for k in ("prepare", "fit", "export"):
        # a step skipped because it was current finished before this run: no time for it
        minutes[k] = round((marks[k] - last) / 60, 2) if marks[k] >= start else None
        last = max(last, marks[k])
    minutes["ready_to_go_live"] = round((last - start) / 60, 2) if last > start else None
    return {"minutes": minutes, "drive_video": str(drive), "conditioning_log": str(log)}


def evaluate(folder: Path, cfg: argparse.Namespace) -> dict:
    """trainer/evaluate.py on the held-out frames (with the fidelity block) → its metrics.json."""
    out = folder / "eval"
    cmd = [sys.executable, "trainer/evaluate.py", str(folder / "avatar"), "--data", str(folder / "dataset"),
           "--frames", str(cfg.eval_frames), "--out", str(out)]
    print("$ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        raise SystemExit(f"real_check: evaluate.py failed on {folder} (exit {r.returncode})")
    return json.loads((out / "metrics.json").read_text())


def summarize(metrics: dict) -> dict:
    """The figures the table shows, out of evaluate.py's metrics.json."""
    test, fid = metrics["test"], metrics.get("fidelity", {})
    held = fid.get("heldout", {})
    row = {"psnr": test["avatar"]["psnr"], "ssim": test["avatar"]["ssim"],
           "nearest_psnr": test["nearest_training_frame"]["psnr"],
           "nearest_ssim": test["nearest_training_frame"]["ssim"],
           "aed": held.get("avatar", {}).get("aed"), "nearest_aed": held.get("nearest_training_frame", {}).get("aed"),
           "control": {}}
    for group, r in fid.get("controllability", {}).get("groups", {}).items():
        if r.get("tested"):
            row["control"][group] = [r["single"]["response"], r["whole"]["response"]]
    return row


def _f(v, fmt: str = ".2f") -> str:
    return "n/a" if v is None else format(v, fmt)


def tables(results: dict) -> str:
    lines = ["| target ← driver | PSNR (nearest) | SSIM (nearest) | AED (nearest) ratio | jaw | smile | blink | brow "
             "| ready (min: prepare / fit / export) |", "|---|---|---|---|---|---|---|---|---|"]
    for pair, r in results.items():
        s, m = r["scores"], r["make"]["minutes"]
        ratio = s["aed"] / s["nearest_aed"] if s["aed"] and s["nearest_aed"] else None
        ctrl = [" / ".join(_f(v) for v in s["control"].get(g, [None, None]))
                for g in ("jawOpen", "mouthSmile", "eyeBlink", "browInnerUp")]
        lines.append(f"| {pair} | {s['psnr']:.2f} ({s['nearest_psnr']:.2f}) | {s['ssim']:.3f} ({s['nearest_ssim']:.3f}) "
                     f"| {_f(s['aed'], '.4f')} ({_f(s['nearest_aed'], '.4f')}) {_f(ratio)}× | {' | '.join(ctrl)} | "
                     f"{_f(m['ready_to_go_live'], '.1f')} ({_f(m['prepare'], '.1f')} / {_f(m['fit'], '.1f')} / "
                     f"{_f(m['export'], '.1f')}) |")
    lines += ["", "(controllability: response single / whole; 1.0 = MediaPipe sees all of the commanded change)", "",
              "Cross-identity (the driver's MediaPipe scores vs the avatar's, frame by frame: Pearson r; 5–95 % "
              "ranges driver → avatar)", "",
              "| target ← driver | frames | " + " | ".join(GROUPS) + " | avatar while the driver is calm |",
              "|---|---|" + "---|" * len(GROUPS) + "---|"]
    for pair, r in results.items():
        c = r["cross"]
        cells = [f"{_f(v['r'])} ({v['driver_range'][1] - v['driver_range'][0]:.2f}→"
                 f"{v['avatar_range'][1] - v['avatar_range'][0]:.2f})" for v in c["groups"].values()]
        calm = ", ".join(f"{g} {v['driver']:.2f}→{v['avatar']:.2f}" for g, v in c["calm"].items()
                         if max(v["driver"], v["avatar"]) >= 0.1)
        lines.append(f"| {pair} | {c['both_tracked']}/{c['frames']} | {' | '.join(cells)} | {calm or 'calm'} |")
    return "\n".join(lines)


def check_pair(pair: str, cfg: argparse.Namespace) -> dict:
    target, driver = pair.split(":")
    clips = Path(cfg.clips)
    target_clip, driver_clip = clips / f"{target}.mp4", clips / f"{driver}.mp4"
    for c in (target_clip, driver_clip):
        if not c.is_file():
            raise SystemExit(f"real_check: no clip {c}")
    folder = Path(cfg.work) / target
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "video.mp4").is_file():
        shutil.copy2(target_clip, folder / "video.mp4")
    make = one_command(folder, driver_clip, cfg)
    scores = summarize(evaluate(folder, cfg))
    print(f"tracking {driver_clip.name} and the avatar's {Path(make['drive_video']).name} …", flush=True)
    d_scores, names, d_frames = track_video(driver_clip, cfg.drive_frames)
    a_scores, a_names, a_frames = track_video(Path(make["drive_video"]))
    index = [f["source_index"] for f in json.loads(Path(make["conditioning_log"]).read_text())["frames"]]
    # output frame k shows source frame index[k]; keep the driver frames that were shown
    d_scores, d_frames = d_scores[index], [d_frames[i] for i in index]
    n = min(len(d_scores), len(a_scores))
    cross = cross_identity(d_scores[:n], a_scores[:n], names or a_names)
    peaks = peak_frames(d_scores[:n], names or a_names)
    picture(folder / f"cross_{driver}.png", d_frames[:n], a_frames[:n], peaks)
    cross["peaks"] = peaks
    return {"make": make, "scores": scores, "cross": cross}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", required=True, help="folder of clips, NAME.mp4")
    p.add_argument("--pair", action="append", required=True, metavar="TARGET:DRIVER",
                   help="target clip name and the clip that drives it (repeat)")
    p.add_argument("--work", required=True, help="where the avatars, renders and results go (reused: current "
                                                 "steps are skipped)")
    p.add_argument("--make-preset", default="cpu", help="run_live.py --make-preset")
    p.add_argument("--eval-frames", type=int, default=20, help="held-out frames evaluate.py scores (0 = all)")
    p.add_argument("--drive-frames", type=int, default=0, help="driver frames to use (0 = the whole clip)")
    p.add_argument("--render-size", type=int, default=256, help="run_live.py --render-size")
    cfg = p.parse_args(argv)
    for pair in cfg.pair:
        if pair.count(":") != 1:
            p.error(f"--pair {pair}: expected TARGET:DRIVER")
    out = Path(cfg.work) / "real_check.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    from avatar.base.fileio import write_json_atomic

    for pair in cfg.pair:
        results[pair.replace(":", " ← ")] = check_pair(pair, cfg)
        write_json_atomic(out, results)  # each pair's figures are kept as soon as they exist
        print(tables({k: v for k, v in results.items() if k == pair.replace(":", " ← ")}), flush=True)
    print(f"\n# real_check ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs)\n")
    print(tables({k: results[k] for k in (p.replace(":", " ← ") for p in cfg.pair)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
