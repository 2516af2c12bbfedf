"""The dataset's ``report.json`` and the lines :func:`avatar.data.prepare.prepare_dataset` logs about it: how
well the fitted camera explains the landmarks, the splits, the crop, the expression coverage and, for a
synthetic subject (``truth.json`` beside its video), the head-rotation error against the true poses."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from avatar.data.coverage import expression_coverage, pose_error_vs_truth, synthetic_truth


def truth_check(video: str, poses: np.ndarray, track) -> tuple[dict | None, Path]:
    """For a synthetic subject (``truth.json`` beside ``video`` with a head pose per frame): the error of our
    ``poses [t, 4, 4]`` and of MediaPipe's own (``track.poses``) against the truth; None otherwise. Returns it
    with the truth file's path."""
    truth_path = Path(video).parent / "truth.json"  # beside a synthetic subject's video
    pose_check = None
    truth = synthetic_truth(truth_path)
    if truth is not None:
        # MediaPipe's own head pose beside ours: the baseline any refinement has to beat.
        pose_check = {"truth": str(truth_path),
                      **pose_error_vs_truth(poses, track.frame_indices, truth),
                      "mediapipe_pose": pose_error_vs_truth(track.poses, track.frame_indices, truth)}
    return pose_check, truth_path


def dataset_report(cfg, track, fit, framing, splits: dict[str, np.ndarray], background_source: str,
                   start: float) -> tuple[dict, dict | None, Path]:
    """``report.json``'s content for a prepared video (``fit``: the camera fit, ``framing``: the crop, ``start``:
    the preparation's perf_counter start). Returns it, the truth check (or None) and the truth file's path."""
    coverage, coverage_warnings = expression_coverage(track.expressions)
    pose_check, truth_path = truth_check(cfg.video, fit.poses, track)
    per_frame_before = np.median(fit.err_before, 1) / fit.face_width
    per_frame_after = np.median(fit.err_after, 1) / fit.face_width
    scale = framing.scale
    report = {
        "video": str(cfg.video),
        "frames_total": track.total,
        "frames_tracked": len(track.frame_indices),
        "frames_without_face": track.skipped,
        "splits": {k: int(len(v)) for k, v in splits.items()},
        "reprojection_error_px": float(np.median(fit.err_after) * scale),
        "reprojection_error_face_width": float(np.median(per_frame_after)),
        "reprojection_error_face_width_mediapipe_canonical": float(np.median(per_frame_before)),
        "face_width_px": float(np.median(fit.face_width) * scale),
        "crop": {"x0": framing.x0, "y0": framing.y0, "side": framing.side, "source_size": [track.width, track.height]},
        "size": cfg.size,
        "background": background_source,
        "face_shape_frames": int(len(fit.subset)),
        "expression_coverage": coverage,
        "expression_coverage_warnings": coverage_warnings,
        "head_pose_vs_truth": pose_check,
        "seconds": round(time.perf_counter() - start, 2),
    }
    return report, pose_check, truth_path


def log_summary(cfg, track, report: dict, pose_check: dict | None, truth_path: Path,
                log: Callable[[str], None]) -> None:
    """The preparation's lines: frames tracked, reprojection error, splits; the error against the truth on a
    synthetic subject; one warning per expression group the video never shows."""
    log(f"{report['frames_tracked']}/{track.total} frames tracked ({len(track.skipped)} without a face); "
        f"reprojection error {report['reprojection_error_px']:.2f} px = "
        f"{100 * report['reprojection_error_face_width']:.2f}% of the face width "
        f"(MediaPipe's canonical face: {100 * report['reprojection_error_face_width_mediapipe_canonical']:.2f}%); "
        f"splits {report['splits']}; {report['seconds']:.1f} s → {cfg.out}")
    if pose_check and "median_rotation_error_deg" in pose_check:
        line = (f"head rotation vs {truth_path.name}: median {pose_check['median_rotation_error_deg']:.2f}°, "
                f"mean {pose_check['mean_rotation_error_deg']:.2f}°")
        jaw = pose_check.get("jaw")
        if jaw and jaw["mean_pitch_error_open_deg"] is not None and jaw["mean_pitch_error_closed_deg"] is not None:
            line += (f"; mean pitch error jaw open {jaw['mean_pitch_error_open_deg']:+.2f}° "
                     f"({jaw['open_frames']} frames) vs closed {jaw['mean_pitch_error_closed_deg']:+.2f}° "
                     f"({jaw['closed_frames']}), correlation with the jaw {jaw['pitch_error_jaw_correlation']}")
        line += f" (MediaPipe's own pose: median {pose_check['mediapipe_pose']['median_rotation_error_deg']:.2f}°)"
        log(line)
    for warning in report["expression_coverage_warnings"]:
        log(f"warning: {warning}")
