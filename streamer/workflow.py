"""One command from a recording to a live avatar: ``run_live.py --record me`` (or ``--target me`` on a folder
that holds only a recording).

    me/video.mp4, me/background.png, me/coverage.json   ← trainer/record.py (guided webcam take)
    me/dataset/                                         ← trainer/prepare.py (tracking, crop, full-frame plate)
    me/avatar/                                          ← trainer/fit.py, then export/build.py (engines.json)

Each step runs the same command a user would type, as a child process (the apps do not import each other), and
is skipped when its output exists and is current: newer than everything it was made from (the export: made
from the avatar's present weights, as its engines.json records). A fit that was interrupted resumes from its
last checkpoint.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from avatar.base.errors import UserError
from avatar.bundle.files import ENGINES_FILE, export_is_current

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class MakePreset:
    """How the avatar is made from the recording."""

    prepare: tuple[str, ...]
    fit: tuple[str, ...]
    export: tuple[str, ...]


MAKE_PRESETS = {
    # 256² head crops, photometric head tracking, the default fit (~12 minutes on a 2-core CPU), every engine timed
    "cpu": MakePreset(("--size", "256"), ("--preset", "cpu"), ()),
    # a pipeline check in about a minute: small, landmark poses only, a few hundred steps
    "smoke": MakePreset(("--size", "64", "--refine-poses", "0"), ("--preset", "smoke", "--max-steps", "200",
                                                                     "--eval-frames", "2"), ("--frames", "2")),
}


def is_recording_folder(path: str | Path) -> bool:
    """A folder with a recording (video.mp4) and no avatar bundle of its own."""
    p = Path(path)
    return p.is_dir() and (p / "video.mp4").is_file() and not (p / "avatar.json").is_file()


def _newer(output: Path, *inputs: Path) -> bool:
    """``output`` exists and is newer than every existing input."""
    if not output.exists():
        return False
    t = output.stat().st_mtime
    return all(t >= i.stat().st_mtime for i in inputs if i.exists())


def _run(log, *args: str) -> None:
    log("$ python " + " ".join(args))
    r = subprocess.run([sys.executable, *args], cwd=ROOT)
    if r.returncode != 0:
        raise UserError(f"{args[0]} failed (exit {r.returncode}); see its output above, fix it and run again — "
                        "finished steps are kept")


def make_avatar(folder: str | Path, source: str = "0", preset: str = "cpu", log=print) -> Path:
    """Record (if ``folder`` has no video yet) → prepare → fit → export; returns the bundle ``folder/avatar``."""
    if preset not in MAKE_PRESETS:
        raise UserError(f"--make-preset {preset}: choose one of {', '.join(MAKE_PRESETS)}")
    make = MAKE_PRESETS[preset]
    folder = Path(folder)
    video, background = folder / "video.mp4", folder / "background.png"
    dataset, avatar = folder / "dataset", folder / "avatar"
    if video.is_file():
        log(f"1/4 recording: {video} exists (delete it to record again)")
    else:
        if not (source.isdigit() or source.startswith("/dev/video")):
            raise UserError(f"{folder} holds no video.mp4: record one from a camera (--source 0) or put your "
                            "recording there as video.mp4")
        log("1/4 recording: follow the prompts in the window")
        _run(log, "trainer/record.py", "--out", str(folder), "--source", source)
    if _newer(dataset / "report.json", video, background):
        log(f"2/4 preparing: {dataset} is up to date")
    else:
        log("2/4 preparing the dataset (tracking every frame, the crop and the room's plate)")
        _run(log, "trainer/prepare.py", str(video), "--out", str(dataset), "--overwrite",
             "--background", str(background) if background.is_file() else "auto", *make.prepare)
    if _newer(avatar / "avatar.json", dataset / "report.json", dataset / "transforms_train.json"):
        log(f"3/4 training: {avatar} is up to date")
    else:
        resume = (avatar / "checkpoint.safetensors").is_file() and not (avatar / "avatar.json").is_file()
        log("3/4 training the avatar" + (" (resuming from its checkpoint)" if resume else "")
            + " — the progress bar shows the time left")
        _run(log, "trainer/fit.py", "--out", str(avatar),
             *(["--resume"] if resume else ["--data", str(dataset), "--overwrite", *make.fit]))
    if export_is_current(avatar):
        log(f"4/4 exporting: {avatar / ENGINES_FILE} is up to date")
    else:
        log("4/4 exporting the fast engines")
        _run(log, "export/build.py", str(avatar), *make.export)
    return avatar
