"""Training pieces shared by `trainer/fit.py`: config presets, ray batches, checkpoints (safetensors, atomic)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from avatar.base.cli import arg, format_default
from avatar.base.devices import DEVICE_HELP
from avatar.base.errors import UserError
from avatar.base.fileio import read_safetensors, safetensors_bytes, write_bytes_atomic

PRESETS: dict[str, dict] = {
    # The paper: 512², 2048 rays, 64 + 64 samples, 400k steps (about 2 days on a 2021 GPU).
    "paper": dict(size=512, width=256, rays_per_step=2048, coarse_samples=64, fine_samples=64, max_steps=400_000,
                  lr_decay_steps=250_000, checkpoint_every=5000, val_every=10_000),
    # Minutes on a laptop CPU: a narrower backbone, fewer rays and samples. The final evaluation scores 20 test
    # frames spread over the held-out part (each refined for eval_pose_steps: ~7 s a frame at 256²; all 171 of a
    # 33-second clip took 20 minutes); trainer/evaluate.py --frames 0 scores them all.
    "cpu": dict(size=128, width=128, rays_per_step=1024, coarse_samples=32, fine_samples=32, max_steps=1500,
                lr_decay_steps=3000, checkpoint_every=100, val_every=500, eval_frames=20),
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
    # (the smoke run's bundle keeps its 64³ grid: a pipeline check needs no faster renders, and the 128³ grid's
    # refinement and its extra culling check are most of a minute on a 2-core CPU)
    "smoke": dict(rays_per_step=1024, max_steps=300, lr=2e-3, lr_decay_steps=600, plane_resolution=64,
                  plane_channels=8, march_steps=96, checkpoint_every=50, val_every=150, bundle_occupancy_resolution=64),
}


@dataclass
class FitConfig:
    """Everything a training run depends on; written to ``config.json`` so any run can be repeated. The fields
    declared with ``arg`` are trainer/fit.py's options (their defaults there: the default preset's)."""

    out: str = arg("avatars/me", required=True, help="output directory: becomes the avatar bundle")
    data: str | None = arg(None, help="dataset directory made by trainer/prepare.py")  # a prepared dataset …
    video: str | None = arg(None, help="portrait video to prepare and train on")  # … or one to prepare (OUT/dataset)
    background: str = arg("auto", help="with --video: image of the empty scene, or 'auto'")
    size: int = arg(512, help="with --video: side of the square frames to prepare (trainer/prepare.py --size)")
    refine_poses: float = arg(2.5, metavar="MINUTES",
                              help="with --video: minutes of prepare's photometric head tracking (a quick avatar fit "
                                   "with per-frame pose corrections; trainer/prepare.py --refine-poses); 0 = keep "
                                   "the landmark poses")
    refine_steps: int = arg(0, help="with --video: pose-refinement steps per validation/test frame of that tracking "
                                    "(0 = none: the training frames' mean correction; evaluation refines the frames "
                                    "it scores)")
    field: str = arg("fast", choices=["nerface", "fast"],
                     help="fast: expression-blended tri-planes + occupancy culling, trains in minutes and renders "
                          "live; nerface: the paper's MLP (days on a GPU, ~1 minute per frame on a CPU)")
    preset: str = arg("cpu", choices=list(PRESETS),
                      help="smoke: ~1 min pipeline check; cpu: minutes on a CPU; paper: the paper's 512², 400k steps")
    width: int = arg(256, help="field backbone width")
    depth: int = 8
    rays_per_step: int = arg(2048, help="rays per step (paper: 2048)")
    inside_fraction: float = 0.95  # share of rays drawn inside the (padded) head box
    region_fraction: float = arg(0.25, help="share of each step's rays drawn from the mouth and eye boxes (few "
                                            "pixels, most of the expression)")
    coarse_samples: int = arg(64, help="stratified samples per ray")
    fine_samples: int = arg(64, help="importance samples per ray")
    lr: float = arg(5e-4, help="Adam learning rate (paper: 5e-4)")
    lr_decay_steps: int = 250_000  # lr falls by 10× over this many steps (exponentially)
    latent_dim: int = arg(32, help="per-frame latent code size (paper: 32)")
    latent_l2: float = arg(0.05, help="weight of the latent codes' L2 penalty")
    # Per-frame head-pose corrections learned with the field (avatar/posefit.py): the tracker's poses are off by
    # ~2° in a way smoothing cannot remove, which cost 6 dB on held-out frames of the synthetic subject.
    pose_refine: bool = arg(True, help="learn a small head-pose correction per training frame with the field; the "
                                       "tracker's poses are ~2° off, which blurs the head and cost 6 dB on held-out "
                                       "frames")
    # Adam on (rotation vector in rad, translation in posefit.TRANSLATION_UNIT_CM units)
    pose_lr: float = arg(2e-3, help="learning rate of the pose corrections")
    pose_warmup: int = arg(300, help="steps before the pose corrections move (the field needs a rough head first)")
    pose_l2: float = 1e-4  # pulls corrections toward the tracker (and fixes the gauge: field vs all poses)
    # Steps during which every frame is rendered with the neutral expression: the poses then have to explain
    # how the rigid head moves before any expression basis can (prepare's pose tracking uses it).
    expression_warmup: int = arg(0, help="steps rendered with the neutral expression before the expression bases "
                                         "take part")
    # Held-out frames: the tracked pose refined against the frame by the trained avatar before scoring (pose only;
    # the tracked-pose score is kept beside it). 0 = score at the tracked poses only.
    eval_pose_steps: int = arg(40, help="steps refining each scored test frame's tracked pose against the frame "
                                        "before scoring (0 = score at the tracked poses only)")
    max_steps: int = arg(400_000, help="training steps")
    checkpoint_every: int = arg(1000, help="steps between checkpoints")
    log_every: int = 10
    val_every: int = arg(5000, help="steps between validation images in TensorBoard")
    eval_frames: int = arg(0, help="test frames to score at the end (0 = all)")
    chunk: int = 8192
    # for fair comparisons
    max_minutes: float = arg(0.0, help="stop training after this many minutes (0 = no limit)")
    # fast field
    plane_resolution: int = arg(128, help="fast field: tri-plane resolution")
    plane_channels: int = arg(16, help="fast field: feature channels per plane")
    expression_bases: int = arg(6, help="fast field, learned map: expression bases blended per frame")
    # "fixed": one basis per expression group (jaw, smile, each blink, brows, pucker, funnel) driven by its own
    # scores, plus residual_bases for the rest, decorrelated from the groups (avatar/expressions.py);
    # "learned": a 52 → expression_bases linear map, initialised by PCA (entangles co-varying coefficients).
    expression_map: str = arg("fixed", choices=["fixed", "learned"],
                              help="fast field: fixed = one basis per expression group (jaw, smile, blinks, brows …) "
                                   "driven by its own scores, so each coefficient does what it names; learned = a "
                                   "PCA-initialised linear map of all scores (ties coefficients that co-varied in the "
                                   "video)")
    # measured: 4 (bounded) cost single-group control (jaw 0.52 vs 0.80) and AED
    residual_bases: int = arg(0, help="fast field, fixed map: extra bases for what the groups miss")
    expression_resolution: int = arg(0, help="fast field: resolution of the expression bases' planes (0 = the plane "
                                             "resolution)")
    hidden: int = arg(64, help="fast field: width of its MLP")
    grid_lr: float = 1e-2
    # Empty space must be empty, not a faint fog the colour of the background: fog costs quality at new poses
    # and speed everywhere (rays march through it). Two regularisers: the opacity of random points in the head
    # box (L1, saturates on real surfaces) and the binary entropy of each ray's opacity (rays end on something
    # or see the background).
    # Total variation of the frame's blended planes (mean squared difference of neighbouring texels): keeps texels
    # that few rays see from turning into grain, which MediaPipe reads as texture, not as a face.
    plane_tv_weight: float = arg(1e-2, help="fast field: weight of the planes' total-variation loss")
    expression_mlp: bool = arg(True, flag="--expression-mlp", values={"on": True, "off": False},
                               help="fast field: the expression's basis weights also enter the MLP's first layer "
                                    "(a per-frame bias, as NerFace; no per-sample cost)")
    expression_warp: int = arg(0, help="fast field: resolution of each expression basis's displacement of the "
                                       "neutral planes (moves features instead of cross-fading them; 0 = off; an "
                                       "experiment: its blend costs ~40 ms more per step at the cpu preset, effect "
                                       "not measured yet)")
    shading: str = arg("volumetric", choices=["volumetric", "deferred"],
                       help="fast field: volumetric = colour and density from the MLP at every sample; deferred = "
                            "per sample only a density (a small head), the plane features composited along the ray "
                            "and the MLP run once per pixel (SNeRG): several times faster to render on a CPU")
    density_hidden: int = arg(16, help="fast field, deferred shading: width of the per-sample density head (0 = a "
                                       "linear head: cheapest per sample, computed inside the fused engine's march)")
    upsample: int = arg(0, help="fast field: also train a learned upsampler (trainer/upsample.py) that brings renders "
                                "at 1/UPSAMPLE of the frame size to full size (2 or 4; 0 = none): the live loop uses it "
                                "when the head's box is larger than what renders at the frame rate")
    frame_balance: float = arg(0.0, help="share of steps whose frame is drawn where one expression group (jaw, "
                                         "smile, blink, brows …) is strongest, a group picked at random; the rest "
                                         "draw any frame (rare expressions get more steps)")
    expression_init_zero: bool = arg(True, flag="--expression-init", values={"zero": True, "random": False},
                                     help="fast field: expression bases start at zero or small random values")
    sparsity_weight: float = arg(5e-2, help="fast field: weight of the empty-space sparsity loss")
    sparsity_points: int = 4096
    opacity_entropy_weight: float = arg(1e-2, help="fast field: weight of the ray-opacity entropy loss")
    # mip-NeRF 360's distortion loss (per ray, in cm): gathers each ray's weight into few samples, so that a
    # renderer stops soon after it meets the head (docs/NOTES.md, session 7). 0 = off.
    distortion_weight: float = arg(0.0, help="fast field: weight of mip-NeRF 360's distortion loss (thinner "
                                             "surfaces, faster renders; 0 = off)")
    occupancy_resolution: int = 64
    # The bundle's grid, made after training (the training grid stays at occupancy_resolution: refreshed every
    # occupancy_every steps, a finer one would cost more than it saves). Measured on the 300-frame synthetic
    # subject: 128³ takes 29 % fewer samples a frame than 64³ (issue 25).
    bundle_occupancy_resolution: int = arg(128, help="fast field: resolution of the occupancy grid the bundle's "
                                                     "renderers cull with (a multiple of the training grid's 64; "
                                                     "finer = fewer empty samples before each surface)")
    occupancy_every: int = 16
    march_steps: int = 192  # marching steps across the head box diagonal (step = diagonal / march_steps)
    device: str = arg("auto", help=DEVICE_HELP + "; under torchrun each rank takes cuda:LOCAL_RANK")
    seed: int = arg(0, help="seed of the model's initialisation and the ray sampling")
    landmarker: str | None = arg(None, help="path to face_landmarker.task (for --video; default: found "
                                            "automatically)")


def config_with_preset(preset: str, field: str = "fast", **overrides) -> FitConfig:
    """Defaults, then the preset (and its field-specific part), then explicit overrides (None = not given)."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = replace(FitConfig(), **PRESETS[preset], preset=preset, field=field)
    if field == "fast":
        cfg = replace(cfg, **FAST_PRESETS[preset])
    names = {f.name for f in fields(FitConfig)}
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None and k in names})


def preset_notes(preset: str = FitConfig.preset, field: str = FitConfig.field) -> dict[str, str]:
    """What ``--help`` says beside the default of each setting a preset sets: which preset gave it, and the
    other presets' values (for ``field``)."""
    notes = {}
    for name in {k for p in PRESETS for k in (*PRESETS[p], *FAST_PRESETS[p])}:
        which = f"--preset {preset} --field {field}" if any(name in FAST_PRESETS[p] for p in PRESETS) else \
            f"--preset {preset}"
        others = ", ".join(f"{p} {format_default(getattr(config_with_preset(p, field), name))}"
                           for p in PRESETS if p != preset)
        notes[name] = f"with {which}; {others}"
    return notes


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
