"""Live reenactment: track a webcam face and drive an avatar into a virtual camera, WebRTC, a window or a file.

    python run_live.py --demo
    python run_live.py --target BUNDLE [--source 0|/dev/videoN|clip.mp4] [--sink virtualcam|webrtc|window|file:out.mp4]

See `python run_live.py --help` for everything (the installed `nerface-live` command is the same).
"""

from streamer.app import cli

if __name__ == "__main__":
    cli()
