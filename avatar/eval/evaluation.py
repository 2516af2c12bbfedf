"""Held-out evaluation: the avatar beside a nearest-training-frame baseline, and picture sheets.

Protocol (the paper's): test frames are rendered with their tracked expression and head pose and the
*first training frame's* latent code. The baseline shows, as is, the training image closest in expression
and head pose — every number has a floor beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
from tqdm import tqdm

from avatar.base import metrics
from avatar.base.errors import UserError
from avatar.bundle.bundle import LoadedAvatar
from avatar.bundle.reference import expression_stats, reference_pose
from avatar.capture import camera
from avatar.data.coverage import synthetic_truth
from avatar.data.prepare import resize_square
from avatar.data.reader import FrameSet, load_split, read_rgb
from avatar.eval import fidelity
from avatar.field import posefit
from avatar.field.model import normals_from_depth, render_image, render_rays
from avatar.field.training import padded_box


def pose_expression_distance(expr_a: np.ndarray, pose_a: np.ndarray, exprs: np.ndarray, poses: np.ndarray) -> np.ndarray:
    """Distance ``[t]`` from one (expression, pose) to many: expression L2 + rotation (rad) + translation (dm)."""
    d_expr = np.linalg.norm(exprs - expr_a, axis=1)
    rel = np.einsum("ij,tkj->tik", pose_a[:3, :3], poses[:, :3, :3])
    d_rot = np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1))
    d_trans = np.linalg.norm(poses[:, :3, 3] - pose_a[:3, 3], axis=1) / 10.0
    return d_expr + d_rot + d_trans


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def sheet(truth: np.ndarray, render: dict[str, torch.Tensor], intrinsics: np.ndarray) -> np.ndarray:
    """ground truth | render | error heat-map | normals from depth | foreground mask, as one RGB image."""
    rgb = render["rgb"].cpu().numpy()
    err = np.abs(rgb - truth).mean(-1)
    heat = cv2.applyColorMap(_to_uint8(np.clip(err * 4, 0, 1)), cv2.COLORMAP_INFERNO)[..., ::-1]
    alpha = render["alpha"].cpu().numpy()
    normals = normals_from_depth(render["depth"].cpu(), intrinsics).numpy()
    normals_img = _to_uint8((normals * 0.5 + 0.5) * alpha[..., None] + (1 - alpha[..., None]) * 0.0)
    mask = _to_uint8(np.repeat(alpha[..., None], 3, -1))
    return np.concatenate([_to_uint8(truth), _to_uint8(rgb), heat, normals_img, mask], 1)


def score(loaded: LoadedAvatar, items: list[tuple[np.ndarray, np.ndarray, np.ndarray]], latent_index: int = 0,
          sheets_dir: Path | None = None, sheet_prefix: str = "test", sheet_every: int = 5,
          progress: str | None = None) -> tuple[list[dict], list[np.ndarray]]:
    """Render ``items`` of (head pose, expression, truth image float [h, w, 3]) and score them."""
    w, h = loaded.image_size
    rows, renders = [], []
    latent = loaded.latent(latent_index)
    for i, (pose, expr, truth) in enumerate(tqdm(items, desc=progress or "rendering", leave=False,
                                                  disable=None if progress else True)):
        out = render_image(loaded.model, pose, expr, latent, loaded.intrinsics, w, h, loaded.background, loaded.sampling)
        pred = out["rgb"].cpu().numpy()
        rows.append(metrics.image_metrics(pred, truth))
        renders.append(pred)
        if sheets_dir is not None and i % sheet_every == 0:
            sheets_dir.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(sheets_dir / f"{sheet_prefix}_{i:04d}.png"), sheet(truth, out, loaded.intrinsics)[..., ::-1])
    return rows, renders


def fitted_train_poses(loaded: LoadedAvatar, train: FrameSet) -> np.ndarray:
    """``[t, 4, 4]``: the training poses the field was fitted to (tracked, with the trainer's learned corrections)."""
    corrections = loaded.meta.get("pose_corrections")
    if corrections is None:  # a bundle trained without pose refinement
        return train.poses
    try:
        deltas = np.asarray(corrections, dtype=np.float64)
    except (TypeError, ValueError):
        deltas = None
    if deltas is None or deltas.shape != (len(train), 6):
        raise UserError(f"the bundle's pose_corrections do not fit the {len(train)} training frames of this dataset "
                        "(another dataset, or a damaged avatar.json)")
    return posefit.apply(torch.from_numpy(train.poses), torch.from_numpy(deltas)).numpy()


def refine_poses(loaded: LoadedAvatar, items: list[tuple[np.ndarray, np.ndarray, np.ndarray]], boxes: np.ndarray,
                 iterations: int, latent_index: int = 0, progress: str | None = None
                 ) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], np.ndarray]:
    """Each item's tracked pose refined against its own image by the avatar (:func:`posefit.refine_frame_pose`:
    6 numbers per frame; expression and latent code stay as given). Returns the new items and the corrections'
    sizes ``[f, 2]`` (degrees, cm)."""
    model = loaded.model
    device = model.box_min.device
    w, h = loaded.image_size
    latent = loaded.latent(latent_index).to(device)
    bg = loaded.background.reshape(h, w, 3).to(device)
    k = torch.as_tensor(loaded.intrinsics, dtype=torch.float32, device=device)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:  # only the pose moves: no weight gradients to compute
        p.requires_grad_(False)
    out, sizes = [], []
    try:
        with torch.enable_grad():
            for (pose, expr, truth), box in tqdm(list(zip(items, boxes)), desc=progress or "refining poses", leave=False,
                                                 disable=None if progress else True):
                e = torch.as_tensor(expr, dtype=torch.float32, device=device)

                def render_fn(rays, px):
                    return render_rays(model, rays, e, latent, bg[px[:, 1], px[:, 0]], loaded.sampling)["rgb"]

                refined, delta = posefit.refine_frame_pose(
                    render_fn, torch.as_tensor(pose, dtype=torch.float32, device=device),
                    torch.as_tensor(truth, dtype=torch.float32, device=device), k, model.box_min, model.box_max,
                    box=box, iterations=iterations)
                out.append((refined.cpu().numpy().astype(np.float64), expr, truth))
                rot, trans = posefit.delta_size(delta[None])
                sizes.append((float(rot[0]), float(trans[0])))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return out, np.array(sizes).reshape(-1, 2)


