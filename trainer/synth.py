"""Render the synthetic talking head: a real face photo as a textured 3-D head that talks, smiles, blinks
and turns over a static room, with its true poses and expressions and frames at novel head poses.

    python trainer/synth.py --out S [--photo IMAGE] [--frames 300] [--frame 640x480 | --size 256] [--seed 0]

By default (or --frame WxH) a camera-shaped picture with the head and shoulders in it, as a webcam sees a
person (the demo's recording: 640×480); --size N renders square head crops instead (what tests use).

Writes S/video.mp4, S/background.png, S/truth.json, S/novel/*.png (+ novel/truth.json) and S/preview.png.
truth.json holds per frame the true head pose and expression values, and under "performance" the segments of
the schedule (rest / one channel alone / a combination, with their frames).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from avatar.base.cli import add_config_arguments, arg, command_parser, config_from_namespace
from avatar.base.errors import UserError, run_cli
from avatar.base.fileio import atomic_directory, write_json_atomic
from avatar.capture.tracking import FaceTracker, load_canonical_face
from avatar.capture.video import VideoWriter, parse_frame_size
from avatar.data import synth
from avatar.data.reader import read_rgb

DEFAULT_FRAME = "640x480"  # the command line's default: a webcam's 4:3 view of a person


@dataclass
class SynthConfig:
    out: str = arg(help="output directory (must not exist unless --overwrite)")
    photo: str | None = arg(None, help="portrait photo to animate (default: scikit-image's astronaut)")
    frames: int = arg(300, help="number of video frames")
    size: int = arg(256, help="square head-crop frames of this side instead of camera-shaped ones (e.g. 256)")
    frame: str | None = arg(None, metavar="WxH", help="camera-shaped frames of WIDTHxHEIGHT (e.g. 640x480)")
    fps: float = arg(25.0, help="frame rate of the video")
    seed: int = arg(0, help="seed of the performance")
    novel: int = arg(24, help="frames at head poses the video never shows")
    landmarker: str | None = arg(None, help="path to face_landmarker.task (default: found automatically)")
    overwrite: bool = arg(False, help="replace an existing output directory")


def load_photo(path: str | None) -> np.ndarray:
    if path is None:
        import skimage.data

        return skimage.data.astronaut()
    if not Path(path).is_file():
        raise UserError(f"{path}: no such file")
    return read_rgb(path)


def _save_png(path: Path, rgb: np.ndarray) -> None:
    cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]))


def frame_shape(cfg: SynthConfig) -> tuple[int, int]:
    """(width, height) of the subject's frames."""
    if cfg.frame:
        return parse_frame_size(cfg.frame, "--frame")
    if cfg.size < 32 or cfg.size % 2:
        raise UserError("--size must be an even number ≥ 32")
    return cfg.size, cfg.size


def make_subject(cfg: SynthConfig) -> dict:
    """Render the whole subject into ``cfg.out`` (atomically); returns a summary."""
    if cfg.frames < 2:
        raise UserError("--frames must be ≥ 2")
    width, height = frame_shape(cfg)
    start = time.perf_counter()
    photo = load_photo(cfg.photo)
    with FaceTracker("image", cfg.landmarker) as tracker:
        obs = tracker.track(photo)
    if obs is None:
        raise UserError(f"no face found in {cfg.photo or 'the astronaut photo'}")
    head = synth.build_head(photo, obs, load_canonical_face(cfg.landmarker), width, height)
    motion = synth.make_motion(cfg.frames, cfg.fps, cfg.seed)

    with atomic_directory(cfg.out, cfg.overwrite) as tmp:
        frames_meta = []
        preview = []
        with VideoWriter(tmp / "video.mp4", width, height, cfg.fps) as writer:
            for i in tqdm(range(cfg.frames), desc="rendering", unit="frame", leave=False,
                                  disable=None):
                pose = synth.head_pose(head, *motion.angles_deg[i], motion.translation_cm[i])
                frame = synth.render(head, pose, motion.expression[i])
                writer.write(frame)
                if i % max(1, cfg.frames // 8) == 0 and len(preview) < 8:
                    preview.append(frame)
                frames_meta.append({
                    "index": i,
                    "time": i / cfg.fps,
                    "head_pose": pose,
                    "yaw_pitch_roll_deg": motion.angles_deg[i],
                    "translation_cm": motion.translation_cm[i],
                    "expression": motion.expression[i],
                })
        _save_png(tmp / "background.png", head.background)
        common = {
            "intrinsics": head.intrinsics,
            "image_size": [width, height],
            "expression_names": list(synth.EXPRESSION_NAMES),
            "camera_convention": "opengl: head_pose maps canonical face space (cm) to camera; camera looks down -z",
        }
        performance = [asdict(seg) for seg in motion.segments]  # which channels act alone / together, when
        write_json_atomic(tmp / "truth.json", {**common, "fps": cfg.fps, "config": asdict(cfg),
                                               "base_pose": head.base_pose, "performance": performance,
                                               "frames": frames_meta})

        novel_dir = tmp / "novel"
        novel_dir.mkdir()
        angles = synth.novel_poses(motion, cfg.novel, cfg.seed)
        sources = np.linspace(0, cfg.frames - 1, len(angles)).astype(int)
        novel_meta = []
        for j, (ang, src) in enumerate(zip(angles, sources)):
            pose = synth.head_pose(head, *ang, motion.translation_cm[src])
            _save_png(novel_dir / f"{j:05d}.png", synth.render(head, pose, motion.expression[src]))
            novel_meta.append({"file_path": f"{j:05d}.png", "source_frame": int(src), "head_pose": pose,
                               "yaw_pitch_roll_deg": ang, "expression": motion.expression[src]})
        write_json_atomic(novel_dir / "truth.json", {**common, "frames": novel_meta})
        if preview:
            rows = [np.concatenate(preview[k:k + 4] + [np.zeros_like(preview[0])] * (4 - len(preview[k:k + 4])), 1)
                    for k in range(0, len(preview), 4)]
            _save_png(tmp / "preview.png", np.concatenate(rows, 0))
    return {"frames": cfg.frames, "novel": len(angles), "seconds": time.perf_counter() - start, "out": cfg.out}


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(__doc__)
    add_config_arguments(p, SynthConfig, skip=("frame", "size"))
    # The command line's default is the camera-shaped frame (a Python caller's, SynthConfig's, the square one).
    add_config_arguments(p.add_mutually_exclusive_group(), SynthConfig, only=("frame", "size"),
                         shown=SynthConfig(out="", size=None, frame=DEFAULT_FRAME))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    frame = None if args.size is not None else args.frame or DEFAULT_FRAME
    cfg = config_from_namespace(SynthConfig, args, frame=frame)
    summary = make_subject(cfg)
    print(f"wrote {summary['frames']} frames + {summary['novel']} novel-pose frames to {summary['out']} "
          f"in {summary['seconds']:.1f} s")
    return 0


def cli() -> None:
    """The ``nerface-synth`` console script."""
    run_cli(main)


if __name__ == "__main__":
    cli()
