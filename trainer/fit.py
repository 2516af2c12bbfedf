"""Train a NerFace avatar: a dynamic radiance field of your head, conditioned on expression, head pose and a
per-frame latent code, with the static background closing every ray.

    python trainer/fit.py --video me.mp4 [--background empty.png|auto] --out avatars/me     # prepare + train + evaluate
    python trainer/fit.py --data DATASET_DIR --out avatars/me [--preset smoke|cpu|paper]   # from a prepared dataset
    python trainer/fit.py --out avatars/me --resume                                         # continue a stopped run
    torchrun --nproc_per_node=N trainer/fit.py …                                             # data-parallel (DDP)

The --out directory becomes the avatar bundle (avatar.json, weights.safetensors, background.png) and holds
config.json, checkpoint.safetensors (every --checkpoint-every steps and on Ctrl-C), TensorBoard logs in tb/,
metrics.json and evaluation sheets.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from avatar.base.cli import add_config_arguments, command_parser, config_from_namespace
from avatar.base.devices import pick_device, prepare_device
from avatar.base.errors import UserError, run_cli
from avatar.base.fileio import write_json_atomic
from avatar.bundle.bundle import META_FILE, LoadedAvatar, load_bundle, save_bundle
from avatar.bundle.reference import expression_components, expression_stats, neutral_index, reference_pose
from avatar.capture.retarget import pose_range
from avatar.data.coverage import pose_error_vs_truth
from avatar.data.prepare import PrepareConfig, prepare_dataset
from avatar.data.reader import load_background, load_full_frame, load_split, read_transforms
from avatar.eval.evaluation import evaluate, format_table, pick, score, synthetic_subject
from avatar.field import posefit
from avatar.field.carve import carve_occupancy, culling_psnr_gap
from avatar.field.expressions import balanced_frame_table, disentangled_map, group_activity, pick_frame, weight_limits
from avatar.field.model import Avatar, SamplingConfig
from avatar.field.training import (
    CHECKPOINT_FILE,
    FitConfig,
    config_with_preset,
    learning_rate,
    load_checkpoint,
    padded_box,
    preset_notes,
    sample_pixels,
    save_checkpoint,
)
from avatar.render import rays as ray_utils


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(__doc__)
    add_config_arguments(p.add_argument_group("input (one of)"), FitConfig, only=("video", "data"))
    add_config_arguments(p, FitConfig, skip=("video", "data"), shown=config_with_preset(FitConfig.preset),
                         notes=preset_notes())
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start over, replacing a run in --out")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    return p


class Distributed:
    """torchrun's environment, if any: gloo on CPUs, NCCL on GPUs (one GPU per rank: cuda:LOCAL_RANK)."""

    # Rank 0 alone prepares the dataset (MediaPipe over the whole video) and scores the untrained model while
    # the others wait in a collective: that may take far longer than the default 10-minute NCCL timeout.
    TIMEOUT_HOURS = 4

    def __init__(self, device: torch.device):
        from datetime import timedelta

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.device = device
        if self.enabled and device.type == "cuda":
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)  # before init: NCCL binds each rank's communicator to its GPU
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=timedelta(hours=self.TIMEOUT_HOURS))

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (one shared decision, e.g. to stop)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)  # NCCL needs a tensor on the rank's GPU
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def resolve_config(args: argparse.Namespace) -> tuple[FitConfig, bool]:
    """Config for this run: a fresh one from the arguments, or the stored one when resuming."""
    out = Path(args.out)
    stored = out / "config.json"
    if args.resume:
        if not stored.is_file():
            raise UserError(f"nothing to resume in {out} (no config.json); start a run without --resume")
        stored_cfg = json.loads(stored.read_text())
        stored_cfg.setdefault("expression_map", "learned")  # runs from before the fixed map had the learned one
        stored_cfg.setdefault("region_fraction", 0.0)
        stored_cfg.setdefault("plane_tv_weight", 0.0)
        stored_cfg.setdefault("expression_init_zero", False)
        stored_cfg.setdefault("pose_refine", False)
        stored_cfg.setdefault("expression_mlp", False)
        stored_cfg.setdefault("frame_balance", 0.0)
        stored_cfg.setdefault("expression_warp", 0)
        stored_cfg.setdefault("shading", "volumetric")
        stored_cfg.setdefault("upsample", 0)
        base = FitConfig(**{k: v for k, v in stored_cfg.items() if k in {f.name for f in fields(FitConfig)}})
        # Only the length of the run may change on resume.
        if args.max_steps is not None:
            base.max_steps = args.max_steps
        return base, True
    if (out / CHECKPOINT_FILE).exists() or (out / "config.json").exists():
        if not args.overwrite:
            raise UserError(f"{out} already holds a run; pass --resume to continue it or --overwrite to start over")
        for name in (CHECKPOINT_FILE, "config.json", META_FILE, "metrics.json", "untrained_metrics.json"):
            (out / name).unlink(missing_ok=True)
    if bool(args.video) == bool(args.data):
        raise UserError("give exactly one of --video VIDEO or --data DATASET_DIR")
    # The preset's values, then the options given (explicit flags win).
    base = config_with_preset(args.preset or FitConfig.preset, args.field or FitConfig.field)
    cfg = config_from_namespace(FitConfig, args, base=base, out=str(out))
    if not 0.0 <= cfg.frame_balance <= 1.0:
        raise UserError(f"--frame-balance {cfg.frame_balance}: a share of the steps, 0–1")
    if cfg.expression_warp < 0 or cfg.expression_warp == 1:
        raise UserError(f"--expression-warp {cfg.expression_warp}: 0 (off) or a grid of 2 or more")
    if cfg.upsample not in (0, 2, 4):
        raise UserError(f"--upsample {cfg.upsample}: 0 (none), 2 or 4")
    if cfg.upsample and cfg.field != "fast":
        raise UserError("--upsample is for the fast field (the live engines)")
    if cfg.field == "fast" and (cfg.bundle_occupancy_resolution % cfg.occupancy_resolution
                                or cfg.bundle_occupancy_resolution < cfg.occupancy_resolution):
        raise UserError(f"--bundle-occupancy-resolution {cfg.bundle_occupancy_resolution}: a multiple of the training "
                        f"grid's {cfg.occupancy_resolution}")
    if cfg.density_hidden < 0:
        raise UserError(f"--density-hidden {cfg.density_hidden}: 0 (a linear head) or more hidden units")
    if cfg.video:
        cfg.data = str(out / "dataset")
    return cfg, False