def pick(count: int, limit: int) -> np.ndarray:
    return np.arange(count) if limit <= 0 or limit >= count else np.linspace(0, count - 1, limit).astype(int)


def evaluate(loaded: LoadedAvatar, data_dir: str | Path, out_dir: str | Path | None, max_frames: int = 0,
             log: Callable[[str], None] = print, progress: bool = True,
             fidelity_cfg: fidelity.FidelityConfig | None = None, refine_iterations: int = 0) -> dict:
    """Score the test split (avatar and nearest-training-frame baseline) and novel poses where known.

    With ``refine_iterations`` > 0 each test frame's tracked pose is first refined against the frame by the
    avatar (photometric tracking, pose only: :func:`refine_poses`); the scores at the tracked poses are kept
    beside them as ``test_tracked_pose``.

    With ``fidelity_cfg`` also the expression-fidelity block (:mod:`avatar.fidelity`): MediaPipe on the
    renders vs on the real frames, controllability, and on a synthetic subject the correlation with truth.
    """
    test = load_split(data_dir, "test")
    train = load_split(data_dir, "train", with_images=False)
    if len(test) == 0:
        raise ValueError(f"{data_dir} has no test frames")
    idx = pick(len(test), max_frames)
    items = [(test.poses[i], test.expressions[i], test.images[i].astype(np.float32) / 255.0) for i in idx]
    sheets = Path(out_dir) / "sheets" if out_dir is not None else None
    tracked_rows, corrections = None, None
    if refine_iterations > 0:
        tracked_rows, _ = score(loaded, items, 0, None, progress="test frames, tracked poses" if progress else None)
        w, h = loaded.image_size
        boxes = np.stack([padded_box(test.bboxes[i], w, h) for i in idx])
        items, corrections = refine_poses(loaded, items, boxes, refine_iterations,
                                          progress="refining test poses" if progress else None)
    rows, renders = score(loaded, items, 0, sheets, "test", max(1, len(items) // 4), "test frames" if progress else None)
    baseline_rows, nearest_images, plate_rows = [], [], []
    plate = loaded.background.cpu().numpy()  # a field that learned only to be transparent scores exactly this
    for i in idx:
        j = int(pose_expression_distance(test.expressions[i], test.poses[i], train.expressions, train.poses).argmin())
        nearest = train.read_image(j).astype(np.float32) / 255.0
        baseline_rows.append(metrics.image_metrics(nearest, test.images[i].astype(np.float32) / 255.0))
        nearest_images.append(nearest)
        plate_rows.append(metrics.image_metrics(plate, test.images[i].astype(np.float32) / 255.0))
    result = {
        "protocol": "held-out test frames (the last part of the video), tracked expression and pose, "
                    "latent code of the first training frame"
                    + (f"; each pose refined on its frame by the avatar ({refine_iterations} steps, pose only)"
                       if refine_iterations > 0 else ""),
        "test": {"avatar": metrics.mean_metrics(rows), "nearest_training_frame": metrics.mean_metrics(baseline_rows),
                 "background_only": metrics.mean_metrics(plate_rows)},
        "test_frames": [{"frame_index": int(test.frame_indices[i]), "avatar": r, "nearest_training_frame": b}
                        for i, r, b in zip(idx, rows, baseline_rows)],
    }
    if tracked_rows is not None:
        result["test_tracked_pose"] = {"avatar": metrics.mean_metrics(tracked_rows)}
        result["test_pose_refinement"] = {"iterations": refine_iterations,
                                          "median_rotation_deg": round(float(np.median(corrections[:, 0])), 3),
                                          "median_translation_cm": round(float(np.median(corrections[:, 1])), 3)}
    novel = novel_pose_items(data_dir, train, max_frames, fitted_train_poses(loaded, train))
    if novel:
        nrows, _ = score(loaded, novel, 0, sheets, "novel", max(1, len(novel) // 4), "novel poses" if progress else None)
        result["novel_poses"] = {"avatar": metrics.mean_metrics(nrows)}
    log(format_table(result))
    if fidelity_cfg is not None:
        truths = [item[2] for item in items]
        result["fidelity"] = fidelity_block(loaded, data_dir, train, test.frame_indices[idx], truths,
                                            {"avatar": renders, "nearest_training_frame": nearest_images},
                                            fidelity_cfg)
        log(fidelity.format_tables(result["fidelity"]))
    return result


def fidelity_block(loaded: LoadedAvatar, data_dir: str | Path, train: FrameSet, frame_indices: np.ndarray,
                   truths: list[np.ndarray], shown: dict[str, list[np.ndarray]],
                   cfg: fidelity.FidelityConfig) -> dict:
    """Expression fidelity of held-out frames (``truths`` vs each side of ``shown``) and controllability.

    Controllability renders with the model's normal renderer at the dataset's size, the first training
    frame's latent code (the evaluation protocol), the bundle's reference head pose (the resting pose: the
    typical head rotation of the calmest training frames) and its neutral expression (the training frame with
    the least total blendshape activity: ``avatar.bundle.reference.neutral_index``) — the same pose and neutral that
    ``trainer/render.py --set`` edits from.
    """
    from avatar.capture.tracking import FaceTracker

    meta = loaded.meta
    names = list(meta["expression_names"])
    stats = meta.get("expression_stats") or expression_stats(train.expressions)
    neutral = np.asarray(stats["neutral"], np.float32)
    neutral_index = int(np.abs(train.expressions - neutral).sum(1).argmin())
    pose = np.asarray(meta.get("reference_head_pose") or reference_pose(train.poses, train.expressions))
    w, h = loaded.image_size
    latent = loaded.latent(0)
    fitted = fitted_train_poses(loaded, train)

    def render(expression: np.ndarray, head_pose: np.ndarray = pose) -> np.ndarray:
        out = render_image(loaded.model, head_pose, expression, latent, loaded.intrinsics, w, h, loaded.background,
                           loaded.sampling)
        return out["rgb"].cpu().numpy()

    truth = None
    subject = synthetic_subject(data_dir)
    if subject is not None:
        t = json.loads((subject / "truth.json").read_text())
        if len(frame_indices) and int(frame_indices.max()) < len(t["frames"]):
            values = np.array([t["frames"][int(k)]["expression"] for k in frame_indices], np.float64)
            truth = (list(t["expression_names"]), values.reshape(len(frame_indices), -1))
    notes = {"reference_pose": "the bundle's reference head pose (the resting pose: its calmest frames' typical head rotation)",
             "neutral": "the neutral expression (the training frame with the least total blendshape activity)",
             "neutral_frame_index": int(train.frame_indices[neutral_index])}
    block = fidelity.measure(lambda: FaceTracker("image"), truths, shown, names, cfg, render, train.expressions,
                             neutral, truth, notes, train.read_image, neutral_index,
                             lambda j: render(train.expressions[j], fitted[j]))
    for row, k in zip(block["heldout"]["per_frame"], frame_indices):
        row["frame_index"] = int(k)
    return block


def format_table(result: dict) -> str:
    """Markdown table of the mean metrics."""
    lines = ["| frames | method | PSNR ↑ | SSIM ↑ | L1 ↓ | LPIPS |", "|---|---|---|---|---|---|"]
    for group, methods in (("test", result.get("test", {})),
                           ("test, tracked pose", result.get("test_tracked_pose", {})),
                           ("novel poses", result.get("novel_poses", {})),
                           ("test", {"untrained": result["untrained"]} if "untrained" in result else {})):
        for name, m in methods.items():
            lpips = m["lpips"] if isinstance(m["lpips"], float) else "unavailable"
            lines.append(f"| {group} ({m['frames']}) | {name} | {m['psnr']:.2f} | {m['ssim']:.3f} | {m['l1']:.4f} | {lpips} |")
    return "\n".join(lines)


def synthetic_subject(data_dir: str | Path) -> Path | None:
    """The synthetic subject's directory (``truth.json`` beside the video the dataset was prepared from), or None."""
    report_path = Path(data_dir) / "report.json"
    if not report_path.is_file():
        return None
    subject = Path(json.loads(report_path.read_text()).get("video", "")).parent
    return subject if synthetic_truth(subject / "truth.json") is not None else None


def novel_pose_items(data_dir: str | Path, train: FrameSet, limit: int = 0, train_poses: np.ndarray | None = None
                     ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For a synthetic subject: its ``novel/`` frames with true poses moved into the dataset's pose space.

    The tracked canonical space differs from the synthetic one by a rigid transform; it is estimated from
    the training frames (tracked pose vs true pose) and applied to the novel frames' true poses. Their
    expressions are tracked like any frame's; the images get the dataset's crop.
    """
    subject = synthetic_subject(data_dir)
    if subject is None:
        return []
    truth_path, novel_path = subject / "truth.json", subject / "novel" / "truth.json"
    if not novel_path.is_file():
        return []
    report = json.loads((Path(data_dir) / "report.json").read_text())
    truth = json.loads(truth_path.read_text())
    novel = json.loads(novel_path.read_text())
    true_poses = np.array([f["head_pose"] for f in truth["frames"]])[train.frame_indices]
    # A maps tracked-canonical → true-canonical: tracked_pose ≈ true_pose @ A.
    fitted = train.poses if train_poses is None else train_poses  # the poses the field was fitted to
    rel = np.einsum("tij,tjk->tik", np.linalg.inv(true_poses), fitted)
    u, _, vt = np.linalg.svd(rel[:, :3, :3].sum(0))
    align = camera.make_pose(u @ vt, np.median(rel[:, :3, 3], axis=0))
    crop = report["crop"]
    x0, y0, side = crop["x0"], crop["y0"], crop["side"]
    w, h = train.image_size
    from avatar.capture.tracking import FaceTracker

    items = []
    try:
        tracker_cm = FaceTracker("image")
    except (UserError, ImportError):  # no MediaPipe / landmarker here (e.g. a bare GPU box): no novel-pose scores
        return []
    with tracker_cm as tracker:
        frames = novel["frames"]
        for f in [frames[i] for i in pick(len(frames), limit)]:
            full = read_rgb(novel_path.parent / f["file_path"])
            obs = tracker.track(full)
            if obs is None:
                continue
            img = resize_square(full[y0:y0 + side, x0:x0 + side], w)
            items.append((np.asarray(f["head_pose"]) @ align, obs.blendshapes, img.astype(np.float32) / 255.0))
    return items
