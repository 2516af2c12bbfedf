"""Live reenactment: track a webcam face and drive an avatar into a virtual camera, WebRTC, a window or a file.

    python run_live.py --demo
    python run_live.py --target BUNDLE [--source 0|/dev/videoN|clip.mp4] [--sink virtualcam|webrtc|window|file:out.mp4]

See `python run_live.py --help` for everything.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from avatar.base.errors import run_cli
from streamer.app import main

if __name__ == "__main__":
    run_cli(main)