def _stop_on_signal(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C and SIGTERM both end in a checkpoint, even when started from a shell that ignores SIGINT.
    signal.signal(signal.SIGINT, _stop_on_signal)
    signal.signal(signal.SIGTERM, _stop_on_signal)
    args = build_parser().parse_args(argv)
    cfg, resuming = resolve_config(args)
    ddp = Distributed(pick_device(cfg.device))
    device = ddp.device
    prepare_device(device)
    try:
        return train(cfg, resuming, device, ddp, evaluate_at_end=not args.no_eval)
    finally:
        ddp.close()


@dataclass
class FitRun:
    """One training run's state, shared by the steps of :func:`train`: the data (train split as numpy and as
    tensors on the device), the model with its optimizer and per-frame pose corrections, and the loop's
    bookkeeping (step, RNG, progress bar, TensorBoard writer, losses). One object instead of a 200-line
    function's locals, so each stage is a small function that names what it reads and changes."""

    cfg: FitConfig
    device: torch.device
    ddp: Distributed
    out: Path
    train_set: Any
    val_set: Any
    background_np: np.ndarray  # [h, w, 3] uint8
    model: Avatar
    pose_deltas: torch.nn.Parameter  # [t, 6] per training frame (used only with cfg.pose_refine)
    optimizer: torch.optim.Optimizer
    extras: dict
    step: int
    ckpt_path: Path
    sampling: SamplingConfig
    loaded: LoadedAvatar
    # Set by start_loop:
    trainer_model: torch.nn.Module | None = None  # the model, or its DDP wrapper
    images: torch.Tensor | None = None  # uint8 [t, h, w, 3]
    background: torch.Tensor | None = None  # [h, w, 3] in [0, 1]
    intrinsics: torch.Tensor | None = None  # [4]
    poses: torch.Tensor | None = None  # [t, 4, 4]
    expressions: torch.Tensor | None = None  # [t, e]
    calmest: int = 0
    frame_table: np.ndarray | None = None  # [g, t] per expression group, a distribution over frames (frame_balance)
    boxes: np.ndarray | None = None  # [t, 4] padded face boxes
    rng: np.random.Generator | None = None
    writer: Any = None
    bar: Any = None
    start: float = 0.0
    start_step: int = 0
    # Losses stay tensors until a log step: float() every step would wait for the GPU every step.
    first_loss: torch.Tensor | None = None
    recent_losses: deque = field(default_factory=lambda: deque(maxlen=100))

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the training frames."""
        return self.train_set.image_size

    @property
    def head_box(self) -> tuple[np.ndarray, np.ndarray]:
        """The dataset's head bounds (min, max), ``[3]`` each."""
        return self.train_set.head_bounds


def train(cfg: FitConfig, resuming: bool, device: torch.device, ddp: Distributed, evaluate_at_end: bool) -> int:
    """Prepare the dataset when needed, train (resuming from the checkpoint), then on rank 0 write the avatar
    bundle and evaluate it. Returns the exit status (Ctrl-C saves a checkpoint and exits 130)."""
    prepare_output(cfg, resuming, ddp)
    run = open_run(cfg, resuming, device, ddp)
    # The untrained model's score on the same frames, once per run: the floor "training helped" is read against.
    if ddp.main and evaluate_at_end and not resuming and run.step == 0:
        score_untrained(run)
    start_loop(run)
    train_loop(run)
    ddp_report = ddp_checksums(run) if ddp.enabled else None
    if not ddp.main:
        return 0
    seconds = time.perf_counter() - run.start
    if run.writer is not None:
        run.writer.flush()
        run.writer.close()
    train_stats = training_stats(run, seconds, ddp_report)
    meta = bundle_meta(run, train_stats)
    poses = run.poses
    if cfg.pose_refine:
        poses = posefit.apply(poses, run.pose_deltas).detach()  # the poses the field was fitted to
        meta["pose_refinement"] = pose_refinement_report(run.pose_deltas, poses, run.train_set, cfg.data)
        meta["pose_corrections"] = np.round(run.pose_deltas.detach().cpu().numpy().astype(np.float64), 6).tolist()
    run.model.eval()
    if cfg.field == "fast":
        finalize_fast_field(run, poses, meta)
    save_bundle(run.out, run.model, meta, run.background_np, full_frame=load_full_frame(cfg.data))
    print(f"trained {run.step} steps ({train_stats['steps_per_second']} steps/s); avatar bundle in {run.out}")
    if cfg.field == "fast" and cfg.upsample:
        from trainer.upsample import UpsampleConfig, build_upsampler

        build_upsampler(load_bundle(run.out), run.out, cfg.data,
                        UpsampleConfig(bundle=str(run.out), data=cfg.data, factor=cfg.upsample, seed=cfg.seed,
                                       eval_pose_steps=cfg.eval_pose_steps))
    if evaluate_at_end:
        evaluate_bundle(run, train_stats)
    return 0


def prepare_output(cfg: FitConfig, resuming: bool, ddp: Distributed) -> None:
    """Check --data, and on rank 0 create --out, prepare the dataset from --video if not done yet and store the
    config of a new run; every rank waits for that."""
    out = Path(cfg.out)
    if not cfg.video:
        read_transforms(cfg.data, "train")  # a wrong --data fails before anything is written
    if ddp.main:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.video and not (Path(cfg.data) / "transforms_train.json").is_file():
            prepare_dataset(PrepareConfig(video=cfg.video, out=cfg.data, background=cfg.background, size=cfg.size,
                                          landmarker=cfg.landmarker, overwrite=True))
            # As trainer/prepare.py (and run_live.py --record) after the dataset. Its quick fit runs in this
            # process: not under torchrun, where it would join the ranks' process group.
            if cfg.refine_poses > 0 and ddp.world > 1:
                print("note: no photometric head tracking under torchrun (landmark poses); for it, run "
                      "trainer/prepare.py first and train with --data", file=sys.stderr)
            elif cfg.refine_poses > 0:
                from trainer.prepare import refine_dataset_poses  # (it trains with this module: imported late)

                refine_dataset_poses(cfg.data, cfg.refine_poses, cfg.refine_steps, cfg.device)
        if not resuming:
            write_json_atomic(out / "config.json", asdict(cfg))
    ddp.barrier()


def open_run(cfg: FitConfig, resuming: bool, device: torch.device, ddp: Distributed) -> FitRun:
    """Load the splits, seed torch, build the model, pose corrections and optimizer, and restore them from the
    checkpoint when resuming."""
    out = Path(cfg.out)
    train_set = load_split(cfg.data, "train")
    val_set = load_split(cfg.data, "val")
    background_np = load_background(cfg.data)
    if len(train_set) == 0:
        raise UserError(f"{cfg.data} has no training frames")
    w, h = train_set.image_size
    torch.manual_seed(cfg.seed)
    box_min, box_max = train_set.head_bounds
    model = build_model(cfg, train_set).to(device)
    # Per-frame head-pose corrections (avatar/posefit.py); kept beside the model, not in the bundle.
    pose_deltas = torch.nn.Parameter(torch.zeros(len(train_set), 6, device=device))
    optimizer = build_optimizer(cfg, model, pose_deltas if cfg.pose_refine else None)
    extras = {"pose_deltas": pose_deltas} if cfg.pose_refine else {}
    step = 0
    ckpt_path = out / CHECKPOINT_FILE
    if resuming and ckpt_path.is_file():
        step = load_checkpoint(ckpt_path, model, optimizer, extras)
    step_cm = float(np.linalg.norm(box_max - box_min) / cfg.march_steps)
    sampling = SamplingConfig(cfg.coarse_samples, cfg.fine_samples, cfg.chunk, step=step_cm)
    loaded = LoadedAvatar(model, {"intrinsics": train_set.intrinsics.tolist(), "image_size": [w, h],
                                            "sampling": sampling.__dict__}, torch.from_numpy(background_np / 255.0).float())
    return FitRun(cfg, device, ddp, out, train_set, val_set, background_np, model, pose_deltas, optimizer, extras,
                  step, ckpt_path, sampling, loaded)


def score_untrained(run: FitRun) -> None:
    """Score the untrained model on the evaluation's test frames into untrained_metrics.json."""
    cfg = run.cfg
    test_set = load_split(cfg.data, "test")
    idx = pick(len(test_set), cfg.eval_frames)
    run.model.eval()
    rows, _ = score(run.loaded, [(test_set.poses[i], test_set.expressions[i], test_set.images[i] / 255.0)
                                 for i in idx])
    from avatar.base.metrics import mean_metrics

    write_json_atomic(run.out / "untrained_metrics.json", mean_metrics(rows))


def start_loop(run: FitRun) -> None:
    """Everything the loop reads each step: the DDP wrapper, the training tensors on the device, the per-rank
    RNG, the TensorBoard writer (rank 0, when installed), the progress bar and the clock."""
    cfg, ddp, device, train_set = run.cfg, run.ddp, run.device, run.train_set
    w, h = run.size
    run.trainer_model = run.model
    if ddp.enabled:
        run.trainer_model = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None)

    run.images = torch.from_numpy(train_set.images).to(device)  # uint8 [t, h, w, 3]
    run.background = torch.from_numpy(run.background_np).to(device).float() / 255.0
    run.intrinsics = torch.tensor(train_set.intrinsics, dtype=torch.float32, device=device)
    run.poses = torch.tensor(train_set.poses, dtype=torch.float32, device=device)
    run.expressions = torch.tensor(train_set.expressions, dtype=torch.float32, device=device)
    run.calmest = neutral_index(train_set.expressions)  # the neutral stand-in during --expression-warmup
    if cfg.frame_balance > 0:
        activity, _ = group_activity(train_set.expressions, train_set.expression_names)
        run.frame_table = balanced_frame_table(activity)
    run.boxes = np.stack([padded_box(b, w, h) for b in train_set.bboxes])
    run.rng = np.random.default_rng(cfg.seed * 1000 + ddp.rank * 7919 + run.step)  # each rank its own frames and rays

    if ddp.main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            run.writer = SummaryWriter(str(run.out / "tb"))
        except ImportError:  # tensorboard is only for watching; a bare GPU box may not have it
            print("tensorboard is not installed: no TensorBoard logs for this run", file=sys.stderr)
    run.bar = tqdm(total=cfg.max_steps, initial=run.step, desc="training", unit="step",
                   disable=None if ddp.main else True, dynamic_ncols=True)
    run.start, run.start_step = time.perf_counter(), run.step
    run.model.train()


