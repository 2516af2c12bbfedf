"""The live command: source thread → ``LivePipeline.step`` → sinks, with stage timings, a status line and stats.

    python run_live.py --target avatars/me [--source 0] [--sink virtualcam --sink webrtc] [--engine auto]
    python run_live.py --record me          # record (guided) → prepare → fit → export → live, steps already done skipped
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from avatar.base.cli import add_config_arguments, arg, command_parser, config_from_namespace, format_default
from avatar.base.errors import UserError, run_cli

PRESETS: dict[str, dict] = {
    "cpu": dict(size=256, fps=25.0),  # a laptop without a GPU (a deferred field with an upsampler holds this)
    "gpu": dict(size=512, fps=30.0),  # TensorRT / CUDA
}


@dataclass
class LiveConfig:
    target: str = arg("", help="avatar bundle (trainer/fit.py --field fast; export/build.py makes it faster)")
    source: str = arg("0", help="camera index (0), /dev/videoN, or a video file (--demo: the bundled clip)")
    sinks: list[str] = arg(default_factory=lambda: ["webrtc"], flag="--sink", metavar="SINK",
                           help="virtualcam | webrtc | window | file:PATH.mp4 (repeat for several)")
    engine: str = arg("auto", help="auto (fastest measured by export/build.py; fused on a CPU when nothing was "
                                   "measured) | fused | torch | onnxruntime | tensorrt")
    device: str = arg("auto", help="where the engine renders: auto (CUDA when available), cpu, cuda, cuda:N")
    preset: str = arg("cpu", flag="--live-preset", deprecated=("--preset",), choices=sorted(PRESETS),
                      help="cpu: 256² at 25 fps; gpu: 512² at 30 (trainer/fit.py's --preset is another thing)")
    size: int = arg(256, flag="--render-size", deprecated=("--size",),
                    help="largest side of the rendered head in pixels (never more than the head's box in the output)")
    fps: float = arg(25.0, help="frame-rate target; the render resolution adapts to hold it (0: always render at "
                                "--render-size)")
    output: str | None = arg(None, metavar="WxH",
                             help="output frame size, e.g. 1280x720 or 640x480 (default: the recording's own framing, "
                                  "at most 1280x720; a bundle made before full frames were kept: --render-size² "
                                  "square)")
    background: str | None = arg(None, flag="--backdrop", deprecated=("--background",), metavar="IMAGE|blur",
                                 help="an image to put behind the avatar instead of the recorded room, or 'blur' for "
                                      "the room blurred (default: the recording's plate)")
    loop: bool = arg(False, help="start a video-file source over when it ends (--demo: on)")
    every_frame: bool = arg(False, help="with a video file: process every frame in order on the clip's own clock "
                                        "instead of keeping real time (an offline render through the live path; "
                                        "slower than real time drops nothing)")
    max_frames: int = arg(0, help="stop after this many frames (0: run until Ctrl-C)")
    stats: str | None = arg(None, help="write latency / FPS / dropped-frame statistics to this JSON file at the end")
    conditioning_log: str | None = arg(None, help="write each frame's expression, head pose and render size (JSON)")
    mode: str = arg("relative", choices=["relative", "absolute"],
                    help="relative: your changes from your neutral drive the avatar's neutral; absolute: your "
                         "tracked expression as it is")
    pose_lock: bool = arg(False, help="drive the expression only; the head stays still")
    gain: float = arg(1.0, help="expression gain (0–3)")
    smoothing: float = arg(1.0, help="temporal smoothing of the tracked face: more = steadier but slower to follow, "
                                     "0 = none")
    components: int = arg(0, help="project expressions onto this many principal components of the avatar's "
                                  "training set (0: no projection)")
    latent: int = 0
    host: str = arg("127.0.0.1", help="WebRTC server address (any other than loopback needs the printed token)")
    port: int = arg(8080, help="WebRTC server port")
    token: str | None = arg(None, help="token for a non-loopback --host (default: a random one, printed)")
    max_viewers: int = arg(4, help="WebRTC viewers at once")
    landmarker: str | None = arg(None, help="face_landmarker.task (default: found automatically)")
    quiet: bool = arg(False, help="no status line")
    # Track frame N+1 on its own thread while frame N renders. auto: when rendering on a GPU. On a 2-core CPU it
    # does not pay (README, "Live loop"): the render is most of a frame, and the tracker's threads beside it
    # slow it by more than the tracking they hide.
    overlap: str = arg("auto", choices=["auto", "on", "off"],
                       help="track the next frame on its own thread while this one renders: on, off, or auto (on "
                            "when rendering on a GPU; on a CPU the two compete for the same cores)")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        __doc__.split("\n\n")[0] + "\n\n" + "Examples:\n"
        "  python run_live.py --demo                                   # no webcam, no training: the bundled demo\n"
        "  python run_live.py --record me --sink virtualcam            # from nothing: record, train, export, go live\n"
        "  python run_live.py --target avatars/me --sink virtualcam    # join a call as your avatar\n"
        "  python run_live.py --target avatars/me --source clip.mp4 --sink file:out.mp4 --max-frames 100\n",
        prog="run_live.py")
    p.add_argument("--record", metavar="DIR",
                   help="make the avatar in DIR first: a guided recording from the camera (trainer/record.py; skipped "
                        "when DIR/video.mp4 exists), then prepare, fit and export into DIR/avatar — each step skipped "
                        "when its output is current — then go live with it. --target DIR on a folder holding only a "
                        "recording does the same")
    p.add_argument("--make-preset", choices=["cpu", "smoke"], default="cpu",
                   help="with --record: cpu (default; ~15 minutes on a 2-core CPU) or smoke (a one-minute check)")
    p.add_argument("--demo", action="store_true", help="the bundled demo avatar driven by the bundled clip "
                                                       "(implies --source demo clip --loop, --sink webrtc)")
    preset = LiveConfig.preset
    others = {k: ", ".join(f"{p} {format_default(v[k])}" for p, v in PRESETS.items() if p != preset)
              for k in PRESETS[preset]}
    add_config_arguments(p, LiveConfig, shown=replace(LiveConfig(), **PRESETS[preset]),
                         notes={k: f"with --live-preset {preset}; {text}" for k, text in others.items()})
    return p


DEMO_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo"


def config_from_args(args: argparse.Namespace) -> LiveConfig:
    preset = args.preset or LiveConfig.preset
    cfg = replace(LiveConfig(), **PRESETS[preset], preset=preset)
    if args.demo:
        if not (DEMO_DIR / "avatar" / "avatar.json").is_file():
            raise UserError(f"the demo avatar is missing from {DEMO_DIR}; rebuild it with: python trainer/make_demo.py")
        cfg = replace(cfg, target=str(DEMO_DIR / "avatar"), source=str(DEMO_DIR / "driver.mp4"), loop=True)
    elif not (args.target or args.record):
        raise UserError("give --target AVATAR_BUNDLE, --record DIR (or --demo)")
    elif args.target and args.record:
        raise UserError("give --target or --record, not both")
    else:
        cfg.target = args.target or args.record
    cfg = config_from_namespace(LiveConfig, args, base=cfg, target=cfg.target)  # the options given win
    if not 32 <= cfg.size <= 2048 or cfg.size % 2:
        raise UserError(f"--render-size {cfg.size}: choose an even size from 32 to 2048")
    if cfg.output is not None:
        from avatar.capture.video import parse_frame_size

        parse_frame_size(cfg.output, "--output")
    if cfg.background and cfg.background != "blur" and not Path(cfg.background).is_file():
        raise UserError(f"--backdrop {cfg.background}: no such image (or say 'blur')")
    if not 0 <= cfg.gain <= 3:
        raise UserError("--gain must be within 0–3")
    if cfg.every_frame and (cfg.source.isdigit() or cfg.source.startswith("/dev/video")):
        raise UserError("--every-frame is for a video file; a camera is always live")
    if not 0 <= cfg.smoothing <= 10:
        raise UserError("--smoothing must be within 0–10")
    if not cfg.sinks:
        cfg.sinks = ["webrtc"]
    for spec in cfg.sinks:  # before anything opens a camera or a port
        if spec not in ("virtualcam", "webrtc", "window") and not spec.startswith("file:"):
            raise UserError(f"unknown sink {spec!r}: use virtualcam, webrtc, window or file:PATH.mp4")
    return cfg


def make_sinks(cfg: LiveConfig, controls, status, width: int, height: int) -> list:
    from streamer.sinks import FileSink, VirtualCameraSink, WindowSink

    sinks = []
    try:
        for spec in cfg.sinks:
            if spec.startswith("file:"):
                sinks.append(FileSink(spec[5:], width, height, cfg.fps or 25.0))
            elif spec == "virtualcam":
                sinks.append(VirtualCameraSink(width, height, cfg.fps or 30.0))
            elif spec == "window":
                sinks.append(WindowSink(controls))
            elif spec == "webrtc":
                from streamer.webrtc import WebRTCSink

                sinks.append(WebRTCSink(controls, cfg.host, cfg.port, cfg.token, cfg.max_viewers, status))
            else:
                raise UserError(f"unknown sink {spec!r}: use virtualcam, webrtc, window or file:PATH.mp4")
    except BaseException:
        close_sinks(sinks, failed=True)
        raise
    return sinks


def close_sinks(sinks: list, failed: bool = False) -> None:
    for sink in sinks:
        try:
            if failed and hasattr(sink, "abort"):
                sink.abort()
            else:
                sink.close()
        except Exception as exc:  # one broken sink must not keep the others (or the file) from closing
            print(f"warning: closing {sink.name} failed: {exc}", file=sys.stderr)


@dataclass
class LiveRun:
    """One live session's parts and running figures, shared by the stages of :func:`run`: the bundle, its
    compositor and engine (opened by :func:`open_target`), the source, tracker, sinks and pipeline (opened by
    :func:`open_live`), and what the loop records per frame. Kept in one object so each stage is a small
    function and the ``finally`` of :func:`run` can close whatever was opened."""

    cfg: LiveConfig
    log: Callable[[str], None]
    loaded: Any
    compositor: Any
    engine: Any
    overlap: bool
    controls: Any
    latest: dict = field(default_factory=dict)  # what the WebRTC page's status shows
    sinks: list = field(default_factory=list)
    source: Any = None
    tracker: Any = None
    pipeline: Any = None
    records: list[dict] = field(default_factory=list)  # per delivered frame: latency and stage timings
    conditioning: list[dict] = field(default_factory=list)  # per frame: what drove the avatar (--conditioning-log)
    started: float = 0.0
    last_status: float = 0.0
    waiting_since: float | None = None

    @property
    def layout(self):
        """The output frame's layout (size, where the head box sits)."""
        return self.compositor.layout


