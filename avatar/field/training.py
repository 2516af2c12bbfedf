"""Training pieces shared by `trainer/fit.py`: config presets, ray batches, checkpoints (safetensors, atomic)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from avatar.base.errors import UserError
from avatar.base.fileio import read_safetensors, safetensors_bytes, write_bytes_atomic


@dataclass
class FitConfig:
    """Everything a training run depends on; written to ``config.json`` so any run can be repeated."""

    out: str = "avatars/me"
    data: str | None = None  # a prepared dataset directory …
    video: str | None = None  # … or a video to prepare first (into OUT/dataset)
    background: str = "auto"  # with --video: the empty-background image, or auto
    size: int = 512  # with --video: frame size of the prepared dataset
    field: str = "fast"  # the default: trains in minutes, renders live; "nerface" is the paper's MLP
    preset: str = "cpu"
    width: int = 256  # field backbone width (the paper: 256)
    depth: int = 8
    rays_per_step: int = 2048
    inside_fraction: float = 0.95  # share of rays drawn inside the (padded) head box
    region_fraction: float = 0.25  # share of rays drawn from the mouth and eye boxes (where the expression is)
    coarse_samples: int = 64
    fine_samples: int = 64
    lr: float = 5e-4
    lr_decay_steps: int = 250_000  # lr falls by 10× over this many steps (exponentially)
    latent_dim: int = 32
    latent_l2: float = 0.05
    # Per-frame head-pose corrections learned with the field (avatar/posefit.py): the tracker's poses are off by
    # ~2° in a way smoothing cannot remove, which cost 6 dB on held-out frames of the synthetic subject.
    pose_refine: bool = True
    pose_lr: float = 2e-3  # Adam on (rotation vector in rad, translation in posefit.TRANSLATION_UNIT_CM units)
    pose_warmup: int = 300  # steps before the corrections move: the field needs a rough head first
    pose_l2: float = 1e-4  # pulls corrections toward the tracker (and fixes the gauge: field vs all poses)
    # Steps during which every frame is rendered with the neutral expression: the poses then have to explain
    # how the rigid head moves before any expression basis can (prepare's pose tracking uses it).
    expression_warmup: int = 0
    # Held-out frames: the tracked pose refined against the frame by the trained avatar before scoring (pose only;
    # the tracked-pose score is kept beside it). 0 = score at the tracked poses only.
    eval_pose_steps: int = 40
    max_steps: int = 400_000
    checkpoint_every: int = 1000
    log_every: int = 10
    val_every: int = 5000
    eval_frames: int = 0  # test frames scored at the end (0 = all)
    chunk: int = 8192
    max_minutes: float = 0.0  # stop training after this much wall time (0 = no limit); for fair comparisons
    # fast field
    plane_resolution: int = 128
    plane_channels: int = 16
    expression_bases: int = 6  # with expression_map="learned": bases blended per frame
    # "fixed": one basis per expression group (jaw, smile, each blink, brows, pucker, funnel) driven by its own
    # scores, plus residual_bases for the rest, decorrelated from the groups (avatar/expressions.py);
    # "learned": a 52 → expression_bases linear map, initialised by PCA (entangles co-varying coefficients).
    expression_map: str = "fixed"
    residual_bases: int = 0  # measured: 4 (bounded) cost single-group control (jaw 0.52 vs 0.80) and AED
    expression_resolution: int = 0  # the expression bases' plane resolution (0 = plane_resolution)
    hidden: int = 64
    grid_lr: float = 1e-2
    # Empty space must be empty, not a faint fog the colour of the background: fog costs quality at new poses
    # and speed everywhere (rays march through it). Two regularisers: the opacity of random points in the head
    # box (L1, saturates on real surfaces) and the binary entropy of each ray's opacity (rays end on something
    # or see the background).
    # Total variation of the frame's blended planes (mean squared difference of neighbouring texels): keeps texels
    # that few rays see from turning into grain, which MediaPipe reads as texture, not as a face.
    plane_tv_weight: float = 1e-2
    expression_init_zero: bool = True
    sparsity_weight: float = 5e-2
    sparsity_points: int = 4096
    opacity_entropy_weight: float = 1e-2
    # mip-NeRF 360's distortion loss (per ray, in cm): gathers each ray's weight into few samples, so that a
    # renderer stops soon after it meets the head (docs/NOTES.md, session 7). 0 = off.
    distortion_weight: float = 0.0
    occupancy_resolution: int = 64
    occupancy_every: int = 16
    march_steps: int = 192  # marching steps across the head box diagonal (step = diagonal / march_steps)
    device: str = "auto"
    seed: int = 0
    landmarker: str | None = None


PRESETS: dict[str, dict] = {
    # The paper: 512², 2048 rays, 64 + 64 samples, 400k steps (about 2 days on a 2021 GPU).
    "paper": dict(size=512, width=256, rays_per_step=2048, coarse_samples=64, fine_samples=64, max_steps=400_000,
                  lr_decay_steps=250_000, checkpoint_every=5000, val_every=10_000),
    # Minutes on a laptop CPU: a narrower backbone, fewer rays and samples.
    "cpu": dict(size=128, width=128, rays_per_step=1024, coarse_samples=32, fine_samples=32, max_steps=1500,
                lr_decay_steps=3000, checkpoint_every=100, val_every=500),
    # A pipeline check in about a minute: learns the background/foreground split and a blurry head.
    "smoke": dict(size=64, width=128, rays_per_step=512, coarse_samples=24, fine_samples=24, max_steps=200,
                  lr_decay_steps=600, checkpoint_every=50, val_every=100, eval_frames=6, log_every=5, eval_pose_steps=10,
                  pose_warmup=50),
}


# The fast field's own settings per preset (on top of PRESETS): more rays (its samples are cheap), a
# faster learning rate for the feature planes, marching instead of coarse/fine sampling.
FAST_PRESETS: dict[str, dict] = {
    "paper": dict(rays_per_step=4096, max_steps=30_000, lr=2e-3, lr_decay_steps=30_000, plane_resolution=256,
                  plane_channels=12, expression_resolution=128, march_steps=384, checkpoint_every=2000, val_every=2000),
    "cpu": dict(rays_per_step=2048, max_steps=8000, lr=2e-3, lr_decay_steps=8000, plane_resolution=128,
                plane_channels=16, expression_resolution=64, march_steps=192, checkpoint_every=250, val_every=1000),
    "smoke": dict(rays_per_step=1024, max_steps=300, lr=2e-3, lr_decay_steps=600, plane_resolution=64,
                  plane_channels=8, march_steps=96, checkpoint_every=50, val_every=150),
}


def config_with_preset(preset: str, field: str = "fast", **overrides) -> FitConfig:
    """Defaults, then the preset (and its field-specific part), then explicit overrides (None = not given)."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = replace(FitConfig(), **PRESETS[preset], preset=preset, field=field)
    if field == "fast":
        cfg = replace(cfg, **FAST_PRESETS[preset])
    names = {f.name for f in fields(FitConfig)}
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None and k in names})