def train_loop(run: FitRun) -> None:
    """Steps until --max-steps (or --max-minutes); Ctrl-C / SIGTERM save a checkpoint and exit 130."""
    cfg, ddp = run.cfg, run.ddp
    try:
        while run.step < cfg.max_steps:
            loss, mse_fine, lr = train_step(run)
            if after_step(run, loss, mse_fine, lr):
                break
    except KeyboardInterrupt:
        if ddp.main:
            save_checkpoint(run.ckpt_path, run.model, run.optimizer, run.step, cfg, run.extras)
            run.bar.close()
            print(f"interrupted at step {run.step}; checkpoint saved — continue with: "
                  f"python trainer/fit.py --out {cfg.out} --resume", file=sys.stderr)
        sys.exit(130)
    run.bar.close()


def train_step(run: FitRun) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimisation step on ``cfg.rays_per_step`` rays of one random training frame; advances ``run.step``.
    Returns the step's total loss ``[]``, its colour MSE ``[]`` (fine samples) and the learning rate."""
    cfg, model, train_set, device = run.cfg, run.model, run.train_set, run.device
    w, h = run.size
    step, rng, pose_deltas = run.step, run.rng, run.pose_deltas
    i = pick_frame(rng, len(train_set), run.frame_table, cfg.frame_balance)
    regions = train_set.regions[i] if train_set.regions is not None else None
    px = torch.from_numpy(sample_pixels(rng, cfg.rays_per_step, run.boxes[i], w, h, cfg.inside_fraction, regions,
                                        cfg.region_fraction)).to(device)
    target = run.images[i, px[:, 1], px[:, 0]].float() / 255.0  # [r, 3]
    pose = posefit.apply(run.poses[i], pose_deltas[i]) if cfg.pose_refine else run.poses[i]
    rays = ray_utils.frame_rays(px, run.intrinsics, pose, model.box_min, model.box_max)
    expression = run.expressions[i] if step >= cfg.expression_warmup else run.expressions[run.calmest]
    outputs = run.trainer_model(rays, expression, i, run.background[px[:, 1], px[:, 0]], run.sampling, True,
                                distortion=cfg.field == "fast" and cfg.distortion_weight > 0)
    mse_fine, loss = step_loss(run, outputs, target, expression, i)
    # Ranks keep their own clocks: under DDP the schedule follows steps only, so every rank's lr agrees.
    time_fraction = ((time.perf_counter() - run.start) / (cfg.max_minutes * 60)
                     if cfg.max_minutes > 0 and not run.ddp.enabled else 0.0)
    lr = learning_rate(cfg, step, time_fraction)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0) * (step >= cfg.pose_warmup or not group.get("poses", False))
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.ddp.enabled and cfg.pose_refine:  # outside DDP's module: average the corrections' gradients by hand
        dist.all_reduce(pose_deltas.grad)
        pose_deltas.grad /= run.ddp.world
    run.optimizer.step()
    run.step += 1
    return loss, mse_fine, lr


