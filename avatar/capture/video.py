"""Streaming video input/output through PyAV (FFmpeg): frames are decoded one at a time, never all at once."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from avatar.base.errors import UserError


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int
    height: int
    fps: float
    frame_count: int | None  # from the container; None when it does not say


def probe_video(path: str | Path) -> VideoInfo:
    """Open ``path`` and check it holds a decodable video stream; raise :class:`UserError` if not."""
    import av

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a video file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError(f"{path} has no video stream")
            stream = container.streams.video[0]
            # Decoding one frame proves the codec works (some files have a stream header only).
            first = next(container.decode(stream), None)
            if first is None:
                raise UserError(f"{path} contains no decodable video frames")
            rate = stream.average_rate or stream.guessed_rate or Fraction(25)
            count = int(stream.frames) if stream.frames else None
            return VideoInfo(path, first.width, first.height, float(rate), count)
    except UserError:
        raise
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path} is not a readable video ({type(exc).__name__}: {exc})") from None


def iter_frames(path: str | Path) -> Iterator[np.ndarray]:
    """Yield RGB frames ``[H, W, 3] uint8`` of the first video stream, one at a time."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")
    except av.error.FFmpegError as exc:
        raise UserError(f"{path}: decoding failed ({exc})") from None


class VideoWriter:
    """H.264 MP4 writer. Frames are RGB ``[H, W, 3] uint8``. ``pix_fmt`` yuv420p (default) plays everywhere;
    yuv444p keeps full colour resolution (fine stripes and edges of saturated colour survive), and plays in
    VLC, mpv, ffmpeg and Chromium but not in QuickTime or Firefox.

    Writes to a temporary name and renames on :meth:`close`, so an interrupted recording never
    leaves a truncated file under the final name.
    """

    def __init__(self, path: str | Path, width: int, height: int, fps: float = 25.0, crf: int = 17,
                 pix_fmt: str = "yuv420p"):
        import av

        if width % 2 or height % 2:
            raise ValueError(f"H.264 needs even frame sizes, got {width}x{height}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")
        self._container = av.open(str(self._tmp), mode="w")
        self._stream = self._container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = pix_fmt
        self._stream.options = {"crf": str(crf), "preset": "veryfast"}
        self.frames_written = 0

    def write(self, rgb: np.ndarray) -> None:
        import av

        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames_written += 1

    def close(self) -> None:
        if self._container is None:
            return
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._container = None
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.close()
            self._container = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def parse_frame_size(text: str, flag: str) -> tuple[int, int]:
    """``"640x480"`` → ``(640, 480)``; both even and within 32–4096, or a :class:`UserError` naming ``flag``."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"{flag} {text!r}: give WIDTHxHEIGHT, e.g. 640x480") from None
    if not (32 <= w <= 4096 and 32 <= h <= 4096) or w % 2 or h % 2:
        raise UserError(f"{flag} {text}: width and height must be even numbers from 32 to 4096")
    return w, h
