"""The files ``export/build.py`` adds to a bundle — the occupancy cache the engines cull with, the ONNX graphs, the
TensorRT plan and ``engines.json`` (parity figures, measured frames/s, and what ties the export to its bundle) —
and :func:`bundle_files`, every file a bundle may hold. The engines and the exporter read and write these files
only through the functions here; every write is atomic (a temporary sibling renamed into place).

``engines.json`` records this program's bundle format version and the SHA-256 of ``weights.safetensors`` at
export time: :func:`stale_export_reason` compares them with the bundle as it is now, so ONNX graphs and a
TensorRT plan exported from other weights (an avatar retrained into the same folder) are never taken for
current ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
from pathlib import Path
from typing import Iterator

import torch

from avatar.base.errors import DamagedFile, UserError
from avatar.base.fileio import atomic_path, read_json, write_bytes_atomic, write_json_atomic
from avatar.bundle.bundle import BACKGROUND_FILE, BUNDLE_VERSION, META_FILE, PLATE_FILE, WEIGHTS_FILE
from avatar.field.upsample import UPSAMPLER_FILE
from avatar.render.grid import OccupancyGrid

ONNX_MODEL, ONNX_BLEND, OCCUPANCY_CACHE, ENGINES_FILE = "model.onnx", "blend.onnx", "occupancy.safetensors", "engines.json"
ONNX_SHADE = "shade.onnx"  # a deferred-shading field's per-pixel MLP


TRT_MODEL = "model.plan"


METRICS_FILE = "metrics.json"  # the evaluation report (trainer/fit.py, trainer/evaluate.py)


# Files export/build.py writes; engines.json may list all but itself.
EXPORT_FILES = (OCCUPANCY_CACHE, ONNX_BLEND, ONNX_MODEL, ONNX_SHADE, TRT_MODEL, ENGINES_FILE)


# Every file a bundle may hold, in the order a listing shows them.
BUNDLE_FILES = (META_FILE, WEIGHTS_FILE, BACKGROUND_FILE, PLATE_FILE, UPSAMPLER_FILE, *EXPORT_FILES, METRICS_FILE)


def bundle_files(directory: str | Path) -> list[Path]:
    """The files of :data:`BUNDLE_FILES` that the bundle in ``directory`` holds (training leftovers such as the
    checkpoint or TensorBoard logs are not part of a bundle)."""
    directory = Path(directory)
    return [directory / name for name in BUNDLE_FILES if (directory / name).is_file()]


def _export_hint(directory: Path, engine: str = "") -> str:
    return f"python export/build.py {directory}" + (f" --build {engine}" if engine else "")


# -- the occupancy cache -----------------------------------------------------------------------------------------
def save_occupancy_cache(path: str | Path, grid: OccupancyGrid, step: float) -> None:
    """The grid the engines cull with (fine mask, its coarse level, the box, the marching step), atomically."""
    from avatar.base.fileio import safetensors_bytes

    tensors = {"mask": grid.mask.to(torch.uint8).contiguous(), "coarse": grid.coarse_mask().to(torch.uint8).contiguous(),
               "box_min": grid.box_min.float().contiguous(), "box_max": grid.box_max.float().contiguous()}
    write_bytes_atomic(path, safetensors_bytes(tensors, metadata={"step": repr(float(step)), "coarse_factor": str(grid.coarse_factor)}))


def load_occupancy_cache(path: str | Path) -> tuple[OccupancyGrid, float]:
    from avatar.base.fileio import read_safetensors

    t, meta = read_safetensors(path, "the occupancy cache", "rebuild it with export/build.py")
    try:
        r = int(t["mask"].shape[0])
        if tuple(t["mask"].shape) != (r, r, r) or t["box_min"].shape != (3,) or t["box_max"].shape != (3,):
            raise ValueError("tensors of the wrong shape")
        grid = OccupancyGrid(t["box_min"], t["box_max"], resolution=r)
        grid.mask = t["mask"].bool()
        grid.coarse_factor = int(meta.get("coarse_factor", 4))
        return grid, float(meta["step"])
    except (KeyError, ValueError, RuntimeError, IndexError) as exc:
        raise DamagedFile(f"{path} is not a readable occupancy cache ({exc}); rebuild it with export/build.py") from None


# -- ONNX graphs and the TensorRT plan ---------------------------------------------------------------------------
@contextlib.contextmanager
def onnx_destination(directory: str | Path, name: str) -> Iterator[Path]:
    """A temporary path to export the graph ``name`` (:data:`ONNX_MODEL`, :data:`ONNX_BLEND` or :data:`ONNX_SHADE`)
    to; when the block ends normally it is moved into place atomically, on an exception it is removed."""
    if name not in (ONNX_MODEL, ONNX_BLEND, ONNX_SHADE):
        raise ValueError(f"{name!r} is not an ONNX graph of a bundle")
    with atomic_path(Path(directory) / name) as tmp:
        yield tmp


def exported_files(directory: str | Path, names: tuple[str, ...], engine: str = "") -> list[Path]:
    """The paths of the exported files ``names``; one that is not there is a :class:`UserError` saying how to
    export it (``engine``: the ``--build`` choice of export/build.py that writes it)."""
    directory = Path(directory)
    for name in names:
        if not (directory / name).is_file():
            raise UserError(f"{directory} has no {name}; export it first: {_export_hint(directory, engine)}")
    return [directory / name for name in names]


def read_exported(directory: str | Path, name: str, engine: str = "") -> bytes:
    """The bytes of the exported file ``name`` (the ONNX graph TensorRT builds from, the TensorRT plan)."""
    return exported_files(directory, (name,), engine)[0].read_bytes()


def save_tensorrt_plan(directory: str | Path, plan: bytes) -> None:
    write_bytes_atomic(Path(directory) / TRT_MODEL, plan)


# -- engines.json ------------------------------------------------------------------------------------------------
_RECORD_TYPES = {"fps": dict, "parity": dict, "auto": str, "files": dict, "bundle_version": int,
                 "weights_sha256": str, "size": int, "frames": int}


def listed_files(record: dict) -> list[str]:
    """The file names under an engines record's ``files`` (each value a name or a list of names)."""
    names: list[str] = []
    for value in record.get("files", {}).values():
        names.extend(value if isinstance(value, list) else [value])
    return names


