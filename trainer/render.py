"""Render an avatar to a video: novel head poses, expression edits, reenactment from another video.

    python trainer/render.py BUNDLE --out out.mp4 [--frames 60] [--yaw=-25:25] [--pitch=-10:10]
                             [--set jawOpen=+0.4 --set mouthSmileLeft=0.8] [--drive OTHER_VIDEO]
                             [--normals] [--mask] [--render-size N]

Starts from the avatar's neutral expression and reference head pose. --yaw/--pitch sweep the head
(degrees, START:END over the clip); --set edits blendshapes (`=+v` relative to neutral, `=v` absolute),
ramped in over the clip; --drive takes another video's tracked expressions and head motion relative to its
first frame (reenactment). --normals and --mask add panels beside the colour.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from avatar.base.cli import add_config_arguments, arg, command_parser, config_from_namespace
from avatar.base.devices import DEVICE_HELP, pick_device, prepare_device
from avatar.base.errors import UserError, run_cli
from avatar.bundle.bundle import LoadedAvatar, load_bundle
from avatar.capture.retarget import relative_expression, relative_pose, rotate_about
from avatar.capture.video import VideoWriter
from avatar.field.model import normals_from_depth, render_image


def parse_range(text: str | None, name: str) -> tuple[float, float]:
    if text is None:
        return 0.0, 0.0
    try:
        parts = [float(v) for v in text.split(":")]
    except ValueError:
        raise UserError(f"--{name} wants START:END in degrees (e.g. -25:25), got {text!r}") from None
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def parse_edits(items: list[str], names: list[str], neutral: np.ndarray) -> np.ndarray:
    """``--set name=+v`` / ``name=v`` → the edited expression ``[e]`` (relative edits add to neutral)."""
    target = neutral.copy()
    for item in items:
        if "=" not in item:
            raise UserError(f"--set wants NAME=VALUE or NAME=+DELTA, got {item!r}")
        name, value = item.split("=", 1)
        if name not in names:
            raise UserError(f"unknown blendshape {name!r}; known: {', '.join(n for n in names if not n.startswith('_'))}")
        try:
            v = float(value)
        except ValueError:
            raise UserError(f"--set {item!r}: {value!r} is not a number") from None
        k = names.index(name)
        target[k] = neutral[k] + v if value.strip().startswith(("+", "-")) else v
    return np.clip(target, 0.0, 1.0)


def conditioning(loaded: LoadedAvatar, cfg: RenderConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """(head pose, expression) per output frame."""
    meta = loaded.meta
    stats = meta["expression_stats"]
    neutral = np.asarray(stats["neutral"], np.float32)
    reference = np.asarray(meta["reference_head_pose"])
    pivot = (np.asarray(meta["head_bounds"]["min"]) + np.asarray(meta["head_bounds"]["max"])) / 2
    if cfg.drive:
        from avatar.data.prepare import track_video

        track = track_video(cfg.drive, cfg.landmarker)
        out = []
        for pose, expr in zip(track.poses, track.expressions):
            out.append((relative_pose(pose, track.poses[0], reference),
                        relative_expression(expr, track.expressions[0], neutral, np.asarray(stats["min"]),
                                            np.asarray(stats["max"]))))
        return out[: cfg.frames] if cfg.frames else out
    n = cfg.frames or 60
    yaw0, yaw1 = parse_range(cfg.yaw, "yaw")
    pitch0, pitch1 = parse_range(cfg.pitch, "pitch")
    edited = parse_edits(cfg.set or [], meta["expression_names"], neutral)
    out = []
    for s in np.linspace(0.0, 1.0, n):
        pose = rotate_about(reference, pivot, yaw0 + s * (yaw1 - yaw0), pitch0 + s * (pitch1 - pitch0))
        out.append((pose, (neutral + s * (edited - neutral)).astype(np.float32)))
    return out


@dataclass
class RenderConfig:
    bundle: str = arg(help="avatar bundle directory", positional=True)
    out: str = arg(help="output video (.mp4)")
    frames: int = arg(0, help="number of frames (0: 60, or with --drive: all of the video's)")
    fps: float = arg(25.0, help="frame rate of the output video")
    yaw: str | None = arg(None, metavar="START:END", help="head yaw sweep in degrees, written --yaw=-25:25 (one "
                                                          "number: a fixed turn)")
    pitch: str | None = arg(None, metavar="START:END", help="head pitch sweep in degrees")
    set: list[str] | None = arg(None, metavar="NAME=VALUE",
                                help="blendshape edit, e.g. jawOpen=+0.4 (relative) or jawOpen=0.8 (repeatable)")
    drive: str | None = arg(None, help="reenact: drive the avatar with another video's face")
    latent: int = arg(0, help="which training frame's latent code (0 is the paper's)")
    normals: bool = arg(False, help="add a normals-from-depth panel")
    mask: bool = arg(False, help="add a foreground-mask panel")
    render_size: int | None = arg(None, deprecated=("--size",), help="output height in pixels (default: the avatar's)")
    device: str = arg("auto", help=DEVICE_HELP)
    landmarker: str | None = arg(None, help="face_landmarker.task for --drive (default: found automatically)")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(__doc__)
    add_config_arguments(p, RenderConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_namespace(RenderConfig, build_parser().parse_args(argv))

    device = pick_device(cfg.device)
    prepare_device(device)
    loaded = load_bundle(cfg.bundle, device)
    if not 0 <= cfg.latent < loaded.meta["num_latents"]:
        raise UserError(f"--latent must be in [0, {loaded.meta['num_latents'] - 1}]")
    w, h = loaded.image_size
    scale = (cfg.render_size / h) if cfg.render_size else 1.0
    rw, rh = int(round(w * scale)) // 2 * 2, int(round(h * scale)) // 2 * 2
    k = loaded.intrinsics * scale
    background = loaded.background
    if (rw, rh) != (w, h):
        background = torch.nn.functional.interpolate(background.permute(2, 0, 1)[None], size=(rh, rw), mode="bilinear",
                                                     align_corners=False)[0].permute(1, 2, 0)
    frames = conditioning(loaded, cfg)
    panels = 1 + cfg.normals + cfg.mask
    latent = loaded.latent(cfg.latent)
    with VideoWriter(cfg.out, rw * panels, rh, cfg.fps) as writer:
        for pose, expr in tqdm(frames, desc="rendering", unit="frame", disable=None):
            out = render_image(loaded.model, pose, expr, latent, k, rw, rh, background, loaded.sampling)
            images = [out["rgb"].cpu().numpy()]
            alpha = out["alpha"].cpu().numpy()[..., None]
            if cfg.normals:
                images.append((normals_from_depth(out["depth"].cpu(), k).numpy() * 0.5 + 0.5) * alpha)
            if cfg.mask:
                images.append(np.repeat(alpha, 3, -1))
            writer.write(np.clip(np.concatenate(images, 1) * 255 + 0.5, 0, 255).astype(np.uint8))
    print(f"wrote {len(frames)} frames to {cfg.out}")
    return 0


def cli() -> None:
    """The ``nerface-render`` console script."""
    run_cli(main)


if __name__ == "__main__":
    cli()
