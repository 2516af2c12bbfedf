import json

import numpy as np
import pytest

from avatar.dataset import SPLITS, PrepareConfig, prepare_dataset, read_transforms, split_indices
from avatar.errors import UserError
from avatar.video import VideoWriter
from tests.conftest import ROOT, run_script


def check_dataset(d, size, tracked):
    count = 0
    for split in SPLITS:
        meta = read_transforms(d, split)
        assert meta["image_size"] == [size, size] and len(meta["intrinsics"]) == 4
        assert len(meta["expression_names"]) == 52
        for f in meta["frames"]:
            assert (d / f["file_path"]).is_file()
            assert np.array(f["transform_matrix"]).shape == (4, 4)
            assert len(f["expression"]) == 52 and len(f["bbox"]) == 4
        count += len(meta["frames"])
    assert count == tracked
    assert (d / "background.png").is_file()


@pytest.mark.parametrize("background", ["given", "auto"])
def test_prepare_synthetic_subject(subject, tmp_path, background):
    out = tmp_path / "data"
    bg = str(subject / "background.png") if background == "given" else "auto"
    report = prepare_dataset(PrepareConfig(video=str(subject / "video.mp4"), out=str(out), background=bg,
                                           size=96), progress=False, log=lambda s: None)
    assert report["frames_tracked"] >= 0.95 * report["frames_total"]
    assert report["reprojection_error_face_width"] <= 0.015
    check_dataset(out, 96, report["frames_tracked"])
    test = read_transforms(out, "test")["frames"]
    train = read_transforms(out, "train")["frames"]
    assert min(f["frame_index"] for f in test) > max(f["frame_index"] for f in train)  # held-out tail
    assert json.loads((out / "report.json").read_text())["background"] == ("auto" if bg == "auto" else bg)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_split_indices():
    s = split_indices(120, 0.17, 0.05)
    assert len(s["test"]) == 20 and s["test"][0] == 100
    assert len(s["val"]) >= 1 and not set(s["val"]) & set(s["train"])
    assert sum(len(v) for v in s.values()) == 120


def test_prepare_cli_and_existing_output(subject, tmp_path):
    out = tmp_path / "cli"
    r = run_script("trainer/prepare.py", str(subject / "video.mp4"), "--out", str(out), "--size", "64")
    assert r.returncode == 0, r.stderr
    assert "reprojection error" in r.stdout
    again = run_script("trainer/prepare.py", str(subject / "video.mp4"), "--out", str(out), "--size", "64")
    assert again.returncode != 0 and "already exists" in again.stderr


def no_face_video(path):
    rng = np.random.default_rng(0)
    with VideoWriter(path, 96, 96, 10) as w:
        for _ in range(8):
            w.write(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))
    return path


@pytest.mark.parametrize("case", ["missing", "not_a_video", "no_face", "bad_model", "bad_background"])
def test_bad_input_one_line_nonzero_nothing_written(case, subject, tmp_path):
    out = tmp_path / "X"
    video, extra = str(subject / "video.mp4"), []
    if case == "missing":
        video = str(tmp_path / "nope.mp4")
    elif case == "not_a_video":
        video = str(ROOT / "README.md")
    elif case == "no_face":
        video = str(no_face_video(tmp_path / "noise.mp4"))
    elif case == "bad_model":
        extra = ["--landmarker", str(tmp_path / "missing.task")]
    elif case == "bad_background":
        extra = ["--background", str(ROOT / "README.md")]
    r = run_script("trainer/prepare.py", video, "--out", str(out), *extra)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".X")]


def test_prepare_refuses_bad_fraction(subject, tmp_path):
    with pytest.raises(UserError):
        prepare_dataset(PrepareConfig(video=str(subject / "video.mp4"), out=str(tmp_path / "o"), test_fraction=1.5),
                        progress=False)