def run(cfg: LiveConfig, log=print) -> dict:
    """Run the live loop until the source ends, Ctrl-C / SIGTERM, a quit from a sink or --max-frames; write
    --stats and --conditioning-log. Returns the stats."""
    live = open_target(cfg, log)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        open_live(live)
        live_loop(live, stop)
    finally:
        close_live(live, old_handlers)
    return finish(live)


def open_target(cfg: LiveConfig, log) -> LiveRun:
    """Load the bundle (a fast field only), the output background and compositor, and open and warm up the
    engine on its device."""
    from avatar.base.devices import pick_device, prepare_device
    from avatar.bundle.bundle import load_bundle
    from avatar.engines.choice import open_engine
    from streamer.pipeline import Controls, make_compositor, render_cap

    device = pick_device(cfg.device)
    prepare_device(device)
    overlap = cfg.overlap == "on" or (cfg.overlap == "auto" and device.type != "cpu")
    loaded = load_bundle(cfg.target)  # on the CPU: the engine takes its own copy onto its device
    if loaded.model.field_name != "fast":
        raise UserError(f"{cfg.target} holds a {loaded.model.field_name!r} field, far too slow to run live; "
                        "train a fast one: python trainer/fit.py --field fast …")
    background = cfg.background
    if background and background != "blur":
        from avatar.data.reader import read_rgb

        background = read_rgb(background)
    output = None
    if cfg.output:
        from avatar.capture.video import parse_frame_size

        output = parse_frame_size(cfg.output, "--output")
    compositor = make_compositor(loaded, output, cfg.size, background)
    layout = compositor.layout
    engine = open_engine(loaded, cfg.target, cfg.engine, device)  # why a faster engine is not used: on stderr
    seconds = engine.warm_up(render_cap(cfg.size, layout))  # graph capture / compiling now, not on the first live frame
    if seconds > 1.0:
        log(f"engine warmed up in {seconds:.1f} s")
    controls = Controls(pose_lock=cfg.pose_lock, gain=cfg.gain)
    return LiveRun(cfg, log, loaded, compositor, engine, overlap, controls)