def step_loss(run: FitRun, outputs: dict, target: torch.Tensor, expression: torch.Tensor,
              i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The colour MSE of the render ``outputs`` against ``target [r, 3]`` and the total loss with the latent and
    pose penalties and the fast field's regularisers (both ``[]``); frame ``i``, ``expression [e]``."""
    cfg, model = run.cfg, run.model
    mse_fine = torch.mean((outputs["rgb"] - target) ** 2)
    loss = mse_fine + cfg.latent_l2 * model.latents[i].pow(2).sum()
    if cfg.pose_refine:
        loss = loss + cfg.pose_l2 * run.pose_deltas[i].pow(2).sum()
    if cfg.field == "fast":
        loss = loss + fast_field_regularisers(cfg, model, expression, i, run.sampling.step, outputs["planes"])
        a = outputs["alpha"].clamp(1e-4, 1 - 1e-4)
        loss = loss + cfg.opacity_entropy_weight * torch.mean(-(a * torch.log(a) + (1 - a) * torch.log(1 - a)))
    if "distortion" in outputs:
        loss = loss + cfg.distortion_weight * outputs["distortion"].mean()
    if "rgb_coarse" in outputs:
        loss = loss + torch.mean((outputs["rgb_coarse"] - target) ** 2)
    return mse_fine, loss


def after_step(run: FitRun, loss: torch.Tensor, mse_fine: torch.Tensor, lr: float) -> bool:
    """The bookkeeping after a step: occupancy update, loss record, time budget, progress, TensorBoard,
    validation image and checkpoint. True when the time budget is spent (stop now)."""
    cfg, ddp, step = run.cfg, run.ddp, run.step
    if cfg.field == "fast" and step >= 128 and step % cfg.occupancy_every == 0:
        update_occupancy(run.model, run.expressions, run.rng, ddp)
    if run.first_loss is None:
        run.first_loss = loss.detach()
    run.recent_losses.append(loss.detach())
    # The time budget (same wall time for every field in comparisons), decided once for all ranks —
    # each rank's own clock would stop them at different steps and hang the next all-reduce. Under DDP
    # the decision costs a collective, so it is taken every 8 steps.
    out_of_time = False
    if cfg.max_minutes > 0 and (not ddp.enabled or step % 8 == 0):
        out_of_time = ddp.any((time.perf_counter() - run.start) > cfg.max_minutes * 60)
    if ddp.main:
        run.bar.update(1)
        writer = run.writer
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            psnr, loss_value = float(-10 * torch.log10(mse_fine.detach().clamp_min(1e-10))), float(loss.detach())
            run.bar.set_postfix(loss=f"{loss_value:.4f}", psnr=f"{psnr:.2f}")
            if writer is not None:
                writer.add_scalar("train/loss", loss_value, step)
                writer.add_scalar("train/psnr", psnr, step)
                writer.add_scalar("train/lr", lr, step)
        if writer is not None and cfg.val_every and step % cfg.val_every == 0 and len(run.val_set):
            log_validation(writer, run.loaded, run.val_set, step, run.model)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or out_of_time:
            save_checkpoint(run.ckpt_path, run.model, run.optimizer, step, cfg, run.extras)
    return out_of_time


def ddp_checksums(run: FitRun) -> dict:
    """Every rank's weights must be identical after DDP: gather a checksum from each and record them."""
    device, ddp = run.device, run.ddp
    local = torch.tensor([float(sum(p.detach().double().sum() for p in run.model.parameters()))], dtype=torch.float64, device=device)
    gathered = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(ddp.world)]
    dist.all_gather(gathered, local)
    sums = [float(g) for g in gathered]
    return {"world_size": ddp.world, "backend": dist.get_backend(), "param_checksums": sums,
            "ranks_identical": all(s == sums[0] for s in sums)}