def _record_problem(directory: Path, record: dict) -> str | None:
    """What is wrong with an engines record (wrong field types, a listed file missing), or None."""
    for key, kind in _RECORD_TYPES.items():
        if key in record and (not isinstance(record[key], kind) or isinstance(record[key], bool)):
            return f"{key!r} is not a JSON {'object' if kind is dict else kind.__name__}"
    fps = record.get("fps", {})
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
               for v in fps.values()):
        return "'fps' holds something other than positive numbers"
    if "weights_sha256" in record and not re.fullmatch("[0-9a-f]{64}", record["weights_sha256"]):
        return "'weights_sha256' is not a SHA-256"
    values = record.get("files", {}).values()
    if not all(isinstance(n, str) for v in values for n in (v if isinstance(v, list) else [v])):
        return "'files' holds something other than file names"
    for name in listed_files(record):
        if name not in EXPORT_FILES or name == ENGINES_FILE:
            return f"it lists {name!r}, which is not an exported file"
        if not (directory / name).is_file():
            return f"it lists {name}, which is missing"
    return None


def engines_record(directory: str | Path) -> dict:
    """``engines.json`` of the bundle in ``directory``, checked; ``{}`` when there is none. Invalid JSON, a
    field of the wrong type or a listed file that is missing is a one-line :class:`DamagedFile`."""
    directory = Path(directory)
    path = directory / ENGINES_FILE
    if not path.is_file():
        return {}
    try:
        record = read_json(path)
    except UserError as exc:
        raise DamagedFile(f"{exc}; re-run {_export_hint(directory)}") from None
    problem = _record_problem(directory, record)
    if problem:
        raise DamagedFile(f"{path} is damaged ({problem}); re-run {_export_hint(directory)}")
    return record


