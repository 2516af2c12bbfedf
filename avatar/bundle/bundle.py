"""The avatar bundle: ``avatar.json`` + ``weights.safetensors`` + ``background.png`` (+ ``plate.png``). Never a
pickle.

Version 2 adds ``full_frame`` to ``avatar.json`` — where the head crop sits in the recording (``crop`` = x0, y0,
side and ``source_size``, in the recording's pixels) — and ``plate.png``, the empty scene at the recording's
framing: the live loop composites the head into it and sends a camera-shaped picture. Version 1 bundles still
load; they have neither, and their output stays the square crop they had.

This module (with :mod:`avatar.bundle.files`) is the one way to write and read a bundle; the trainer, evaluator, renderer, exporter and
live loop all go through it. A bundle from someone else is data only: JSON, raw tensors and an image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from avatar.base.errors import UserError
from avatar.base.fileio import (
    read_json,
    read_safetensors,
    safetensors_bytes,
    write_bytes_atomic,
    write_json_atomic,
)
from avatar.field.model import Avatar, SamplingConfig
from avatar.field.upsample import UPSAMPLER_FILE, load_upsampler

BUNDLE_FORMAT = "nerface-avatar-bundle"


BUNDLE_VERSION = 2


READABLE_VERSIONS = (1, 2)  # 1: no full frame (square output)


META_FILE, WEIGHTS_FILE, BACKGROUND_FILE, PLATE_FILE = "avatar.json", "weights.safetensors", "background.png", "plate.png"


@dataclass
class LoadedAvatar:
    model: Avatar
    meta: dict
    background: torch.Tensor  # [h, w, 3] float in [0, 1]
    plate: np.ndarray | None = None  # [H, W, 3] uint8: the empty scene at the recording's framing (version ≥ 2)
    upsampler: object | None = None  # avatar.field.upsample.Upsampler when the bundle has one (trainer/upsample.py)

    @property
    def full_frame(self) -> dict | None:
        """``{"crop": [x0, y0, side], "source_size": [w, h]}`` in the recording's pixels, or None (square output)."""
        return self.meta.get("full_frame") if self.plate is not None else None

    @property
    def intrinsics(self) -> np.ndarray:
        return np.asarray(self.meta["intrinsics"], dtype=np.float64)

    @property
    def image_size(self) -> tuple[int, int]:
        w, h = self.meta["image_size"]
        return int(w), int(h)

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(**self.meta["sampling"])

    def latent(self, index: int = 0) -> torch.Tensor:
        return self.model.latents[index].detach()


def save_bundle(directory: str | Path, model: Avatar, meta: dict, background: np.ndarray,
                full_frame: tuple[dict, np.ndarray] | None = None) -> None:
    """Write the bundle files atomically; ``avatar.json`` goes last, so its presence means complete.
    ``full_frame``: ``(info, plate [H, W, 3] uint8)`` from :func:`avatar.dataset.load_full_frame`."""
    directory = Path(directory)
    # Weights are stored at half precision (half the size, no visible change); loading restores float32.
    tensors = {k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    ok, png = cv2.imencode(".png", np.ascontiguousarray(background[..., ::-1]))
    full = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "field": model.field_name,
            "field_hparams": model.hparams, "latent_dim": int(model.latents.shape[1]),
            "num_latents": int(model.latents.shape[0]), "weights": WEIGHTS_FILE, "background": BACKGROUND_FILE,
            "weights_dtype": "float16",
            "occupancy_resolution": int(model.occupancy.resolution) if hasattr(model, "occupancy") else None,
            **{k: v for k, v in meta.items() if k not in ("format", "version", "full_frame")}}
    if full_frame is not None:
        full["full_frame"] = {**full_frame[0], "plate": PLATE_FILE}
        ok_plate, plate_png = cv2.imencode(".png", np.ascontiguousarray(full_frame[1][..., ::-1]))
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(directory / WEIGHTS_FILE, safetensors_bytes(tensors))
        write_bytes_atomic(directory / BACKGROUND_FILE, png.tobytes())
        if full_frame is not None:
            write_bytes_atomic(directory / PLATE_FILE, plate_png.tobytes())
        write_json_atomic(directory / META_FILE, full)
    except OSError as exc:  # disk full, a file-size limit: each file written so far is whole, none half-written
        raise UserError(f"cannot write the avatar bundle into {directory} ({exc.strerror or exc})") from None


def _is_matrix(value, rows: int, cols: int) -> bool:
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return a.shape == (rows, cols) and bool(np.isfinite(a).all())