def training_stats(run: FitRun, seconds: float, ddp_report: dict | None) -> dict:
    """The run's figures for avatar.json and metrics.json: steps, speed, first and recent loss."""
    recent_losses = run.recent_losses
    return {"steps": run.step, "seconds_this_session": round(seconds, 1),
            "steps_per_second": round((run.step - run.start_step) / max(seconds, 1e-9), 3),
            "loss_first": float(run.first_loss) if run.first_loss is not None else None,
            "loss_last_100_mean": float(torch.stack(list(recent_losses)).mean()) if recent_losses else None,
            "distributed": ddp_report}


def bundle_meta(run: FitRun, train_stats: dict) -> dict:
    """The bundle's avatar.json fields that describe the training data and this run."""
    train_set = run.train_set
    box_min, box_max = run.head_box
    reference = reference_pose(train_set.poses, train_set.expressions)
    return {
        "intrinsics": train_set.intrinsics.tolist(),
        "image_size": list(run.size),
        "expression_names": train_set.expression_names,
        "expression_stats": expression_stats(train_set.expressions),
        "reference_head_pose": reference.tolist(),
        "pose_range": pose_range(train_set.poses, reference),
        "expression_components": expression_components(train_set.expressions),
        "head_bounds": {"min": box_min.tolist(), "max": box_max.tolist()},
        "sampling": run.sampling.__dict__,
        "train_frame_indices": train_set.frame_indices.tolist(),
        "step": run.step,
        "dataset": str(run.cfg.data),
        "training": train_stats,
    }