def open_live(live: LiveRun) -> None:
    """Open the source (with tracking on its own thread when overlapping), the tracker, the sinks and the
    pipeline, say where the output goes, and start the source."""
    from avatar.capture.sources import TrackingStage, open_source
    from avatar.capture.tracking import FaceTracker
    from streamer.pipeline import LivePipeline, RetargetConfig

    cfg, log, loaded, layout = live.cfg, live.log, live.loaded, live.layout
    live.source = open_source(cfg.source, cfg.loop, cfg.every_frame)
    live.tracker = FaceTracker("video", cfg.landmarker)
    if live.overlap:
        live.source = TrackingStage(live.source, live.tracker, cfg.every_frame)
    live.sinks = make_sinks(cfg, live.controls, lambda: live.latest, layout.width, layout.height)
    for s in live.sinks:
        if s.name == "webrtc":
            log(f"WebRTC: open {s.url}")
        if s.name == "virtualcam":
            log(f"virtual camera: {s.device}")
    live.pipeline = LivePipeline(loaded, live.engine, live.tracker, cfg.size, cfg.fps,
                                 RetargetConfig(mode=cfg.mode, components=cfg.components, smoothing=cfg.smoothing),
                                 live.controls, live.compositor,
                                 latent_index=min(cfg.latent, loaded.model.latents.shape[0] - 1))
    framing = "full frame" if loaded.full_frame is not None else "square crop (a bundle without a full frame)"
    log(f"live: {live.engine.name} engine, {layout.width}x{layout.height} output ({framing}), head rendered at up to "
        f"{live.pipeline.size}² at up to {cfg.fps or '∞'} fps, sinks "
        f"{', '.join(s.name for s in live.sinks)}; Ctrl-C to stop")
    live.source.start()