def check_meta(meta: dict, meta_path: Path) -> None:
    """Refuse an ``avatar.json`` whose values have the wrong types or shapes (valid JSON is not a valid bundle):
    one line naming the key, instead of a traceback deep in the renderer."""
    hp = meta["field_hparams"]
    if not isinstance(hp, dict):
        raise UserError(f"{meta_path}: 'field_hparams' must be an object")
    dim = hp.get("expression_dim", 52)
    checks = {
        "intrinsics": _is_matrix([meta["intrinsics"]], 1, 4),  # fx, fy, cx, cy
        "image_size": (isinstance(meta["image_size"], list) and len(meta["image_size"]) == 2
                       and all(isinstance(v, int) and 0 < v <= 8192 for v in meta["image_size"])),
        "expression_names": (isinstance(meta["expression_names"], list) and len(meta["expression_names"]) == dim
                             and all(isinstance(n, str) for n in meta["expression_names"])),
        "latent_dim": isinstance(meta["latent_dim"], int) and 0 < meta["latent_dim"] <= 4096,
        "num_latents": isinstance(meta["num_latents"], int) and 0 < meta["num_latents"] <= 1_000_000,
        "sampling": isinstance(meta["sampling"], dict),
    }
    if "reference_head_pose" in meta:
        checks["reference_head_pose"] = _is_matrix(meta["reference_head_pose"], 4, 4)
    if "full_frame" in meta:
        ff = meta["full_frame"]
        checks["full_frame"] = (isinstance(ff, dict) and _is_matrix([ff.get("crop")], 1, 3)
                                and _is_matrix([ff.get("source_size")], 1, 2) and ff.get("plate") == PLATE_FILE
                                and min(ff["crop"][2], *ff["source_size"]) > 0)
    if "expression_stats" in meta:
        stats = meta["expression_stats"]
        checks["expression_stats"] = isinstance(stats, dict) and all(
            _is_matrix([stats.get(k)], 1, dim) for k in ("neutral", "min", "max"))
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise UserError(f"{meta_path}: {bad[0]!r} has the wrong type or shape (a damaged or hand-edited bundle)")
    try:
        SamplingConfig(**meta["sampling"])
    except TypeError as exc:
        raise UserError(f"{meta_path}: bad 'sampling' ({exc})") from None


def load_bundle(directory: str | Path, device: str | torch.device = "cpu") -> LoadedAvatar:
    """Open a bundle safely; another format version, a missing file or a missing tensor is a :class:`UserError`."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise UserError(f"{directory} is not an avatar bundle (no {META_FILE}); make one with trainer/fit.py")
    meta = read_json(meta_path)
    if meta.get("format") != BUNDLE_FORMAT or meta.get("version") not in READABLE_VERSIONS:
        raise UserError(f"{directory} is bundle format {meta.get('format')!r} version {meta.get('version')!r}; "
                        f"this program reads {BUNDLE_FORMAT!r} versions "
                        f"{', '.join(map(str, READABLE_VERSIONS))} — retrain or convert it")
    for key in ("field", "field_hparams", "latent_dim", "num_latents", "intrinsics", "image_size",
                "expression_names", "sampling"):
        if key not in meta:
            raise UserError(f"{meta_path} lacks {key!r}")
    check_meta(meta, meta_path)
    hp = dict(meta["field_hparams"])
    hp.pop("latent_dim", None)
    try:
        model = Avatar(meta["field"], hp, meta["num_latents"], meta["latent_dim"],
                       occupancy_resolution=int(meta.get("occupancy_resolution") or 64))
    except (TypeError, ValueError) as exc:
        raise UserError(f"{meta_path}: bad field description ({exc})") from None
    weights_path = directory / meta.get("weights", WEIGHTS_FILE)
    if not weights_path.is_file():
        raise UserError(f"{directory} lacks its weights file {weights_path.name}")
    tensors, _ = read_safetensors(weights_path, "the avatar's weights", "copy the bundle again or retrain it")
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise UserError(f"{weights_path} lacks tensor {missing[0]!r} ({len(missing)} missing): incomplete bundle")
    wrong = [k for k in expected if tensors[k].shape != expected[k].shape]
    if wrong:
        raise UserError(f"{weights_path}: tensor {wrong[0]!r} has shape {tuple(tensors[wrong[0]].shape)}, "
                        f"expected {tuple(expected[wrong[0]].shape)}")
    model.load_state_dict({k: tensors[k].to(expected[k].dtype) for k in expected})
    model.to(device).eval()
    bg_path = directory / meta.get("background", BACKGROUND_FILE)
    bgr = cv2.imread(str(bg_path), cv2.IMREAD_COLOR) if bg_path.is_file() else None
    if bgr is None:
        raise UserError(f"{directory} lacks a readable background image {bg_path.name}")
    background = torch.from_numpy(bgr[..., ::-1].astype(np.float32) / 255.0)
    plate = None
    if "full_frame" in meta:
        plate_bgr = cv2.imread(str(directory / PLATE_FILE), cv2.IMREAD_COLOR)
        if plate_bgr is None:
            raise UserError(f"{directory} lacks a readable {PLATE_FILE} (its avatar.json says it has one): copy the "
                            "whole bundle again")
        plate = np.ascontiguousarray(plate_bgr[..., ::-1])
    upsampler = None
    if (directory / UPSAMPLER_FILE).is_file():  # optional: trained after the field (trainer/upsample.py)
        upsampler, _ = load_upsampler(directory / UPSAMPLER_FILE)
    return LoadedAvatar(model, meta, background, plate, upsampler)