def finalize_fast_field(run: FitRun, poses: torch.Tensor, meta: dict) -> None:
    """The fast field's occupancy grid for the bundle: conservative over the training expressions, the largest
    threshold that keeps the pictures, carved by what the training views see; figures into ``meta``.
    ``poses [t, 4, 4]``: the training poses the field was fitted to."""
    model, expressions, intrinsics = run.model, run.expressions, run.intrinsics
    w, h = run.size
    finalize_occupancy(model, expressions)
    dense: list = []  # the dense reference renders, shared by every gap measured below
    threshold, gap = choose_occupancy_threshold(model, run.train_set, poses, expressions, intrinsics, run.background,
                                                run.sampling, dense)
    frames = finalize_frames(expressions, poses)
    # Rays at ~160 px still cross every cell of a 64³ grid; more pixels only cost time.
    s = min(1.0, 160 / max(w, h))
    before, after = carve_occupancy(model, poses[frames], expressions[frames], model.latents[frames].detach(),
                                    intrinsics * s, round(w * s), round(h * s), run.sampling)
    meta["occupied_fraction"] = {"density": round(before, 4), "after_carving": round(after, 4)}
    meta["occupancy_threshold"] = {"density_per_cm": threshold, "psnr_gap_db_on_training_frames": round(gap, 4)}
    resolution = run.cfg.bundle_occupancy_resolution
    if resolution > model.occupancy.resolution:  # the finer grid, inside the carved cells, if it keeps the pictures
        coarse = model.occupancy
        coarse_gap = occupancy_gap(model, run.train_set, poses, expressions, intrinsics, run.background, run.sampling,
                                   cache=dense)  # (after carving)
        model.occupancy = coarse.refined(resolution, [_density_fn(model, expressions[k]) for k in finalize_frames(expressions)])
        gap = occupancy_gap(model, run.train_set, poses, expressions, intrinsics, run.background, run.sampling,
                            cache=dense)
        if gap > coarse_gap + OCCUPANCY_MAX_GAP_DB:
            model.occupancy = coarse
        meta["occupied_fraction"][f"refined_{resolution}"] = round(model.occupancy.occupied_fraction(), 4)
        meta["occupancy_threshold"]["psnr_gap_db_after_carving"] = round(coarse_gap, 4)
        meta["occupancy_threshold"][f"psnr_gap_db_refined_{resolution}"] = round(gap, 4)


def evaluate_bundle(run: FitRun, train_stats: dict) -> None:
    """Evaluate the written bundle on the test frames into metrics.json (with the untrained floor) and print
    its table."""
    cfg, out = run.cfg, run.out
    loaded_bundle = load_bundle(out, run.device)
    result = evaluate(loaded_bundle, cfg.data, out, cfg.eval_frames, log=lambda s: None,
                      refine_iterations=cfg.eval_pose_steps)
    untrained = out / "untrained_metrics.json"
    if untrained.is_file():
        result["untrained"] = json.loads(untrained.read_text())
    result["training"] = train_stats
    write_json_atomic(out / "metrics.json", result)
    print(format_table(result))


