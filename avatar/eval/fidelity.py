"""Expression fidelity read back with the app's own tracker (MediaPipe, IMAGE mode).

Whole-frame PSNR cannot see a mouth that fails to open, so renders are tracked like the real frames are:

- **AED** (average expression distance): mean |Δ| over the 51 non-neutral blendshape scores of a held-out
  render vs the real frame; the same for the nearest training frame shown as is (the baseline).
- **Head-pose error**: geodesic angle between MediaPipe's head rotations (facial transformation matrix)
  on the render and on the real frame.
- **Region PSNR**: PSNR inside the mouth (lips polygon) and the eyes (eye + brow polygons), from the real
  frame's landmarks, dilated a little.
- **Controllability**: at the avatar's reference head pose, from its neutral expression, (i) one blendshape
  group set to its trained maximum, (ii) the whole expression of the training frame where the group peaks;
  response = tracked group change / commanded group change (1.0 = MediaPipe sees all of it).
- On a synthetic subject, the correlation of tracked scores with the true expression values.

Small images are upscaled (the same way on both sides) before tracking: MediaPipe needs ~200 px faces.
Frames where MediaPipe finds no face are counted per side, never dropped silently.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import cv2
import numpy as np

from avatar.base import metrics
from avatar.capture import camera
from avatar.capture.tracking import FaceObservation, FaceTracker, region_landmarks

# Blendshape groups whose controllability is measured; a group's value is the mean of its members.
CONTROL_GROUPS: dict[str, tuple[str, ...]] = {
    "jawOpen": ("jawOpen",),
    "mouthSmile": ("mouthSmileLeft", "mouthSmileRight"),
    "eyeBlink": ("eyeBlinkLeft", "eyeBlinkRight"),
    "browInnerUp": ("browInnerUp",),
    "mouthPucker": ("mouthPucker",),
    "mouthFunnel": ("mouthFunnel",),
}
# The synthetic subject's true expression channels (truth.json) → the MediaPipe group that should follow
# them. Left/right are averaged on both sides, so the two conventions for "left" cannot disagree.
TRUTH_GROUPS: dict[str, tuple[tuple[str, ...], str]] = {
    "jaw_open": (("jaw_open",), "jawOpen"),
    "smile": (("smile",), "mouthSmile"),
    "blink": (("blink_left", "blink_right"), "eyeBlink"),
    "brow_raise": (("brow_raise",), "browInnerUp"),
    "pucker": (("pucker",), "mouthPucker"),
    "funnel": (("funnel",), "mouthFunnel"),
}
SIDES = ("avatar", "nearest_training_frame")


@dataclass
class FidelityConfig:
    track_size: int = 256  # images smaller than this (longer side) are upscaled to it before tracking
    min_range: float = 0.1  # a group is tested for control only if its trained range spans this much
    region_dilation: float = 0.04  # mouth/eye masks grow by this fraction of the face width
    controllability: bool = True


# --- small pure functions

def to_uint8(img: np.ndarray) -> np.ndarray:
    """``[h, w, 3]`` float in [0, 1] (or uint8) → uint8."""
    if img.dtype == np.uint8:
        return img
    return np.clip(np.asarray(img, np.float32) * 255 + 0.5, 0, 255).astype(np.uint8)


def upscale(img: np.ndarray, size: int) -> np.ndarray:
    """``[h, w, 3]`` → uint8 with the longer side ``size`` (bicubic) when smaller; else unchanged."""
    img = to_uint8(img)
    h, w = img.shape[:2]
    s = size / max(h, w)
    if s <= 1:
        return img
    return cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_CUBIC)


def expression_distance(a: np.ndarray, b: np.ndarray, names: list[str]) -> float:
    """Mean |a − b| over the blendshape scores ``[52]`` other than ``_neutral``."""
    keep = np.array([n != "_neutral" for n in names])
    return float(np.abs(np.asarray(a, np.float64)[keep] - np.asarray(b, np.float64)[keep]).mean())


def rotation_of(matrix: np.ndarray) -> np.ndarray:
    """The rotation ``[3, 3]`` of a 4×4 transform (nearest orthonormal matrix: MediaPipe's may carry scale)."""
    u, _, vt = np.linalg.svd(np.asarray(matrix, np.float64)[:3, :3])
    r = u @ vt
    if np.linalg.det(r) < 0:
        r = u @ np.diag([1, 1, -1]) @ vt
    return r


def head_rotation_error_deg(pose_a: np.ndarray, pose_b: np.ndarray) -> float:
    """Geodesic angle (degrees) between the head rotations of two ``[4, 4]`` transforms."""
    return camera.rotation_angle_deg(rotation_of(pose_a), rotation_of(pose_b))


def group_value(expressions: np.ndarray, names: list[str], members: tuple[str, ...]) -> np.ndarray:
    """Mean of the members' scores: ``[..., 52]`` → ``[...]``."""
    idx = [names.index(m) for m in members]
    return np.asarray(expressions, np.float64)[..., idx].mean(-1)


def region_polygons() -> dict[str, tuple[tuple[int, ...], ...]]:
    """Landmark indices of each scored region's polygons: the lips; both eyes, each with its brow."""
    r = region_landmarks()
    return {"mouth": (r["mouth"],), "eyes": (r["left_eye"], r["right_eye"])}


def region_masks(landmarks: np.ndarray, width: int, height: int, dilation: float = 0.04) -> dict[str, np.ndarray]:
    """Boolean masks ``[h, w]`` of the mouth and the eyes from normalised landmarks ``[478, ≥2]``.

    Each region is the convex hull of its landmarks (the lips hull holds the mouth interior; each eye's hull
    is taken with its brow), grown by ``dilation`` × the face width so a slightly misplaced edge still counts.
    """
    px = np.asarray(landmarks)[:, :2] * np.array([width, height])
    face_width = float(np.ptp(px[:, 0]))
    radius = max(1, round(dilation * face_width))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    out = {}
    for name, polygons in region_polygons().items():
        mask = np.zeros((height, width), np.uint8)
        for ids in polygons:
            hull = cv2.convexHull(np.round(px[list(ids)]).astype(np.int32))
            cv2.fillConvexPoly(mask, hull, 1)
        out[name] = cv2.dilate(mask, kernel).astype(bool)
    return out


def masked_psnr(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float | None:
    """PSNR (dB) of ``[h, w, 3]`` images in [0, 1] over the pixels of ``mask [h, w]``; None for an empty mask."""
    if not mask.any():
        return None
    return metrics.psnr(np.asarray(pred, np.float64)[mask], np.asarray(truth, np.float64)[mask])


def response(tracked_edit: float, tracked_neutral: float, commanded: float, neutral: float) -> float | None:
    """Share of a commanded group change that the tracker sees: (tracked Δ) / (commanded Δ)."""
    if abs(commanded - neutral) < 1e-6:
        return None
    return float((tracked_edit - tracked_neutral) / (commanded - neutral))


def correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two ``[n]`` series; None with fewer than 3 points or a constant series."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 3 or a.std() < 1e-9 or b.std() < 1e-9:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def track(tracker: FaceTracker, img: np.ndarray, size: int) -> FaceObservation | None:
    """Track one image ``[h, w, 3]`` (float in [0, 1] or uint8) after upscaling it to ``size``."""
    return tracker.track(upscale(img, size))


# --- held-out frames

def heldout_fidelity(tracker: FaceTracker, truths: list[np.ndarray], shown: dict[str, list[np.ndarray]],
                     cfg: FidelityConfig) -> dict:
    """AED, head-pose error and region/whole PSNR of each side in ``shown`` against the real frames.

    ``truths``: the real frames, float ``[h, w, 3]``; ``shown[side]``: what that side shows for each frame
    (the avatar's renders, the nearest training frames), same sizes.
    """
    real_obs = [track(tracker, t, cfg.track_size) for t in truths]
    result: dict = {"frames": len(truths),
                    "undetected": {"real_frame": sum(o is None for o in real_obs)}, "per_frame": []}
    per_frame = [{} for _ in truths]
    for side, images in shown.items():
        rows = []
        for k, (img, truth, ro) in enumerate(zip(images, truths, real_obs)):
            o = track(tracker, img, cfg.track_size)
            row = {"detected": o is not None, "aed": None, "head_pose_error_deg": None, "mouth_psnr": None,
                   "eye_psnr": None, "whole_psnr": metrics.psnr(np.asarray(img, np.float64), truth)}
            if o is not None and ro is not None:
                row["aed"] = expression_distance(o.blendshapes, ro.blendshapes, ro.names)
                row["head_pose_error_deg"] = head_rotation_error_deg(o.head_pose, ro.head_pose)
            if ro is not None:  # regions come from the real frame, whether or not the render is tracked
                h, w = truth.shape[:2]
                masks = region_masks(ro.landmarks, w, h, cfg.region_dilation)
                row["mouth_psnr"] = masked_psnr(img, truth, masks["mouth"])
                row["eye_psnr"] = masked_psnr(img, truth, masks["eyes"])
            row["blendshapes"] = o.blendshapes.tolist() if o is not None else None
            rows.append(row)
            per_frame[k][side] = {key: v for key, v in row.items() if key != "blendshapes"}
        result["undetected"][side] = sum(not r["detected"] for r in rows)
        result[side] = {
            "aed": _mean([r["aed"] for r in rows]),
            "aed_frames": sum(r["aed"] is not None for r in rows),
            "head_pose_error_deg": _mean([r["head_pose_error_deg"] for r in rows]),
            "mouth_psnr": _mean([r["mouth_psnr"] for r in rows]),
            "eye_psnr": _mean([r["eye_psnr"] for r in rows]),
            "region_frames": sum(r["mouth_psnr"] is not None for r in rows),
            "whole_psnr": _mean([r["whole_psnr"] for r in rows]),
        }
        result.setdefault("_tracked", {})[side] = [r["blendshapes"] for r in rows]
    result["_tracked"]["real_frame"] = [o.blendshapes.tolist() if o is not None else None for o in real_obs]
    result["per_frame"] = per_frame
    return result


def truth_correlations(tracked: dict[str, list], names: list[str], truth_names: list[str],
                       truth_values: np.ndarray) -> dict:
    """Correlation over frames of each side's tracked group score with the true channel values.

    ``tracked[side]``: per frame the tracked blendshapes ``[52]`` or None (no face); ``truth_values``:
    ``[n, c]`` true expression channels named ``truth_names`` (truth.json of the synthetic subject).
    """
    out = {}
    for channel, (members, group) in TRUTH_GROUPS.items():
        if not all(m in truth_names for m in members):
            continue
        true = truth_values[:, [truth_names.index(m) for m in members]].mean(1)
        row = {"group": group}
        for side, rows in tracked.items():
            ok = [k for k, r in enumerate(rows) if r is not None]
            seen = group_value(np.array([rows[k] for k in ok]).reshape(len(ok), -1), names, CONTROL_GROUPS[group]) \
                if ok else np.zeros(0)
            row[side] = correlation(seen, true[ok])
        row["true_range"] = float(np.ptp(true)) if len(true) else 0.0
        out[channel] = row
    return out


# --- controllability

def controllable_groups(train_expressions: np.ndarray, names: list[str], min_range: float) -> dict[str, dict]:
    """Each group's trained range (max − min of the group value over training frames) and whether it is tested."""
    out = {}
    for group, members in CONTROL_GROUPS.items():
        if not all(m in names for m in members):
            continue
        values = group_value(train_expressions, names, members)
        out[group] = {"min": float(values.min()), "max": float(values.max()),
                      "range": float(np.ptp(values)), "peak_frame": int(values.argmax()),
                      "tested": bool(np.ptp(values) >= min_range)}
    return out


def single_group_edit(neutral: np.ndarray, train_expressions: np.ndarray, names: list[str],
                      members: tuple[str, ...]) -> np.ndarray:
    """``[52]``: the neutral expression with only ``members`` set to their trained maxima."""
    edited = np.array(neutral, np.float32, copy=True)
    for m in members:
        k = names.index(m)
        edited[k] = train_expressions[:, k].max()
    return edited


def controllability(render: Callable[[np.ndarray], np.ndarray], tracker: FaceTracker,
                    train_expressions: np.ndarray, names: list[str], neutral: np.ndarray,
                    cfg: FidelityConfig, real_frame: Callable[[int], np.ndarray] | None = None,
                    neutral_index: int | None = None,
                    render_frame: Callable[[int], np.ndarray] | None = None) -> dict:
    """Render, track and compare: (i) neutral + one group at its trained maximum; (ii) the whole expression
    of the training frame where the group peaks — each against the neutral render.

    ``render(expression [52]) → [h, w, 3]`` float image (the caller fixes head pose, latent and size).
    With ``real_frame(j) → [h, w, 3]`` (training image j) and the neutral's training-frame index, the
    whole-vector way is also read on the real frames (peak frame vs neutral frame, same tracking): the
    reference for what the tracking sees of the change on the recording itself. With ``render_frame(j)``
    (training frame j rendered at its own pose and expression) the peak frame is also read there, beside the
    real peak frame: a gap that closes at the frame's own pose points at expression entangled with pose.
    """
    groups = controllable_groups(train_expressions, names, cfg.min_range)
    neutral_obs = track(tracker, render(neutral), cfg.track_size)
    real_neutral = None
    if real_frame is not None and neutral_index is not None:
        real_neutral = track(tracker, real_frame(neutral_index), cfg.track_size)
    result: dict = {"neutral_detected": neutral_obs is not None, "neutral_frame": neutral_index,
                    "groups": {}}
    for group, info in groups.items():
        members = CONTROL_GROUPS[group]
        row = dict(info)
        if not info["tested"]:
            row["reason"] = f"trained range {info['range']:.3f} < {cfg.min_range}"
            result["groups"][group] = row
            continue
        n_val = float(group_value(neutral, names, members))
        row["neutral_value"] = n_val
        tracked_neutral = float(group_value(neutral_obs.blendshapes, names, members)) if neutral_obs else None
        row["tracked_neutral"] = tracked_neutral
        ways = {"single": single_group_edit(neutral, train_expressions, names, members),
                "whole": np.asarray(train_expressions[info["peak_frame"]], np.float32)}
        for way, expr in ways.items():
            commanded = float(group_value(expr, names, members))
            obs = track(tracker, render(expr), cfg.track_size)
            tracked = float(group_value(obs.blendshapes, names, members)) if obs is not None else None
            ok = tracked is not None and tracked_neutral is not None
            row[way] = {"commanded_delta": commanded - n_val, "detected": obs is not None,
                        "tracked_delta": tracked - tracked_neutral if ok else None,
                        "response": response(tracked, tracked_neutral, commanded, n_val) if ok else None}
        peak = track(tracker, real_frame(info["peak_frame"]), cfg.track_size) if real_frame is not None else None
        if real_neutral is not None and peak is not None:
            row["whole"]["real_frames_response"] = response(
                float(group_value(peak.blendshapes, names, members)),
                float(group_value(real_neutral.blendshapes, names, members)),
                float(group_value(ways["whole"], names, members)), n_val)
        if render_frame is not None:
            own = track(tracker, render_frame(info["peak_frame"]), cfg.track_size)
            row["whole"]["own_pose"] = {
                "render": float(group_value(own.blendshapes, names, members)) if own is not None else None,
                "real_frame": float(group_value(peak.blendshapes, names, members)) if peak is not None else None}
        result["groups"][group] = row
    return result


# --- the driver

def measure(tracker_factory: Callable[[], FaceTracker], truths: list[np.ndarray], shown: dict[str, list[np.ndarray]],
            names: list[str], cfg: FidelityConfig, render: Callable[[np.ndarray], np.ndarray] | None = None,
            train_expressions: np.ndarray | None = None, neutral: np.ndarray | None = None,
            truth: tuple[list[str], np.ndarray] | None = None, notes: dict | None = None,
            real_frame: Callable[[int], np.ndarray] | None = None, neutral_index: int | None = None,
            render_frame: Callable[[int], np.ndarray] | None = None) -> dict:
    """The whole fidelity block: held-out (``heldout_fidelity``), controllability (when ``render`` is given)
    and, for a synthetic subject, correlations with ``truth`` = (channel names, ``[n, c]`` true values of
    the held-out frames)."""
    start = time.perf_counter()
    out: dict = {"config": asdict(cfg), **(notes or {})}
    with tracker_factory() as tracker:
        held = heldout_fidelity(tracker, truths, shown, cfg)
        tracked = held.pop("_tracked")
        out["heldout"] = held
        if truth is not None:
            out["truth"] = truth_correlations(tracked, names, truth[0], truth[1])
        if render is not None and cfg.controllability and train_expressions is not None and neutral is not None:
            out["controllability"] = controllability(render, tracker, train_expressions, names, neutral, cfg,
                                                     real_frame, neutral_index, render_frame)
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


# --- printing

def _f(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def format_tables(block: dict) -> str:
    """Markdown tables of a fidelity block (held-out rows, controllability, truth correlations)."""
    held = block["heldout"]
    und = held["undetected"]
    lines = [f"Expression fidelity (MediaPipe on {held['frames']} held-out frames, upscaled to "
             f"{block['config']['track_size']} px; real frames without a face: {und['real_frame']})", "",
             "| shown | AED ↓ | head-pose error ° ↓ | mouth PSNR ↑ | eye PSNR ↑ | whole PSNR ↑ | no face found |",
             "|---|---|---|---|---|---|---|"]
    for side in SIDES:
        if side not in held:
            continue
        m = held[side]
        lines.append(f"| {side.replace('_', ' ')} | {_f(m['aed'], '.4f')} | {_f(m['head_pose_error_deg'], '.2f')} | "
                     f"{_f(m['mouth_psnr'], '.2f')} | {_f(m['eye_psnr'], '.2f')} | {_f(m['whole_psnr'], '.2f')} | "
                     f"{und[side]} of {held['frames']} |")
    ctrl = block.get("controllability")
    if ctrl is not None:
        lines += ["", f"Controllability at {block.get('reference_pose', 'the reference head pose')}, from "
                      f"{block.get('neutral', 'the neutral expression')} (response 1.0 = MediaPipe sees all of it)"]
        if not ctrl["neutral_detected"]:
            lines.append("MediaPipe finds no face in the neutral render: controllability unavailable.")
        lines += ["", "| group | trained range | commanded Δ single | tracked Δ single | response single | "
                      "commanded Δ whole | tracked Δ whole | response whole | real frames, whole | "
                      "peak frame at its pose: render / real |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for group, r in ctrl["groups"].items():
            if not r["tested"]:
                lines.append(f"| {group} | {r['range']:.3f} | not tested ({r['reason']}) | | | | | | | |")
                continue
            s, w = r["single"], r["whole"]
            own = w.get("own_pose", {})
            lines.append(f"| {group} | {r['range']:.3f} | {s['commanded_delta']:+.3f} | {_f(s['tracked_delta'], '+.3f')} | "
                         f"{_f(s['response'], '.2f')} | {w['commanded_delta']:+.3f} | {_f(w['tracked_delta'], '+.3f')} | "
                         f"{_f(w['response'], '.2f')} | {_f(w.get('real_frames_response'), '.2f')} | "
                         f"{_f(own.get('render'), '.2f')} / {_f(own.get('real_frame'), '.2f')} |")
        lines.append("(real frames, whole: the same whole-vector change read on the real peak and neutral training "
                     "frames: what the same tracking sees on the recording itself; peak frame at its pose: the "
                     "tracked group score on the render of the peak training frame at its own pose and "
                     "expression, and on that real frame)")
    truth = block.get("truth")
    if truth:
        lines += ["", "Against the synthetic subject's truth.json (held-out frames): correlation of the tracked "
                      "group with the true value", "",
                  "| true channel | true range | MediaPipe group | avatar | nearest training frame | real frame |",
                  "|---|---|---|---|---|---|"]
        for channel, r in truth.items():
            lines.append(f"| {channel} | {r['true_range']:.2f} | {r['group']} | {_f(r.get('avatar'), '.2f')} | "
                         f"{_f(r.get('nearest_training_frame'), '.2f')} | {_f(r.get('real_frame'), '.2f')} |")
        lines.append("(n/a: fewer than 3 tracked frames, or the value does not vary over these frames)")
    return "\n".join(lines)
