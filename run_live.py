"""Live reenactment: track a webcam face and drive an avatar into a virtual camera / WebRTC.

    python run_live.py --target BUNDLE [--source 0|/dev/videoN|clip.mp4] [--sink virtualcam|webrtc|window|file:out.mp4]

Not implemented yet: the live loop needs trained avatar bundles and render engines first (see `issues`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from avatar.errors import UserError, run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="avatar bundle directory made by trainer/fit.py")
    parser.parse_args(argv)
    raise UserError("the live loop is not implemented yet; build a dataset with trainer/prepare.py meanwhile")


if __name__ == "__main__":
    run_cli(main)