def live_loop(live: LiveRun, stop: threading.Event) -> None:
    """Newest frame → pipeline → sinks until ``stop``, a quit, the source's end or --max-frames."""
    cfg = live.cfg
    live.started = time.monotonic()
    live.last_status = 0.0
    live.waiting_since = None
    while not stop.is_set() and not live.controls.quit:
        frame = live.source.latest(timeout=0.25)
        if frame is None:
            if source_ended(live):
                break
            continue
        live.waiting_since = None
        out = live.pipeline.step(frame.rgb, frame.media_time,
                                 (frame.observation, frame.track_seconds) if frame.tracked else None)
        rec, done = deliver(live, frame, out)
        note_frame(live, frame, out, rec, done)
        if cfg.max_frames and len(live.records) >= cfg.max_frames:
            break


def source_ended(live: LiveRun) -> bool:
    """No frame came: raise on a source error, True when the source ended, else a waiting status line (at most
    one a second)."""
    cfg, source = live.cfg, live.source
    if source.error:
        raise UserError(f"source {cfg.source}: {source.error}")
    if source.ended:
        live.log("source ended")
        return True
    live.waiting_since = live.waiting_since or time.monotonic()
    if not cfg.quiet and time.monotonic() - live.last_status > 1.0:
        what = "camera lost, reconnecting" if getattr(source, "lost", False) else "waiting for frames"
        _status(f"{what} ({time.monotonic() - live.waiting_since:.0f} s)")
        live.last_status = time.monotonic()
    return False


def deliver(live: LiveRun, frame, out) -> tuple[dict, float]:
    """Send the composited frame ``out.rgb [H, W, 3] uint8`` to every sink; returns the frame's record (latency
    from capture to the sinks, delivery and stage timings, render size) and the clock when it was delivered."""
    t_deliver = time.monotonic()
    for sink in live.sinks:
        if sink.name == "webrtc":
            sink.send(out.rgb, frame.captured)
        else:
            sink.send(out.rgb)
    done = time.monotonic()
    rec = {"capture_to_sink_ms": (done - frame.captured) * 1000, "deliver_ms": (done - t_deliver) * 1000,
           **{f"{k}_ms": v * 1000 for k, v in out.timings.items()}, "render_size": out.render_size,
           "upsampled": out.upsampled, "source_index": frame.index, "t": done - live.started}
    return rec, done


