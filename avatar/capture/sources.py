"""Frame sources for the live loop and the guided recorder: a webcam (index or /dev/videoN) or a video file, each read on its own thread.

The newest frame wins: the reader overwrites a one-frame slot, so a slow consumer never sees stale frames
pile up (latency cannot grow). A video file is paced at its own frame rate (as a camera would deliver it)
and can loop; a camera that disappears is reopened until it comes back.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avatar.base.errors import UserError


@dataclass
class Frame:
    rgb: np.ndarray  # [h, w, 3] uint8
    captured: float  # time.monotonic() when it was read
    index: int  # frames read so far by the source (gaps = frames the consumer never took)
    media_time: float  # when the frame happens (s): the capture time, or a clip's own clock with every_frame
    tracked: bool = False  # set by TrackingStage: ``observation`` holds the tracker's result (None = no face)
    observation: object = None
    track_seconds: float = 0.0


class FrameSource:
    """Base: a reader thread fills ``self._slot``; :meth:`latest` hands out each frame at most once."""

    def __init__(self) -> None:
        self._slot: Frame | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._taken = -1
        self.ended = False  # no more frames will come (file over, not looping)
        self.lost = False  # a camera stopped delivering; we keep trying to reopen it
        self.frames_read = 0
        self._thread = threading.Thread(target=self._run_guarded, daemon=True, name=type(self).__name__)
        self.error: str | None = None

    def start(self) -> "FrameSource":
        self._thread.start()
        return self

    def _publish(self, rgb: np.ndarray, media_time: float | None = None) -> None:
        with self._cond:
            now = time.monotonic()
            self._slot = Frame(rgb, now, self.frames_read, now if media_time is None else media_time)
            self.frames_read += 1
            self._cond.notify_all()

    def _wait_until_taken(self) -> None:
        """Block the reader until the consumer has taken the frame in the slot (``every_frame`` mode only)."""
        with self._cond:
            while self._slot is not None and self._slot.index != self._taken and not self._stop.is_set():
                self._cond.wait(0.05)

    def _run_guarded(self) -> None:
        try:
            self._run()
        except Exception as exc:  # surfaced to the main thread as one line
            self.error = str(exc)
        finally:
            with self._cond:
                self.ended = True
                self._cond.notify_all()

    def _run(self) -> None:
        raise NotImplementedError

    def latest(self, timeout: float = 1.0) -> Frame | None:
        """The newest frame not handed out yet; waits up to ``timeout`` s. None if none came (or the source ended)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._slot is None or self._slot.index == self._taken) and not self.ended:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            if self._slot is None or self._slot.index == self._taken:
                return None
            self._taken = self._slot.index
            self._cond.notify_all()  # an every_frame reader waits for this
            return self._slot

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=3)


class VideoFileSource(FrameSource):
    """Decodes a video file in real time (paced at its fps); ``loop`` starts it over at the end.

    ``every_frame``: no pacing and no dropping — each frame waits until the consumer took the one before, and
    carries the clip's own clock as ``media_time`` (offline processing: the result does not depend on speed).
    """

    def __init__(self, path: str | Path, loop: bool = False, speed: float = 1.0, every_frame: bool = False):
        from avatar.capture.video import probe_video

        super().__init__()
        self.info = probe_video(path)  # a missing or undecodable file fails here, as one line
        self.path, self.loop, self.speed, self.every_frame = Path(path), loop, speed, every_frame
        self.fps = self.info.fps or 25.0

    def _run(self) -> None:
        from avatar.capture.video import iter_frames

        period = 1.0 / (self.fps * self.speed)
        origin = time.monotonic()
        while not self._stop.is_set():
            start = time.monotonic()
            count = 0
            for count, rgb in enumerate(iter_frames(self.path), 1):
                if self._stop.is_set():
                    return
                if self.every_frame:
                    self._wait_until_taken()
                    self._publish(rgb, origin + self.frames_read / self.fps)
                    continue
                wait = start + (count - 1) * period - time.monotonic()
                if wait > 0:
                    self._stop.wait(wait)
                self._publish(rgb)
            if not self.loop or count == 0:
                return


