"""Record the video an avatar is made from, guided: prompts for what to perform and live coverage bars.

    python trainer/record.py --out me/                              # webcam 0, a preview window with prompts
    python trainer/record.py --out me/ --source 1 --seconds 150     # another camera, a longer take
    python trainer/record.py --source clip.mp4 --no-window --out R  # only measure what a video covers

An avatar can only do what its video shows: a recording that never opens the mouth wide makes an avatar that
cannot. The recorder asks for each group in turn — talk, open the mouth wide, smile, blink each eye, raise the
brows, pucker, round the lips ('oo'), turn and nod the head — and fills a bar per group from MediaPipe's reading
of your face as you perform it (the same measure `trainer/prepare.py` reports). When every bar is full (or at
--seconds, or on Space) it asks you to step out of the picture for a few seconds: those frames become
background.png, the empty room the live loop puts around your avatar.

Writes into --out: video.mp4 (what the camera saw while you performed), background.png (the empty scene) and
coverage.json (per group: performed or not, with its figures; the missing groups named). With --source FILE the
video is not copied: only coverage.json is written (and with a window, the file plays with its bars).

Keys in the window: Space = done performing (go to the empty-scene step), n = skip this prompt, q / Esc = stop.
Recording tips: a static camera at eye level, the head and shoulders in the frame, even light on the face, no
one else in the picture; 1–2 minutes; come back to a calm neutral face between the prompts.
Then: python run_live.py --record me (fits, exports and goes live) or python trainer/fit.py --video me/video.mp4
--background me/background.png --out avatars/me.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from avatar.base.cli import add_config_arguments, arg, command_parser, config_from_namespace
from avatar.base.errors import UserError, run_cli
from avatar.base.fileio import write_bytes_atomic, write_json_atomic
from avatar.data.coverage import COVERAGE_ORDER, recording_coverage
from avatar.data.prepare import track_video

COVERAGE_FILE, VIDEO_FILE, BACKGROUND_FILE = "coverage.json", "video.mp4", "background.png"

PROMPTS = {  # what the window asks for, group by group (COVERAGE_ORDER)
    "talk": "Talk for a while (count to twenty, read something aloud)",
    "jawOpen": "Open your mouth wide, as far as it goes, then close it",
    "mouthSmile": "Smile broadly, then relax",
    "eyeBlinkLeft": "Close your LEFT eye alone (wink), then open it",
    "eyeBlinkRight": "Close your RIGHT eye alone (wink), then open it",
    "browRaise": "Raise your eyebrows high, then relax",
    "mouthPucker": "Pucker your lips, as for a kiss",
    "mouthFunnel": "Round your lips as in 'oo'",
    "headTurn": "Turn your head slowly left and right",
    "headNod": "Nod slowly: look up, then down",
}
LABELS = {"talk": "talk", "jawOpen": "mouth wide", "mouthSmile": "smile", "eyeBlinkLeft": "left eye",
          "eyeBlinkRight": "right eye", "browRaise": "brows", "mouthPucker": "pucker", "mouthFunnel": "'oo'",
          "headTurn": "turn", "headNod": "nod"}


@dataclass
class RecordConfig:
    out: str = arg(help="directory for video.mp4, background.png and coverage.json")
    source: str = arg("0", help="camera index (0), /dev/videoN, or a video FILE to measure (coverage only)")
    window: bool = arg(True, help="a preview window with the prompts (--no-window with a FILE: only measure its "
                                  "coverage)")
    seconds: float = arg(180.0, help="longest performance in seconds")
    background_seconds: float = arg(4.0, help="seconds of the empty scene (face-free frames) to record after the "
                                              "performance, for the background plate")
    landmarker: str | None = arg(None, help="path to face_landmarker.task (default: found automatically)")
    overwrite: bool = arg(False, help="record again over an existing video.mp4")


def summary_lines(coverage: dict) -> list[str]:
    """One line per group: ✓/✗, the action and its figure."""
    lines = []
    for name, g in coverage["groups"].items():
        figure = (f"{g['jaw_openings']} openings" if "jaw_openings" in g else
                  f"spread {g['spread_deg']:.0f}° of {g['needed_deg']:.0f}°" if "spread_deg" in g else
                  f"max {g['max']:.2f}, {g['frames_above_half_max']} frames")
        lines.append(f"  {'✓' if g['performed'] else '✗'} {name:<14} {figure}")
    return lines


def draw_overlay(rgb: np.ndarray, coverage: dict | None, prompt: str, status: str = "") -> np.ndarray:
    """The recorder's window: the (mirrored) camera picture ``[h, w, 3] uint8`` with the prompt on top and one
    coverage bar per group (green when performed). Pure: returns a new image."""
    frame = np.ascontiguousarray(rgb[:, ::-1])  # a mirror, as people expect to see themselves
    h, w = frame.shape[:2]
    scale = max(0.4, w / 1280)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.rectangle(frame, (0, 0), (w, int(44 * scale) + 8), (0, 0, 0), -1)
    cv2.putText(frame, prompt, (10, int(32 * scale) + 4), font, 0.9 * scale, (255, 255, 255), max(1, int(2 * scale)),
                cv2.LINE_AA)
    if status:
        cv2.putText(frame, status, (10, h - 10), font, 0.6 * scale, (255, 255, 0), 1, cv2.LINE_AA)
    if coverage is not None:
        bar_w, bar_h, x = int(180 * scale), int(18 * scale), w - int(190 * scale) - 10
        y = int(60 * scale) + 8
        for name in COVERAGE_ORDER:
            g = coverage["groups"][name]
            done = g["performed"]
            cv2.rectangle(frame, (x, y), (x + bar_w, y + bar_h), (60, 60, 60), -1)
            cv2.rectangle(frame, (x, y), (x + int(bar_w * g["progress"]), y + bar_h),
                          (60, 200, 60) if done else (230, 170, 40), -1)
            cv2.putText(frame, LABELS[name], (x + 4, y + bar_h - int(4 * scale)), font, 0.5 * scale,
                        (255, 255, 255), 1, cv2.LINE_AA)
            y += bar_h + int(6 * scale)
    return frame


def measure_file(cfg: RecordConfig, log=print) -> dict:
    """Coverage of an existing video (``--source FILE``): writes ``coverage.json`` into ``cfg.out``."""
    track = track_video(cfg.source, cfg.landmarker)
    coverage = {"source": str(cfg.source), **recording_coverage(track.expressions, track.poses),
                "frames_total": track.total, "frames_without_face": len(track.skipped)}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / COVERAGE_FILE, coverage)
    return coverage


def empty_scene(frames: list[np.ndarray]) -> np.ndarray:
    """Median of ``[k][h, w, 3] uint8`` face-free frames: the room without you (people passing are outvoted)."""
    return np.median(np.stack(frames), axis=0).round().astype(np.uint8)


WINDOW = "record (Space: done, n: skip, q: stop)"


@dataclass
class Take:
    """The guided take's running state: the phase ("perform", then "leave" for the empty room), the video
    writer, what the tracker read from each performed frame, the face-free frames of the empty room, and the
    coverage the window shows. One object so each step of :func:`record_camera` is a small function."""

    cfg: RecordConfig
    out: Path
    source: Any
    writer: Any = None
    expressions: list = field(default_factory=list)  # [52] blendshapes per performed frame with a face
    poses: list = field(default_factory=list)  # [4, 4] head pose per performed frame with a face
    skipped: list = field(default_factory=list)  # indices of performed frames without a face
    empty: list = field(default_factory=list)  # [h, w, 3] uint8 frames of the empty room
    phase: str = "perform"
    started: float | None = None  # the capture clock at the first frame
    face_free_since: float | None = None
    coverage: dict = field(default_factory=lambda: recording_coverage(np.zeros((0, 52), np.float32),
                                                                      np.zeros((0, 4, 4))))
    skipped_prompts: set[str] = field(default_factory=set)


def record_camera(cfg: RecordConfig, log=print) -> dict:
    """The guided take from a camera (see the top of this file)."""
    from avatar.capture.sources import open_source
    from avatar.capture.tracking import FaceTracker

    out = Path(cfg.out)
    if (out / VIDEO_FILE).exists() and not cfg.overwrite:
        raise UserError(f"{out / VIDEO_FILE} exists (pass --overwrite to record again)")
    source = open_source(cfg.source)
    if cfg.window:
        open_window(source)
    out.mkdir(parents=True, exist_ok=True)
    take = Take(cfg, out, source)
    try:
        with FaceTracker("video", cfg.landmarker) as tracker:
            source.start()
            while True:
                frame = source.latest(timeout=1.0)
                if frame is None:
                    if source.error:
                        raise UserError(f"camera {cfg.source}: {source.error}")
                    if source.ended:  # a camera does not end; a clip standing in for one does
                        break
                    continue
                if take_frame(take, tracker, frame):
                    break
    except KeyboardInterrupt:
        if take.writer is not None:
            take.writer.abort()
        raise UserError("recording stopped; nothing written") from None
    except BaseException:
        if take.writer is not None:
            take.writer.abort()
        raise
    finally:
        source.close()
        if cfg.window:
            cv2.destroyAllWindows()
    return save_take(take, log)


def open_window(source) -> None:
    """The preview window; without a display, close the camera and say what to do instead."""
    try:
        cv2.namedWindow(WINDOW, cv2.WINDOW_AUTOSIZE)
    except cv2.error:
        source.close()
        raise UserError("cannot open a window here (no display); record where you can see yourself, or "
                        "measure an existing video with --source FILE --no-window") from None


def take_frame(take: Take, tracker, frame) -> bool:
    """Track one camera frame and take it into the performance or the empty room, then show it with its prompt
    and act on the window's keys. True when the empty room has enough frames (the take is done)."""
    now = frame.media_time  # the capture clock (a clip's own clock when one stands in for a camera)
    take.started = now if take.started is None else take.started
    obs = tracker.track(frame.rgb, int((now - take.started) * 1000))
    todo: list[str] = []
    if take.phase == "perform":
        prompt, status, todo = perform_frame(take, frame, obs, now)
    else:
        prompt, status, done = empty_room_frame(take, frame, obs, now)
        if done:
            return True
    if take.cfg.window:
        window_frame(take, frame, prompt, status, todo)
    return False


