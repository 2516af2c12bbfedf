"""Turn a portrait video into a NerFace training dataset.

    python trainer/prepare.py VIDEO --out DIR [--background IMAGE|auto] [--size 512] [--test-fraction 0.17]

Tracks every frame with MediaPipe (expression = 52 blendshapes, head pose), fits the subject's face shape,
solves every head pose on the rigid landmarks (forehead, nose, eye corners: not the lips, jaw, cheeks,
brows or eyelids) and takes the midpoint of that rotation and MediaPipe's own (they err in opposite
directions), crops one fixed square around the head, estimates or crops
the background plate, and writes frames/, background.png, transforms_{train,val,test}.json and report.json
— all at once or not at all. report.json holds the expression coverage (per group: the largest score and
how many frames reach half of it; one warning line per group the video never shows) and, for a synthetic
subject (truth.json beside the video), the head-rotation error against the true poses, split by the jaw.

Then the poses are tracked photometrically (--refine-poses MINUTES, 2.5 by default, 0 = off), as NerFace's
Face2Face tracker does: a quick avatar is fitted to the training frames with a head-pose correction per frame
(trainer/fit.py's pose refinement; its first steps without expressions, so that the poses, not the expression
bases, explain how the head moves); the validation and test frames take the training frames' mean correction
(with --refine-steps N each is also refined against its image by that avatar; evaluation does that for the frames
it scores anyway). The landmark poses err slowly and systematically (~2° on the synthetic subject, a bias that
depends on the pose and the expression, which no smoothing removes); the photometric ones do not. The
landmark pose of each frame stays in the transforms as tracked_transform_matrix; report.json gets the
refinement's figures (and, on a synthetic subject, both poses' errors against the truth).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avatar.base.cli import add_config_arguments, arg, command_parser, config_from_namespace
from avatar.base.devices import DEVICE_HELP, pick_device
from avatar.base.errors import UserError, run_cli
from avatar.data.prepare import PrepareConfig, prepare_dataset
from avatar.data.reader import SPLITS


@dataclass
class PoseTrackingConfig:
    """The photometric pose tracking after the dataset is written (see the top of this file)."""

    refine_poses: float = arg(2.5, metavar="MINUTES",
                              help="minutes of the quick avatar fit that tracks the head poses photometrically (on "
                                   "top of the test-frame refinement; 0 = keep the landmark poses)")
    # Held-out frames are not fitted by default: evaluation refines each frame it scores against its own image
    # (trainer/evaluate.py --eval-pose-steps), and 40 steps here first moved that score by 0.1 dB (33-second
    # phone clip, 5 test frames: 18.34 → 18.46 dB) for 7 s per frame on a 2-core CPU: 25 minutes for that clip's
    # 213 held-out frames, most of the one command's time. They take the training frames' mean correction
    # instead, which keeps them in the fitted poses' gauge.
    refine_steps: int = arg(0, help="pose-refinement steps per validation/test frame (0 = none: they take the "
                                    "training frames' mean correction; evaluation refines the frames it scores)")
    device: str = arg("auto", help=f"for the pose tracking: {DEVICE_HELP}")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(__doc__)
    add_config_arguments(p, PrepareConfig)
    add_config_arguments(p, PoseTrackingConfig)
    return p


# The quick fit renders every frame with the neutral expression for its first steps, so that the pose corrections
# (which start at step 300) must explain the rigid head's motion before any expression basis exists. Without it
# the jaw basis absorbs the landmark poses' jaw-dependent tilt first, and it stays: measured on the synthetic
# subject (128², 2.5 minutes), mean pitch error jaw open/closed +0.54°/−0.02° without, +0.06°/+0.02° with 900
# steps; median rotation error 1.00° → 0.93°.
POSE_TRACKING_FIT_ARGS = ("--expression-warmup", "900")


def refine_dataset_poses(directory: str | Path, minutes: float, steps: int = 40, device: str = "auto",
                         log=print, fit_args: tuple[str, ...] = ()) -> dict:
    """Track every frame's head pose photometrically (see the top of this file); rewrites the transforms and
    report.json of ``directory`` in place (each file atomically) and returns the report's new block."""
    import shutil

    directory = Path(directory)
    work = directory / ".posetrack"  # the quick avatar, removed at the end
    start = time.perf_counter()
    try:
        log(f"tracking head poses photometrically: a {minutes:g}-minute avatar fit with per-frame pose corrections")
        loaded = fit_pose_tracker(directory, work, minutes, device, fit_args)
        refined, corrections = tracked_poses(directory, loaded, steps)
        write_tracked_poses(directory, refined)
        every = np.concatenate([corrections[s] for s in SPLITS])
        block = {"minutes": minutes, "steps_per_held_out_frame": steps, "device": str(pick_device(device)),
                 "median_correction_deg": round(float(np.median(every)), 3),
                 "max_correction_deg": round(float(every.max()), 3) if len(every) else 0.0,
                 "seconds": round(time.perf_counter() - start, 1)}
        report = update_report(directory, refined, block)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(tracking_line(block, report))
    return block


def fit_pose_tracker(directory: Path, work: Path, minutes: float, device: str, fit_args: tuple[str, ...]):
    """The quick avatar with per-frame pose corrections, fitted into ``work`` for ``minutes``; returns it loaded."""
    from avatar.bundle.bundle import load_bundle
    from trainer import fit

    code = fit.main(["--data", str(directory), "--out", str(work), "--overwrite", "--preset", "cpu",
                     "--field", "fast", "--max-minutes", f"{minutes:g}", "--max-steps", "1000000",
                     "--no-eval", "--pose-refine", "--device", device, *POSE_TRACKING_FIT_ARGS, *fit_args])
    if code:
        raise UserError(f"the pose-tracking fit failed (exit {code}); run again with --refine-poses 0 to skip it")
    return load_bundle(work, device=pick_device(device))


