"""Where live frames go: a video file, a virtual camera, a preview window (the WebRTC server is in webrtc.py).

Every sink takes RGB ``[h, w, 3] uint8`` frames through ``send`` and must not block the loop for long;
``close`` is idempotent and finalises what it wrote.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from avatar.base.errors import UserError
from streamer.pipeline import Controls

V4L2_SETUP = "sudo modprobe v4l2loopback devices=1 exclusive_caps=1 card_label=Avatar"


class Sink:
    name = "sink"

    def send(self, rgb: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class FileSink(Sink):
    """H.264 MP4 (4:4:4: plays in VLC, mpv and Chromium; for QuickTime or Firefox re-encode with
    ``ffmpeg -i out.mp4 -pix_fmt yuv420p share.mp4``), written under a temporary name and renamed when closed
    (never half a file)."""

    name = "file"

    def __init__(self, path: str, width: int, height: int, fps: float):
        from avatar.capture.video import VideoWriter

        if not path.lower().endswith((".mp4", ".m4v", ".mov")):
            raise UserError(f"--sink file:{path}: give an .mp4 path")
        self.path = Path(path)
        # Near-lossless (crf 10, full-resolution colour): recordings are compared with offline renders and with
        # the plate, and small frames suffer most. 4:2:0 would halve the colour resolution: the demo's room
        # (a flag's red and white stripes) came back at 40.3 dB after 4:2:0 at crf 10, 44.4 after 4:4:4.
        self.writer = VideoWriter(self.path, width, height, fps=fps or 25.0, crf=10, pix_fmt="yuv444p")

    def send(self, rgb: np.ndarray) -> None:
        self.writer.write(rgb)

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        self.writer.abort()


class VirtualCameraSink(Sink):
    """pyvirtualcam: OBS's virtual camera on Windows/macOS, v4l2loopback on Linux. Frames are sent as RGB."""

    name = "virtualcam"

    def __init__(self, width: int, height: int, fps: float, device: str | None = None):
        try:
            import pyvirtualcam
        except ImportError:
            raise UserError("the virtual camera needs pyvirtualcam: pip install pyvirtualcam") from None
        try:
            self.cam = pyvirtualcam.Camera(width=width, height=height, fps=fps or 30.0, fmt=pyvirtualcam.PixelFormat.RGB,
                                           device=device)
        except Exception as exc:  # pyvirtualcam raises RuntimeError with backend-specific texts
            raise UserError(f"no virtual camera device ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                            + setup_hint()) from None
        self.device = self.cam.device

    def send(self, rgb: np.ndarray) -> None:
        self.cam.send(np.ascontiguousarray(rgb))

    def close(self) -> None:
        if getattr(self, "cam", None) is not None:
            self.cam.close()
            self.cam = None


def setup_hint() -> str:
    if sys.platform.startswith("linux"):
        return f"on Linux create one with: {V4L2_SETUP}"
    return "install OBS Studio (28+) and start its virtual camera once, then try again"


class WindowSink(Sink):
    """An OpenCV preview window. Keys: r recalibrate, p pose lock, q / Esc quit."""

    name = "window"

    def __init__(self, controls: Controls, title: str = "avatar (r: recalibrate, p: pose lock, q: quit)"):
        import cv2

        self.cv2, self.controls, self.title = cv2, controls, title
        try:
            cv2.namedWindow(title, cv2.WINDOW_AUTOSIZE)
        except cv2.error:
            raise UserError("cannot open a preview window here (no display); use --sink file:out.mp4 or webrtc") from None

    def send(self, rgb: np.ndarray) -> None:
        self.cv2.imshow(self.title, rgb[..., ::-1])
        key = self.cv2.waitKey(1) & 0xFF
        if key == ord("r"):
            self.controls.recalibrate = True
        elif key == ord("p"):
            self.controls.pose_lock = not self.controls.pose_lock
        elif key in (ord("q"), 27):
            self.controls.quit = True

    def close(self) -> None:
        self.cv2.destroyWindow(self.title)
