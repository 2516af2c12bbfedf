"""Rebuild the bundled demo: an avatar of the synthetic subject and a clip that drives it.

    python trainer/make_demo.py [--minutes 10] [--out assets/demo]

Runs the same commands a user runs on a camera-shaped (640×480) synthetic recording — trainer/synth.py, trainer/fit.py --field fast, export/build.py — with a
small deferred-shading field (64² planes, 8 channels; --shading deferred) and a learned ×2 upsampler (--upsample 2),
so that everything stays ≤ 20 MB and the live loop holds 25 frames/s on two cores, then writes a driving clip: the same
synthetic face in another performance (another seed), which `run_live.py --demo` tracks and retargets.
Takes ~12 minutes on a 2-core CPU. The result replaces OUT atomically.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2

from avatar.base.cli import add_config_arguments, arg, command_parser, config_from_namespace
from avatar.base.errors import UserError, run_cli
from avatar.base.fileio import atomic_directory
from avatar.bundle.files import TRT_MODEL, bundle_files

ROOT = Path(__file__).resolve().parents[1]

# The demo keeps the bundle's files (training leftovers stay out of the repository) but a TensorRT plan, which
# only loads on the GPU it was built for.
LEAVE_OUT = (TRT_MODEL,)
SIZE_LIMIT = 20 * 2**20
FRAME = "640x480"  # camera-shaped, as a webcam sees a person: the live demo sends the full frame


def run(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    r = subprocess.run([sys.executable, *args], cwd=ROOT)
    if r.returncode != 0:
        raise UserError(f"{args[0]} failed (exit {r.returncode}); see its output above")


@dataclass
class MakeDemoConfig:
    out: str = arg(str(ROOT / "assets" / "demo"), help="where the demo goes (replaced atomically)")
    minutes: float = arg(10.0, help="training time in minutes (trainer/fit.py --max-minutes)")
    size: int = arg(128, help="side of the avatar's square frames (trainer/prepare.py --size)")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(__doc__)
    add_config_arguments(p, MakeDemoConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_namespace(MakeDemoConfig, build_parser().parse_args(argv))
    with tempfile.TemporaryDirectory() as work:
        w = Path(work)
        run("trainer/synth.py", "--out", str(w / "subject"), "--frames", "300", "--frame", FRAME, "--seed", "0")
        run("trainer/prepare.py", str(w / "subject" / "video.mp4"), "--out", str(w / "data"), "--background",
            str(w / "subject" / "background.png"), "--size", str(cfg.size))
        run("trainer/fit.py", "--data", str(w / "data"), "--field", "fast", "--preset", "cpu", "--out",
            str(w / "avatar"), "--max-minutes", str(cfg.minutes), "--plane-resolution", "64", "--plane-channels", "8",
            "--shading", "deferred", "--upsample", "2")
        run("export/build.py", str(w / "avatar"), "--frames", "20")
        run("trainer/synth.py", "--out", str(w / "driver"), "--frames", "250", "--frame", FRAME, "--seed", "7",
            "--novel", "1")
        with atomic_directory(cfg.out, overwrite=True) as tmp:
            (tmp / "avatar").mkdir()
            for path in bundle_files(w / "avatar"):
                if path.name not in LEAVE_OUT:
                    shutil.copy2(path, tmp / "avatar" / path.name)
            shutil.copy2(w / "driver" / "video.mp4", tmp / "driver.mp4")
            preview = cv2.imread(str(w / "subject" / "preview.png"))  # 8 frames: half size, JPEG (~0.2 MB, not 4)
            cv2.imwrite(str(tmp / "subject_preview.jpg"), cv2.resize(preview, None, fx=0.5, fy=0.5,
                                                                     interpolation=cv2.INTER_AREA),
                        [cv2.IMWRITE_JPEG_QUALITY, 88])
            total = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
            if total > SIZE_LIMIT:
                raise UserError(f"the demo would be {total / 2**20:.1f} MB, over the 20 MB limit for bundled assets")
    print(f"demo written to {cfg.out} ({total / 2**20:.1f} MB)")
    return 0


def cli() -> None:
    """The ``nerface-make-demo`` console script."""
    run_cli(main)


if __name__ == "__main__":
    cli()
