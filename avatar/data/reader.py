"""The one reader of a prepared dataset directory (see :mod:`avatar.data.prepare` for the layout): splits,
frames, background and the full-frame plate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from avatar.base.errors import UserError
from avatar.base.fileio import read_json
from avatar.capture.tracking import (
    REGION_NAMES,
)

DATASET_FORMAT = "nerface-avatar-dataset/1"


SPLITS = ("train", "val", "test")


PLATE_FILE = "plate.png"


def read_transforms(directory: str | Path, split: str) -> dict:
    """Read and check one ``transforms_<split>.json`` of a dataset directory."""
    path = Path(directory) / f"transforms_{split}.json"
    if not path.is_file():
        raise UserError(f"{path} not found: is {directory} a dataset made by trainer/prepare.py?")
    meta = read_json(path)
    if meta.get("format") != DATASET_FORMAT:
        raise UserError(f"{path} has format {meta.get('format')!r}, expected {DATASET_FORMAT!r}; "
                        "re-run trainer/prepare.py")
    for key in ("intrinsics", "image_size", "expression_names", "frames"):
        if key not in meta:
            raise UserError(f"{path} lacks {key!r}")
    return meta


@dataclass
class FrameSet:
    """One split of a dataset in memory."""

    directory: Path
    images: np.ndarray | None  # [t, h, w, 3] uint8, or None when loaded without images
    poses: np.ndarray  # [t, 4, 4]
    expressions: np.ndarray  # [t, 52] float32
    bboxes: np.ndarray  # [t, 4] face boxes x0, y0, x1, y1 in pixels
    regions: np.ndarray | None  # [t, 3, 4] mouth, right-eye, left-eye boxes in pixels (None: older dataset)
    frame_indices: np.ndarray  # [t] index in the source video
    file_paths: list[str]
    intrinsics: np.ndarray  # [4]
    image_size: tuple[int, int]  # (width, height)
    expression_names: list[str]
    head_bounds: tuple[np.ndarray, np.ndarray]  # canonical cm min, max

    def __len__(self) -> int:
        return len(self.poses)

    def read_image(self, i: int) -> np.ndarray:
        return read_rgb(self.directory / self.file_paths[i])


def read_rgb(path: str | Path) -> np.ndarray:
    """RGB ``[h, w, 3] uint8`` from an image file, or a :class:`UserError`."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise UserError(f"cannot read image {path}")
    return bgr[..., ::-1].copy()


def load_split(directory: str | Path, split: str, with_images: bool = True) -> FrameSet:
    """The one loader of a prepared dataset split (frames, poses, expressions, boxes, camera)."""
    directory = Path(directory)
    meta = read_transforms(directory, split)
    frames = meta["frames"]
    w, h = meta["image_size"]
    images = None
    if with_images:
        images = np.zeros((len(frames), h, w, 3), np.uint8)
        for i, f in enumerate(frames):
            img = read_rgb(directory / f["file_path"])
            if img.shape[:2] != (h, w):
                raise UserError(f"{f['file_path']} is {img.shape[1]}x{img.shape[0]}, the dataset says {w}x{h}")
            images[i] = img
    bounds = meta.get("head_bounds") or {"min": [-12, -17, -15], "max": [12, 15, 10]}
    return FrameSet(
        directory=directory,
        images=images,
        poses=np.array([f["transform_matrix"] for f in frames], dtype=np.float64).reshape(-1, 4, 4),
        expressions=np.array([f["expression"] for f in frames], dtype=np.float32).reshape(len(frames), -1),
        bboxes=np.array([f["bbox"] for f in frames], dtype=np.float32).reshape(-1, 4),
        regions=_regions(frames, directory / f"transforms_{split}.json"),
        frame_indices=np.array([f.get("frame_index", i) for i, f in enumerate(frames)], dtype=np.int64),
        file_paths=[f["file_path"] for f in frames],
        intrinsics=np.asarray(meta["intrinsics"], dtype=np.float64),
        image_size=(int(w), int(h)),
        expression_names=list(meta["expression_names"]),
        head_bounds=(np.asarray(bounds["min"], float), np.asarray(bounds["max"], float)),
    )


def _regions(frames: list[dict], path: Path) -> np.ndarray | None:
    """``[t, 3, 4]`` region boxes (:data:`REGION_NAMES` order), or None for a dataset made before they existed."""
    if not frames or not all("regions" in f for f in frames):
        return None
    try:
        boxes = np.array([[f["regions"][k] for k in REGION_NAMES] for f in frames], dtype=np.float32)
    except (KeyError, TypeError, ValueError):
        boxes = None
    if boxes is None or boxes.shape != (len(frames), len(REGION_NAMES), 4):
        raise UserError(f"{path}: malformed frame regions; prepare the dataset again with trainer/prepare.py")
    return boxes


def load_full_frame(directory: str | Path) -> tuple[dict, np.ndarray] | None:
    """The recording's framing: ``({"crop": [x0, y0, side], "source_size": [w, h]}, plate [H, W, 3] uint8)``,
    or None for a dataset prepared before it was kept (its avatars output the square crop)."""
    info = read_transforms(directory, "train").get("full_frame")
    if not info:
        return None
    try:
        x0, y0, side = (int(v) for v in info["crop"])
        sw, sh = (int(v) for v in info["source_size"])
        name = str(info.get("plate", PLATE_FILE))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{directory}: malformed 'full_frame' in its transforms; prepare it again") from None
    if side <= 0 or sw <= 0 or sh <= 0 or Path(name).name != name:
        raise UserError(f"{directory}: malformed 'full_frame' in its transforms; prepare it again")
    plate = read_rgb(Path(directory) / name)
    return {"crop": [x0, y0, side], "source_size": [sw, sh]}, plate


def load_background(directory: str | Path) -> np.ndarray:
    path = Path(directory) / "background.png"
    if not path.is_file():
        raise UserError(f"{directory} lacks background.png: is it a dataset made by trainer/prepare.py?")
    return read_rgb(path)