def build_model(cfg: FitConfig, train_set) -> Avatar:
    box_min, box_max = train_set.head_bounds
    common = dict(box_min=box_min.tolist(), box_max=box_max.tolist(), expression_dim=train_set.expressions.shape[1])
    if cfg.field == "fast":
        # Initialise the expression → basis-weight map with the principal components of the training expressions.
        e = train_set.expressions.astype(np.float64)
        mean = e.mean(0)
        _, _, vt = np.linalg.svd(e - mean, full_matrices=False)
        field_kwargs = dict(common, resolution=cfg.plane_resolution, channels=cfg.plane_channels,
                            bases=cfg.expression_bases, hidden=cfg.hidden, expression_mean=mean.tolist(),
                            expression_components=vt[: cfg.expression_bases].tolist(), expression_map=cfg.expression_map,
                            expression_resolution=cfg.expression_resolution,
                            expression_init_zero=cfg.expression_init_zero, expression_mlp=cfg.expression_mlp,
                            expression_warp=cfg.expression_warp, shading=cfg.shading,
                            density_hidden=cfg.density_hidden)
        if cfg.expression_map == "fixed":
            matrix, offset, labels = disentangled_map(train_set.expressions, train_set.expression_names,
                                                      residual=cfg.residual_bases)
            field_kwargs.update(bases=len(labels), expression_matrix=matrix.tolist(), expression_offset=offset.tolist(),
                                expression_labels=labels)
            limits = weight_limits(matrix, offset, labels, train_set.expressions)
            if limits is not None:
                field_kwargs.update(expression_low=limits[0], expression_high=limits[1])
    else:
        field_kwargs = dict(common, width=cfg.width, depth=cfg.depth)
    return Avatar(cfg.field, field_kwargs, num_frames=len(train_set), latent_dim=cfg.latent_dim,
                  occupancy_resolution=cfg.occupancy_resolution)


def build_optimizer(cfg: FitConfig, model: Avatar, pose_deltas: torch.nn.Parameter | None = None) -> torch.optim.Optimizer:
    """Adam; the fast field's planes get their own (larger) rate, the pose corrections theirs (after a warm-up)."""
    if cfg.field != "fast":
        groups = [{"params": list(model.parameters()), "lr": cfg.lr, "lr_scale": 1.0}]
    else:
        grid_names = ("field.planes", "field.expression_planes")
        planes = [p for n, p in model.named_parameters() if n in grid_names]
        others = [p for n, p in model.named_parameters() if n not in grid_names]
        groups = [{"params": others, "lr": cfg.lr, "lr_scale": 1.0},
                  {"params": planes, "lr": cfg.grid_lr, "lr_scale": cfg.grid_lr / cfg.lr}]
    if pose_deltas is not None:
        groups.append({"params": [pose_deltas], "lr": cfg.pose_lr, "lr_scale": cfg.pose_lr / cfg.lr, "poses": True})
    return torch.optim.Adam(groups, eps=1e-15)


def pose_refinement_report(deltas: torch.Tensor, refined: torch.Tensor, train_set, data_dir: str) -> dict:
    """How far the learned corrections moved the tracked poses; on a synthetic subject, both against the truth."""
    rot, trans = posefit.delta_size(deltas)
    report = {"frames": len(rot), "median_rotation_deg": round(float(np.median(rot)), 3),
              "max_rotation_deg": round(float(rot.max()), 3), "median_translation_cm": round(float(np.median(trans)), 3)}
    subject = synthetic_subject(data_dir)
    if subject is not None:
        truth = json.loads((subject / "truth.json").read_text())
        for name, p in (("tracked_vs_truth", train_set.poses), ("refined_vs_truth", refined.cpu().numpy())):
            check = pose_error_vs_truth(np.asarray(p, dtype=np.float64), train_set.frame_indices, truth)
            report[name] = {k: check.get(k) for k in ("median_rotation_error_deg", "mean_rotation_error_deg")}
    return report


def fast_field_regularisers(cfg: FitConfig, model: Avatar, expression: torch.Tensor, frame: int,
                            step_cm: float, planes: torch.Tensor | None = None) -> torch.Tensor:
    """Sparsity (mean opacity of one marching step at random points of the head box) and total variation of the
    blended planes, under this frame's condition."""
    loss = torch.zeros((), device=expression.device)
    if cfg.sparsity_weight <= 0 and cfg.plane_tv_weight <= 0:
        return loss
    condition = torch.cat([expression, model.latents[frame]])
    if planes is None:  # (the render of this step already blended them: one blend per step, not two)
        planes = model.field.blend(condition)  # [3, ch, r, r]
    if cfg.plane_tv_weight > 0:
        loss = loss + cfg.plane_tv_weight * plane_total_variation(planes)
    if cfg.sparsity_weight > 0:
        pts = model.box_min + torch.rand(cfg.sparsity_points, 3, device=expression.device) * (model.box_max - model.box_min)
        sigma = model.field.query(planes, pts, torch.zeros_like(pts), condition)[1]
        loss = loss + cfg.sparsity_weight * torch.mean(1 - torch.exp(-sigma * step_cm))
    return loss