def padded_box(bbox: np.ndarray, width: int, height: int) -> np.ndarray:
    """The face box grown to hold hair, ears and chin: ``[x0, y0, x1, y1]`` clipped to the image."""
    x0, y0, x1, y1 = bbox
    w, h = x1 - x0, y1 - y0
    return np.array([max(0, x0 - 0.3 * w), max(0, y0 - 0.5 * h), min(width, x1 + 0.3 * w), min(height, y1 + 0.2 * h)])


def _in_box(rng: np.random.Generator, count: int, box: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.stack([rng.integers(int(x0), max(int(x0) + 1, int(np.ceil(x1))), count),
                     rng.integers(int(y0), max(int(y0) + 1, int(np.ceil(y1))), count)], 1)


def sample_pixels(rng: np.random.Generator, count: int, box: np.ndarray, width: int, height: int,
                  inside_fraction: float, regions: np.ndarray | None = None, region_fraction: float = 0.0) -> np.ndarray:
    """``[count, 2]`` integer pixels: ``region_fraction`` of them in the ``regions`` boxes ``[r, 4]`` (mouth,
    eyes: a few hundred pixels that carry most of the expression, split evenly), ``inside_fraction`` of the rest
    uniformly in ``box``, the remainder anywhere."""
    n_reg = int(round(count * region_fraction)) if regions is not None and len(regions) else 0
    n_in = int(round((count - n_reg) * inside_fraction))
    parts = [_in_box(rng, n_in, box)]
    if n_reg:
        which = rng.integers(0, len(regions), n_reg)
        parts += [_in_box(rng, int((which == r).sum()), regions[r]) for r in range(len(regions))]
    n_any = count - sum(len(p) for p in parts)
    parts.append(np.stack([rng.integers(0, width, n_any), rng.integers(0, height, n_any)], 1))
    return np.clip(np.concatenate(parts), 0, [width - 1, height - 1])


def learning_rate(cfg: FitConfig, step: int, time_fraction: float = 0.0) -> float:
    """Exponential decay, 10× over ``lr_decay_steps`` — or over the ``--max-minutes`` budget when that comes
    first (``time_fraction`` = share of it spent), so a timed run ends its schedule whatever the machine's speed."""
    return cfg.lr * (0.1 ** max(step / max(1, cfg.lr_decay_steps), min(time_fraction, 1.0)))


CHECKPOINT_FILE = "checkpoint.safetensors"


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    cfg: FitConfig, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Model + Adam state + step (+ ``extra`` trainer tensors) in one safetensors file, written atomically (no pickles)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    meta = {"step": str(step), "config": json.dumps(asdict(cfg)), "param_groups": json.dumps(opt["param_groups"])}
    try:
        write_bytes_atomic(path, safetensors_bytes(tensors, metadata=meta))
    except OSError as exc:  # disk full, file-size limit, read-only: the previous checkpoint is still whole
        raise UserError(f"cannot write checkpoint {path} ({exc.strerror or exc}); the previous one, if any, is "
                        "intact — free some space and continue with --resume") from None


def checkpoint_step(path: str | Path) -> int | None:
    """The step stored in a checkpoint, or None if there is none / it is unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return int(f.metadata()["step"])
    except (FileNotFoundError, SafetensorError, OSError, KeyError, ValueError):
        return None


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict[str, torch.Tensor] | None = None) -> int:
    """Restore model and optimizer (and the ``extra`` tensors, in place) from :func:`save_checkpoint`; returns the step."""
    tensors, meta = read_safetensors(path, "the training checkpoint", "delete it to start over")
    if "step" not in meta or "param_groups" not in meta:
        raise UserError(f"checkpoint {path} lacks its step or optimiser settings; delete it to start over")
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"checkpoint {path} does not fit this model (another config?): {str(exc)[:200]}") from None
    for name, target in (extra or {}).items():
        value = tensors.get(f"extra.{name}")
        if value is None or value.shape != target.shape:
            raise UserError(f"checkpoint {path} has no {name} of shape {tuple(target.shape)} (another config?)")
        with torch.no_grad():
            target.copy_(value)
    opt_state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": json.loads(meta["param_groups"])})
    return int(meta["step"])
