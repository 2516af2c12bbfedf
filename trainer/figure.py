"""The README's overview picture: input frame → tracked expression → avatar → novel head pose → expression edit.

    python trainer/figure.py --target assets/demo/avatar --source assets/demo/driver.mp4 --out docs/overview.jpg

Tracks one frame of the source video with MediaPipe (its first frame is taken as the source's neutral),
retargets it onto the avatar the way the live loop does, and renders the avatar as driven, turned by
--yaw degrees, and with --set edits (e.g. jawOpen=+0.5).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from avatar.base.cli import add_config_arguments, arg, command_parser, config_from_namespace
from avatar.base.errors import UserError, run_cli


def bars(names: list[str], values: np.ndarray, size: int, top: int = 8) -> np.ndarray:
    """The strongest ``top`` blendshape scores as a labelled bar chart, RGB ``[size, size, 3]``."""
    img = np.full((size, size, 3), 245, np.uint8)
    order = np.argsort(-values)[:top]
    row = size // (top + 1)
    scale = size / 512
    for k, j in enumerate(order):
        y = row // 2 + k * row + row // 2
        w = int(values[j] * (size * 0.45))
        cv2.rectangle(img, (int(size * 0.52), y - row // 3), (int(size * 0.52) + w, y + row // 3), (70, 130, 200), -1)
        cv2.putText(img, names[j][:16], (4, y + int(6 * scale)), cv2.FONT_HERSHEY_SIMPLEX, 0.75 * scale, (30, 30, 30),
                    max(1, int(2 * scale)), cv2.LINE_AA)
    return img


def label(img: np.ndarray, text: str) -> np.ndarray:
    out = np.full((img.shape[0] + 30, img.shape[1], 3), 255, np.uint8)
    out[30:] = img
    cv2.putText(out, text, (6, 21), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (20, 20, 20), 1, cv2.LINE_AA)
    return out


@dataclass
class FigureConfig:
    target: str = arg(help="avatar bundle (fast field)")
    source: str = arg(help="video whose face drives the avatar")
    frame_index: int = arg(170, deprecated=("--frame",),
                           help="which frame of the source to show (the default is one whose head motion the demo "
                                "avatar was trained on)")
    out: str = arg("docs/overview.jpg", help="the picture to write (JPEG)")
    render_size: int = arg(256, deprecated=("--size",), help="side of each square panel in pixels")
    yaw: float = arg(15.0, help="head turn for the novel-pose panel (degrees)")
    set: list[str] | None = arg(None, metavar="NAME=VALUE", help="expression edit for the last panel, e.g. "
                                "jawOpen=+0.5 (repeatable; default: jaw +0.5 and both smiles +0.4)")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(__doc__)
    add_config_arguments(p, FigureConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_namespace(FigureConfig, build_parser().parse_args(argv))

    from avatar.bundle.bundle import load_bundle
    from avatar.capture.retarget import clamp_pose, relative_expression, relative_pose, rotate_about
    from avatar.capture.tracking import FaceTracker
    from avatar.capture.video import iter_frames
    from avatar.engines.torch_engine import TorchEngine
    from trainer.render import parse_edits

    loaded = load_bundle(cfg.target)
    engine = TorchEngine(loaded)
    meta, stats = loaded.meta, loaded.meta["expression_stats"]
    first = frame = None
    for i, rgb in enumerate(iter_frames(cfg.source)):
        first = rgb if first is None else first
        if i == cfg.frame_index:
            frame = rgb
            break
    if frame is None:
        raise UserError(f"{cfg.source} has fewer than {cfg.frame_index + 1} frames")
    with FaceTracker("image") as tracker:
        neutral_obs, obs = tracker.track(first), tracker.track(frame)
    if neutral_obs is None or obs is None:
        raise UserError(f"no face in frame 0 or {cfg.frame_index} of {cfg.source}")
    lo, hi = np.asarray(stats["min"]), np.asarray(stats["max"])
    expr = relative_expression(obs.blendshapes, neutral_obs.blendshapes, np.asarray(stats["neutral"]), lo, hi)
    reference = np.asarray(meta["reference_head_pose"])
    # Clamped to the trained head motion, as the live loop does (a pose the video never held renders holes).
    pose = clamp_pose(relative_pose(obs.head_pose, neutral_obs.head_pose, reference), reference, meta.get("pose_range"))
    bounds = meta["head_bounds"]
    centre = (np.asarray(bounds["min"]) + np.asarray(bounds["max"])) / 2
    edited = np.clip(parse_edits(cfg.set or ["jawOpen=+0.5", "mouthSmileLeft=+0.4", "mouthSmileRight=+0.4"],
                                 meta["expression_names"], expr), lo, hi)
    s = cfg.render_size
    full = loaded.full_frame
    if full is not None and tuple(full["source_size"]) == (frame.shape[1], frame.shape[0]):
        x0, y0, side = full["crop"]  # the driver has the recording's framing: show the same head crop
        frame = frame[y0:y0 + side, x0:x0 + side]
    else:  # the middle square of another framing
        h, w = frame.shape[:2]
        frame = frame[(h - min(h, w)) // 2:(h + min(h, w)) // 2, (w - min(h, w)) // 2:(w + min(h, w)) // 2]
    render = lambda e, ps: (engine.render(e, ps, loaded.latent(0), s)["rgb"].numpy() * 255).round().astype(np.uint8)
    panels = [
        label(cv2.resize(frame, (s, s), interpolation=cv2.INTER_AREA), "input frame (MediaPipe)"),
        label(bars(obs.names, obs.blendshapes, s), "tracked expression"),
        label(render(expr, pose), "avatar, reenacted"),
        label(render(expr, rotate_about(pose, centre, cfg.yaw)), f"novel pose (yaw {cfg.yaw:+.0f} deg)"),
        label(render(edited, pose), "expression edit (jaw, smile)"),
    ]
    sheet = np.concatenate([np.pad(pnl, ((0, 0), (0, 6), (0, 0)), constant_values=255) for pnl in panels], 1)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(cfg.out), sheet[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 88])
    print(f"wrote {cfg.out}")
    return 0


def cli() -> None:
    """The ``nerface-figure`` console script."""
    run_cli(main)


if __name__ == "__main__":
    cli()