def note_frame(live: LiveRun, frame, out, rec: dict, done: float) -> None:
    """Keep the frame's record (and its conditioning with --conditioning-log), update the status the sinks
    show, and print the status line (at most two a second)."""
    cfg, records = live.cfg, live.records
    records.append(rec)
    if cfg.conditioning_log:
        live.conditioning.append({"expression": out.expression.tolist(), "head_pose": out.head_pose.tolist(),
                                  "render_size": out.render_size, "upsampled": out.upsampled, "latent": cfg.latent,
                                  "source_index": frame.index, "state": out.state})
    fps = _recent_fps(records)
    live.latest.update(state=out.state, render_size=out.render_size, fps=round(fps, 1),
                       latency_ms=round(rec["capture_to_sink_ms"], 1), frames=len(records))
    if not cfg.quiet and done - live.last_status > 0.5:
        _status(f"{len(records)} frames  {fps:5.1f} fps  latency {rec['capture_to_sink_ms']:5.0f} ms  "
                f"track {rec['track_ms']:4.0f}  render {rec['render_ms']:4.0f} ms @ {out.render_size}²"
                f"{' (upsampled)' if out.upsampled else ''}  "
                f"{out.state}")
        live.last_status = done


def close_live(live: LiveRun, old_handlers: dict) -> None:
    """Close the sinks, source and tracker (whichever were opened) and restore the signal handlers."""
    close_sinks(live.sinks)
    if live.source is not None:
        live.source.close()
    if live.tracker is not None:
        live.tracker.close()
    for s, h in old_handlers.items():
        signal.signal(s, h)
    if not live.cfg.quiet and sys.stderr.isatty():
        print(file=sys.stderr)


def finish(live: LiveRun) -> dict:
    """The session's stats; --stats and --conditioning-log written; the closing line logged."""
    cfg, layout, engine, source = live.cfg, live.layout, live.engine, live.source
    stats = summarize(live.records, source.frames_read if source else 0)
    if cfg.stats:
        from avatar.base.fileio import write_json_atomic

        write_json_atomic(cfg.stats, {**stats, "config": asdict(cfg), "engine": engine.name,
                                      "output": [layout.width, layout.height], "render_size_max": live.pipeline.size})
    if cfg.conditioning_log:
        from avatar.base.fileio import write_json_atomic

        write_json_atomic(cfg.conditioning_log, {"frames": live.conditioning, "size": live.pipeline.size,
                                                 "engine": engine.name, "output": [layout.width, layout.height]})
    live.log(f"{stats['frames']} frames, {stats['fps']:.1f} fps, capture-to-sink latency median "
             f"{stats['latency_ms_median']:.0f} ms (p95 {stats['latency_ms_p95']:.0f}), {stats['dropped_frames']} "
             "source frames dropped (newest frame wins)")
    return stats


def _recent_fps(records: list[dict], window: int = 30) -> float:
    if len(records) < 2:
        return 0.0
    recent = records[-window:]
    span = recent[-1]["t"] - recent[0]["t"]
    return (len(recent) - 1) / span if span > 0 else 0.0


def summarize(records: list[dict], frames_read: int) -> dict:
    if not records:
        return {"frames": 0, "fps": 0.0, "latency_ms_median": 0.0, "latency_ms_p95": 0.0, "dropped_frames": frames_read,
                "stages_ms_median": {}}
    lat = np.array([r["capture_to_sink_ms"] for r in records])
    span = records[-1]["t"] - records[0]["t"]
    stages = {k[:-3]: round(float(np.median([r[k] for r in records])), 2)
              for k in records[0] if k.endswith("_ms") and k != "capture_to_sink_ms"}
    return {"frames": len(records), "fps": round((len(records) - 1) / span, 2) if span > 0 else 0.0,
            "latency_ms_median": round(float(np.median(lat)), 1), "latency_ms_p95": round(float(np.percentile(lat, 95)), 1),
            "dropped_frames": max(0, frames_read - len(records)), "stages_ms_median": stages,
            "render_size_median": int(np.median([r["render_size"] for r in records])),
            # the head's size as shown; this share of frames was rendered at 1/factor and learned-upsampled to it
            "upsampled_share": round(float(np.mean([bool(r.get("upsampled")) for r in records])), 3)}


def _status(text: str) -> None:
    if sys.stderr.isatty():
        print("\r" + text[:150].ljust(150), end="", file=sys.stderr, flush=True)
    else:
        print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    from streamer.workflow import is_recording_folder, make_avatar

    if args.record or is_recording_folder(cfg.target):
        if args.record and Path(args.record).is_file():
            raise UserError(f"--record {args.record}: give a folder (it will hold video.mp4, the dataset and the "
                            "avatar)")
        cfg = replace(cfg, target=str(make_avatar(cfg.target, cfg.source, args.make_preset)))
    run(cfg)
    return 0


def cli() -> None:
    """The ``nerface-live`` console script (``python run_live.py`` runs the same)."""
    run_cli(main)
