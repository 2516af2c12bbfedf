"""Atomic writes: files and whole directories appear complete or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, fsync, then rename over ``path`` (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` for a writer that wants a file name (``torch.onnx.export``); when the
    block ends normally the file is fsynced and renamed over ``path``, on any exception it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=indent, default=_json_default).encode())


@contextlib.contextmanager
def atomic_directory(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``final``; on success it is renamed to ``final``.

    On any exception (including Ctrl-C) the temporary directory is removed, so no half-written
    output is ever left under the final name. With ``overwrite`` an existing ``final`` is replaced
    only after the new one is complete.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        from avatar.base.errors import UserError

        raise UserError(f"{final} already exists (pass --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; invalid JSON (or a non-object top level) is a one-line :class:`UserError`."""
    from avatar.base.errors import UserError

    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


# -- safetensors with a checksum ---------------------------------------------------------------------------------
# A safetensors file is an 8-byte header length, a JSON header, then raw tensor bytes. A flipped bit in the raw
# bytes still loads (as a wrong number somewhere), so the writer stores the SHA-256 of those bytes in the
# header's metadata and the reader checks it. Files written before this (no checksum) load unchecked.
CHECKSUM_KEY = "sha256"


def _split_safetensors(data: bytes) -> tuple[dict, bytes]:
    """(header dict, raw tensor bytes) of a safetensors buffer; ValueError when it is not one."""
    if len(data) < 8:
        raise ValueError("file too short")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise ValueError("header length beyond the end of the file (truncated?)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable header ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError("unreadable header")
    return header, data[8 + n:]


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """``tensors`` (name → torch tensor) as safetensors bytes whose metadata holds the data's SHA-256."""
    import hashlib

    from safetensors.torch import save

    metadata = dict(metadata or {})
    first = save(tensors, metadata=metadata)
    _, raw = _split_safetensors(first)  # the data section does not depend on the header's contents
    return save(tensors, metadata={**metadata, CHECKSUM_KEY: hashlib.sha256(raw).hexdigest()})


def read_safetensors(path: str | Path, what: str = "file", fix: str = "") -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) from a safetensors file, checking its checksum when it has one. A missing,
    truncated, bit-flipped or malformed file is a one-line :class:`UserError` naming ``what`` and ``fix``."""
    import hashlib

    from safetensors import SafetensorError
    from safetensors.torch import load

    from avatar.base.errors import DamagedFile, UserError

    path = Path(path)
    hint = f"; {fix}" if fix else ""
    try:
        data = path.read_bytes()
        header, raw = _split_safetensors(data)
        meta = header.get("__metadata__") or {}
        expected = meta.get(CHECKSUM_KEY)
        if expected is not None and hashlib.sha256(raw).hexdigest() != expected:
            raise DamagedFile(f"{path} ({what}) is damaged: its contents do not match their checksum{hint}")
        tensors = load(data)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path} ({what}) is missing{hint}") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise DamagedFile(f"{path} ({what}) is not a readable safetensors file ({str(exc).splitlines()[0][:160]}){hint}") from None
    return tensors, dict(meta)