def perform_frame(take: Take, frame, obs, now: float) -> tuple[str, str, list[str]]:
    """Write a performed frame into the video (even sizes), add its expression and pose to the coverage, and
    end the performance at --seconds (or, without a window, when every group is covered). Returns the prompt,
    the status line and the groups still to perform."""
    from avatar.capture.video import VideoWriter

    cfg = take.cfg
    if take.writer is None:
        h, w = frame.rgb.shape[:2]
        take.writer = VideoWriter(take.out / VIDEO_FILE, w - w % 2, h - h % 2, fps=take.source.fps, crf=17)
    take.writer.write(frame.rgb[: frame.rgb.shape[0] // 2 * 2, : frame.rgb.shape[1] // 2 * 2])
    if obs is None:
        take.skipped.append(frame.index)
    else:
        take.expressions.append(obs.blendshapes)
        take.poses.append(obs.head_pose)
        if len(take.expressions) % 5 == 0:
            take.coverage = recording_coverage(np.stack(take.expressions), np.stack(take.poses))
    todo = [k for k in take.coverage["missing"] if k not in take.skipped_prompts]
    prompt = PROMPTS[todo[0]] if todo else "All done! Press Space to finish"
    status = f"{now - take.started:4.0f} s  {'no face!' if obs is None else ''}"
    if now - take.started >= cfg.seconds or (not todo and not cfg.window):
        take.phase = "leave"
    return prompt, status, todo


def empty_room_frame(take: Take, frame, obs, now: float) -> tuple[str, str, bool]:
    """The empty scene: only frames without a face count, from half a second after the face left. Returns
    the prompt, the status line and whether the room has --background-seconds of frames."""
    cfg, fps = take.cfg, take.source.fps
    prompt = f"Step out of the picture ({len(take.empty) / fps:.0f}/{cfg.background_seconds:.0f} s)"
    status = "face seen: waiting" if obs is not None else "recording the empty room"
    if obs is None:
        take.face_free_since = take.face_free_since or now
        if now - take.face_free_since > 0.5:  # you have left, not just turned away
            take.empty.append(frame.rgb)
    else:
        take.face_free_since = None
    return prompt, status, len(take.empty) >= cfg.background_seconds * fps


def window_frame(take: Take, frame, prompt: str, status: str, todo: list[str]) -> None:
    """Show the frame with its bars and prompt; q / Esc stop, Space ends the performance, n skips a prompt."""
    cv2.imshow(WINDOW, draw_overlay(frame.rgb, take.coverage, prompt, status)[..., ::-1])
    key = cv2.waitKey(1) & 0xFF
    if key in (ord("q"), 27):
        raise KeyboardInterrupt
    if key == ord(" ") and take.phase == "perform":
        take.phase = "leave"
    if key == ord("n") and take.phase == "perform" and todo:
        take.skipped_prompts.add(todo[0])


def save_take(take: Take, log) -> dict:
    """Close the video, write background.png (the median empty room, if any was recorded) and coverage.json;
    returns the coverage. A take without a face is discarded."""
    cfg, out = take.cfg, take.out
    if not take.expressions:
        if take.writer is not None:
            take.writer.abort()
        raise UserError("no face was seen while recording: sit in front of the camera, in good light")
    take.writer.close()
    if take.empty:
        ok, png = cv2.imencode(".png", empty_scene(take.empty)[..., ::-1])
        write_bytes_atomic(out / BACKGROUND_FILE, png.tobytes())
    else:
        log("warning: no frames of the empty room were recorded, so no background.png: trainer/prepare.py will "
            "estimate the room from the pixels your head leaves uncovered (--background auto)")
    coverage = {"source": f"camera {cfg.source}",
                **recording_coverage(np.stack(take.expressions), np.stack(take.poses)),
                "frames_total": len(take.expressions) + len(take.skipped), "frames_without_face": len(take.skipped)}
    write_json_atomic(out / COVERAGE_FILE, coverage)
    return coverage


def is_file_source(source: str) -> bool:
    return not (source.isdigit() or source.startswith("/dev/video"))


def record(cfg: RecordConfig, log=print) -> dict:
    if is_file_source(cfg.source):
        if not Path(cfg.source).is_file():
            raise UserError(f"--source {cfg.source}: no such camera index or video file")
        coverage = measure_file(cfg, log)
    else:
        coverage = record_camera(cfg, log)
    log(f"coverage of {coverage['source']} ({coverage['frames']} frames with a face):")
    for line in summary_lines(coverage):
        log(line)
    if coverage["missing"]:
        log(f"missing: {', '.join(coverage['missing'])} — record again and perform them, or the avatar will not "
            "be able to")
    log(f"wrote {Path(cfg.out) / COVERAGE_FILE}")
    return coverage


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(__doc__)
    add_config_arguments(p, RecordConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_namespace(RecordConfig, build_parser().parse_args(argv))
    if cfg.seconds <= 0 or cfg.background_seconds <= 0:
        raise UserError("--seconds and --background-seconds must be positive")
    record(cfg)
    return 0


def cli() -> None:
    """The ``nerface-record`` console script."""
    run_cli(main)


if __name__ == "__main__":
    cli()