def check_engine_files(directory: str | Path) -> None:
    """Refuse a bundle whose exported files are damaged (the occupancy cache, ``engines.json``), whichever
    engine runs: a damaged bundle is a :class:`DamagedFile` even for an engine that does not read them."""
    cache = Path(directory) / OCCUPANCY_CACHE
    if cache.is_file():
        load_occupancy_cache(cache)
    engines_record(directory)


def weights_sha256(directory: str | Path) -> str:
    """The SHA-256 of the bundle's weights file (as named by its ``avatar.json``)."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    name = read_json(meta_path).get("weights", WEIGHTS_FILE) if meta_path.is_file() else WEIGHTS_FILE
    digest = hashlib.sha256()
    try:
        with open(directory / str(name), "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise UserError(f"cannot read the weights of {directory} ({exc.strerror or exc})") from None
    return digest.hexdigest()


def export_identity(directory: str | Path) -> dict:
    """What ties an export to its bundle: this program's bundle format version and the weights' SHA-256."""
    return {"bundle_version": BUNDLE_VERSION, "weights_sha256": weights_sha256(directory)}


def stale_export_reason(directory: str | Path, record: dict) -> str | None:
    """Why the export that ``record`` describes does not belong to the bundle as it is now, or None."""
    if "weights_sha256" not in record or "bundle_version" not in record:
        return f"its {ENGINES_FILE} is from an older exporter that did not record the weights"
    if record["bundle_version"] != BUNDLE_VERSION:
        return f"it was exported for bundle format version {record['bundle_version']}, this program's is {BUNDLE_VERSION}"
    if record["weights_sha256"] != weights_sha256(directory):
        return "the weights changed since the export (retrained into the same folder?)"
    return None


def current_export(directory: str | Path, needs: tuple[str, ...] = (), engine: str = "") -> dict:
    """The checked engines record of a current export that lists the files ``needs``; a missing or stale export,
    or one without those files, is a one-line :class:`UserError` saying how to export again (``engine``: the
    ``--build`` choice of export/build.py that writes them)."""
    directory = Path(directory)
    record = engines_record(directory)
    if not record:
        raise UserError(f"{directory} has no {ENGINES_FILE}; export it first: {_export_hint(directory, engine)}")
    reason = stale_export_reason(directory, record)
    if reason:
        raise UserError(f"the exported engines in {directory} are stale ({reason}); "
                        f"re-run {_export_hint(directory, engine)}")
    missing = [name for name in needs if name not in listed_files(record)]
    if missing:
        raise UserError(f"the export in {directory} has no {missing[0]}; export it: {_export_hint(directory, engine)}")
    return record


def export_is_current(directory: str | Path) -> bool:
    """Whether ``directory`` holds a whole export made from its present weights by this program."""
    try:
        current_export(directory)
    except UserError:
        return False
    return True


def begin_export(directory: str | Path) -> dict:
    """Remove ``engines.json`` before the exporter replaces the files it describes, so that an export cut short
    is never taken for a current one. Returns the previous record when it was current (its TensorRT plan,
    built from the same weights, stays valid), else ``{}``."""
    directory = Path(directory)
    try:
        previous = current_export(directory)
    except UserError:
        previous = {}
    (directory / ENGINES_FILE).unlink(missing_ok=True)
    return previous


def save_engines_record(directory: str | Path, record: dict, identity: dict) -> None:
    """Write ``engines.json`` atomically: ``record`` with ``identity`` (:func:`export_identity`, taken when the
    export began). It goes last, after every file it lists."""
    directory = Path(directory)
    full = {**record, **identity}
    problem = _record_problem(directory, full)
    if problem:
        raise ValueError(f"not a valid engines record: {problem}")
    write_json_atomic(directory / ENGINES_FILE, full)