class CameraSource(FrameSource):
    """A webcam through OpenCV (index or device path). Reopens it when it disappears."""

    def __init__(self, device: int | str, width: int = 640, height: int = 480, fps: float = 30.0):
        import cv2

        super().__init__()
        self.device, self.size, self.fps = device, (width, height), fps
        # OpenCV logs each backend it tries (several lines per missing camera); our own message says it once.
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
        self._cap = cv2.VideoCapture(device)
        if not self._cap.isOpened():
            raise UserError(f"cannot open camera {device!r}: is it connected and not used by another program? "
                            "(list cameras with `v4l2-ctl --list-devices` on Linux)")
        self._configure()

    def _configure(self) -> None:
        import cv2

        self._cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.size[0])
        self._cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.size[1])
        self._cap.set(cv2.CAP_PROP_FPS, self.fps)
        self._cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # do not let the driver queue old frames

    def _run(self) -> None:
        import cv2

        failures = 0
        while not self._stop.is_set():
            ok, bgr = self._cap.read()
            if ok and bgr is not None:
                failures, self.lost = 0, False
                self._publish(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                continue
            failures += 1
            if failures >= 5:  # unplugged or taken by another program: wait, reopen
                self.lost = True
                self._cap.release()
                self._stop.wait(1.0)
                self._cap = cv2.VideoCapture(self.device)
                if self._cap.isOpened():
                    self._configure()
            else:
                self._stop.wait(0.02)

    def close(self) -> None:
        super().close()
        self._cap.release()


class TrackingStage(FrameSource):
    """Tracks the frames of ``source`` on its own thread and hands them on tracked (newest first, as any source).

    The live loop renders frame N while this thread tracks frame N+1: a frame costs the slower of the two stages
    instead of their sum where they do not compete for the same cores (a GPU render; on a 2-core CPU they do, see
    the README's live-loop table). ``every_frame``: each tracked frame waits until it is taken (nothing is
    dropped; the source itself must be in the same mode). The tracker is used from this thread only.
    """

    def __init__(self, source: FrameSource, tracker, every_frame: bool = False):
        super().__init__()
        self.source, self.tracker, self.every_frame = source, tracker, every_frame
        self._thread.name = "TrackingStage"

    def start(self) -> "TrackingStage":
        self.source.start()
        return super().start()

    def _run(self) -> None:
        while not self._stop.is_set():
            frame = self.source.latest(timeout=0.25)
            self.lost = self.source.lost  # a camera's reconnecting state, for the status line
            if frame is None:
                if self.source.error:
                    raise RuntimeError(self.source.error)
                if self.source.ended:
                    return
                continue
            start = time.monotonic()
            observation = self.tracker.track(frame.rgb, int(frame.media_time * 1000))
            tracked = Frame(frame.rgb, frame.captured, frame.index, frame.media_time, True, observation,
                            time.monotonic() - start)
            with self._cond:
                self._slot = tracked
                self.frames_read = self.source.frames_read
                self._cond.notify_all()
            if self.every_frame:
                self._wait_until_taken()

    def close(self) -> None:
        super().close()
        self.source.close()


def open_source(spec: str, loop: bool = False, every_frame: bool = False) -> FrameSource:
    """``0`` / ``1`` … (camera index), ``/dev/videoN`` (camera), or a video file path (``every_frame``: see
    :class:`VideoFileSource`; a camera is always live)."""
    if spec.isdigit():
        return CameraSource(int(spec))
    if spec.startswith("/dev/video"):
        if not Path(spec).exists():
            raise UserError(f"no camera at {spec}")
        return CameraSource(spec)
    if not Path(spec).is_file():
        raise UserError(f"--source {spec}: no such camera index or video file")
    return VideoFileSource(spec, loop=loop, every_frame=every_frame)
