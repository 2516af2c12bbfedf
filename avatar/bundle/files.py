"""The files ``export/build.py`` adds to a bundle: the occupancy cache the engines cull with, the ONNX graphs, the
TensorRT plan and ``engines.json`` (parity figures and measured frames/s).
"""

from __future__ import annotations

from pathlib import Path

import torch

from avatar.base.errors import DamagedFile
from avatar.base.fileio import read_json
from avatar.render.grid import OccupancyGrid

ONNX_MODEL, ONNX_BLEND, OCCUPANCY_CACHE, ENGINES_FILE = "model.onnx", "blend.onnx", "occupancy.safetensors", "engines.json"


TRT_MODEL = "model.plan"


def save_occupancy_cache(path: str | Path, grid: OccupancyGrid, step: float) -> None:
    """The grid the engines cull with (fine mask, its coarse level, the box, the marching step), atomically."""
    from avatar.base.fileio import safetensors_bytes, write_bytes_atomic

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


def engines_record(directory: str | Path) -> dict:
    path = Path(directory) / ENGINES_FILE
    return read_json(path) if path.is_file() else {}