def tracked_poses(directory: Path, loaded, steps: int) -> tuple[dict, dict]:
    """Per split, the photometric poses ``[t, 4, 4]`` (training frames: the fit's corrected poses; the others
    refined against their images for ``steps`` steps, or with 0 steps moved by the training frames' mean
    correction) and each frame's correction in degrees ``[t]``."""
    import torch

    from avatar.data.reader import load_split
    from avatar.eval.evaluation import fitted_train_poses, refine_poses
    from avatar.field import posefit
    from avatar.field.posefit import delta_size
    from avatar.field.training import padded_box

    refined, corrections = {}, {}
    train = load_split(directory, "train", with_images=False)
    refined["train"] = fitted_train_poses(loaded, train)
    deltas = np.asarray(loaded.meta["pose_corrections"], np.float64)  # [t, 6]
    corrections["train"] = delta_size(deltas)[0]
    for split in SPLITS:
        if split == "train":
            continue
        frames = load_split(directory, split, with_images=steps > 0)
        if len(frames) == 0:
            refined[split], corrections[split] = frames.poses, np.zeros(0)
            continue
        if steps <= 0:  # the training frames' mean correction (the gauge); evaluation refines what it scores
            mean = torch.as_tensor(np.broadcast_to(deltas.mean(0), (len(frames), 6)).copy())
            refined[split] = posefit.apply(torch.as_tensor(frames.poses), mean).numpy()
            corrections[split] = delta_size(mean.numpy())[0]
            continue
        w, h = frames.image_size
        items = [(frames.poses[i], frames.expressions[i], frames.images[i].astype(np.float32) / 255.0)
                 for i in range(len(frames))]
        boxes = np.stack([padded_box(b, w, h) for b in frames.bboxes])
        new_items, sizes = refine_poses(loaded, items, boxes, steps, progress=f"tracking {split} poses")
        refined[split] = np.stack([item[0] for item in new_items])
        corrections[split] = sizes[:, 0]
    return refined, corrections


def write_tracked_poses(directory: Path, refined: dict) -> None:
    """Rewrite each split's transforms with the tracked poses, keeping the landmark pose of each frame as
    ``tracked_transform_matrix``."""
    from avatar.base.fileio import write_json_atomic
    from avatar.data.reader import read_transforms

    for split in SPLITS:
        meta = read_transforms(directory, split)
        for f, pose in zip(meta["frames"], refined[split]):
            f.setdefault("tracked_transform_matrix", f["transform_matrix"])
            f["transform_matrix"] = np.asarray(pose, dtype=np.float64).round(6).tolist()
        write_json_atomic(directory / f"transforms_{split}.json", meta)


def update_report(directory: Path, refined: dict, block: dict) -> dict:
    """Add the tracking's ``block`` to report.json and, on a synthetic subject, the tracked poses' error against
    the truth (the landmark poses' kept beside it); returns the report."""
    from avatar.base.fileio import read_json, write_json_atomic
    from avatar.data.coverage import pose_error_vs_truth
    from avatar.data.reader import load_split

    report_path = directory / "report.json"
    report = read_json(report_path)
    check = report.get("head_pose_vs_truth")
    if check and check.get("truth") and Path(check["truth"]).is_file():
        truth = read_json(check["truth"])
        indices = np.concatenate([load_split(directory, s, with_images=False).frame_indices for s in SPLITS])
        report["head_pose_vs_truth_landmarks"] = {k: v for k, v in check.items() if k != "truth"}
        report["head_pose_vs_truth"] = {
            "truth": check["truth"], "poses": "photometrically tracked",
            **pose_error_vs_truth(np.concatenate([refined[s] for s in SPLITS]), indices, truth),
            "mediapipe_pose": check.get("mediapipe_pose")}
    report["pose_tracking"] = block
    write_json_atomic(report_path, report)
    return report


def tracking_line(block: dict, report: dict) -> str:
    """The line logged after the tracking: time, corrections and, on a synthetic subject, the error against the
    truth of both poses (and by the jaw)."""
    line = (f"head poses tracked photometrically in {block['seconds']:.0f} s: median correction "
            f"{block['median_correction_deg']:.2f}° (max {block['max_correction_deg']:.2f}°)")
    check = report.get("head_pose_vs_truth")
    if check and "median_rotation_error_deg" in check:
        jaw = check.get("jaw") or {}
        line += (f"; vs the truth: median {check['median_rotation_error_deg']:.2f}° (landmark poses "
                 f"{report['head_pose_vs_truth_landmarks']['median_rotation_error_deg']:.2f}°)")
        if jaw.get("mean_pitch_error_open_deg") is not None and jaw.get("mean_pitch_error_closed_deg") is not None:
            line += (f", mean pitch error jaw open {jaw['mean_pitch_error_open_deg']:+.2f}° vs closed "
                     f"{jaw['mean_pitch_error_closed_deg']:+.2f}°")
    return line


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg, track = config_from_namespace(PrepareConfig, args), config_from_namespace(PoseTrackingConfig, args)
    if track.refine_poses < 0 or track.refine_steps < 0:
        raise UserError("--refine-poses must be ≥ 0 minutes and --refine-steps ≥ 0")
    if track.refine_poses > 0:
        pick_device(track.device)  # a bad --device is refused before anything is written
    prepare_dataset(cfg)
    if track.refine_poses > 0:
        refine_dataset_poses(cfg.out, track.refine_poses, track.refine_steps, track.device)
    return 0


def cli() -> None:
    """The ``nerface-prepare`` console script."""
    run_cli(main)


if __name__ == "__main__":
    cli()