def plane_total_variation(planes: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of neighbouring texels of ``planes [..., r, r]`` (both axes)."""
    return (planes[..., 1:, :] - planes[..., :-1, :]).pow(2).mean() + (planes[..., :, 1:] - planes[..., :, :-1]).pow(2).mean()


def _density_fn(model: Avatar, expression: torch.Tensor):
    condition = torch.cat([expression, model.latents[0].detach()])
    planes = model.field.blend(condition)
    return lambda pts: model.field.query(planes, pts, torch.zeros_like(pts), condition)[1]


@torch.no_grad()
def update_occupancy(model: Avatar, expressions: torch.Tensor, rng: np.random.Generator, ddp: "Distributed") -> None:
    """Decayed-max update under a random training expression (all ranks agree: same grid everywhere)."""
    k = int(rng.integers(len(expressions)))
    if ddp.enabled:
        k_t = torch.tensor([k], device=expressions.device)  # NCCL broadcasts GPU tensors only
        dist.broadcast(k_t, 0)
        k = int(k_t)
    model.occupancy.update(_density_fn(model, expressions[k]))


def finalize_frames(expressions: torch.Tensor, poses: torch.Tensor | None = None, count: int = 24) -> list[int]:
    """Training frames that span the range: evenly spread, each blendshape at its peak, the extreme head turns."""
    picks = np.linspace(0, len(expressions) - 1, min(count, len(expressions))).astype(int)
    extremes = [int(expressions[:, j].argmax()) for j in range(expressions.shape[1])]
    if poses is not None:  # most yaw / pitch either way (the direction of the head's forward axis in camera space)
        forward = poses[:, :3, 2]
        for axis in (0, 1):
            extremes += [int(forward[:, axis].argmax()), int(forward[:, axis].argmin())]
    return sorted(set(picks.tolist()) | set(extremes))


OCCUPANCY_THRESHOLDS = (0.3, 0.1, 0.03, 0.01, 0.0)  # density (1/cm): the largest that keeps the pictures is used
# What culling may cost on training frames against the dense reference; the bundle's finer grid may add as much
# again to the carved grid's gap (a real head's 64³ grid already used 0.025 of it; 128³ added 0.02, −0.01 dB on
# held-out frames, 21 % faster)
OCCUPANCY_MAX_GAP_DB = 0.03


@torch.no_grad()
def occupancy_gap(model: Avatar, train_set, poses: torch.Tensor, expressions: torch.Tensor, intrinsics: torch.Tensor,
                  background: torch.Tensor, sampling: SamplingConfig, frames: int = 3, cache: list | None = None) -> float:
    """How far (dB) culled renders of a few training frames, through the model's grid as it is, score from the
    dense reference (``cache`` keeps the dense renders between calls)."""
    picks = np.linspace(0, len(expressions) - 1, min(frames, len(expressions))).astype(int).tolist()
    truths = torch.from_numpy(train_set.images[picks].astype(np.float32) / 255.0)
    return culling_psnr_gap(model, poses[picks], expressions[picks], model.latents[picks].detach(), truths,
                            intrinsics, background, sampling, cache)


def choose_occupancy_threshold(model: Avatar, train_set, poses: torch.Tensor, expressions: torch.Tensor,
                               intrinsics: torch.Tensor, background: torch.Tensor, sampling: SamplingConfig,
                               cache: list | None = None) -> tuple[float, float]:
    """The largest occupancy threshold whose culled renders of a few training frames score within
    :data:`OCCUPANCY_MAX_GAP_DB` of the dense reference (a young or foggy field needs a lower one). Returns
    (threshold, gap). ``cache`` (a list) keeps the dense renders for later gaps."""
    cache = [] if cache is None else cache
    gap = 0.0
    for threshold in OCCUPANCY_THRESHOLDS:
        model.occupancy.set_threshold(threshold)
        gap = occupancy_gap(model, train_set, poses, expressions, intrinsics, background, sampling, cache=cache)
        if gap <= OCCUPANCY_MAX_GAP_DB:
            return threshold, gap
    return threshold, gap


@torch.no_grad()
def finalize_occupancy(model: Avatar, expressions: torch.Tensor) -> None:
    """The bundle's grid: conservative over the training expression range (max over many, dilated)."""
    frames = finalize_frames(expressions)
    model.occupancy.finalize([_density_fn(model, expressions[k]) for k in frames], samples_per_cell=1)


@torch.no_grad()
def log_validation(writer, loaded: LoadedAvatar, val_set, step: int, model: Avatar) -> None:
    """Render one validation frame (latent code of the first training frame) into TensorBoard."""
    from avatar.field.model import render_image

    model.eval()
    k = step % len(val_set)  # a different validation frame each time
    w, h = val_set.image_size
    out = render_image(model, val_set.poses[k], val_set.expressions[k], model.latents[0].detach(), val_set.intrinsics,
                       w, h, loaded.background, loaded.sampling)
    truth = torch.from_numpy(val_set.images[k]).float() / 255.0
    pred = out["rgb"].cpu()
    writer.add_image("val/truth_render", torch.cat([truth, pred], 1).permute(2, 0, 1), step)
    writer.add_scalar("val/psnr", float(-10 * torch.log10(((pred - truth) ** 2).mean())), step)
    model.train()


def cli() -> None:
    """The ``nerface-fit`` console script."""
    run_cli(main)


if __name__ == "__main__":
    cli()
