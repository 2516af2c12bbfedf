"""Expression fidelity read back with MediaPipe (avatar/fidelity.py, trainer/evaluate.py's fidelity block)."""

import json

import numpy as np
import pytest

from avatar.bundle.reference import expression_stats
from avatar.capture import camera
from avatar.capture.tracking import BLENDSHAPE_NAMES, FaceTracker
from avatar.data.reader import load_split
from avatar.eval import fidelity
from tests.conftest import run_script

CFG = fidelity.FidelityConfig()


@pytest.fixture(scope="module")
def tracker():
    with FaceTracker("image") as t:
        yield t


@pytest.fixture(scope="module")
def splits(dataset64):
    return load_split(dataset64, "train"), load_split(dataset64, "test")


def as_float(img):
    return img.astype(np.float32) / 255.0


def test_small_math():
    names = list(BLENDSHAPE_NAMES)
    a = np.zeros(52)
    b = a.copy()
    b[0] = 1.0  # `_neutral` is not an expression
    assert fidelity.expression_distance(a, b, names) == 0.0
    b[names.index("jawOpen")] = 0.51
    assert fidelity.expression_distance(a, b, names) == pytest.approx(0.01)
    yaw = camera.make_pose(camera.euler_to_matrix(10, 0, 0), np.zeros(3))
    scaled = yaw.copy()
    scaled[:3, :3] *= 1.3  # MediaPipe's matrix may carry a scale: the angle must not see it
    assert fidelity.head_rotation_error_deg(np.eye(4), scaled) == pytest.approx(10, abs=1e-6)
    assert fidelity.response(0.3, 0.1, 0.5, 0.1) == pytest.approx(0.5)
    assert fidelity.response(0.3, 0.1, 0.1, 0.1) is None  # nothing commanded: no share to report
    assert fidelity.correlation([1, 2, 3], [2, 4, 7]) > 0.9
    assert fidelity.correlation([1, 2, 3], [5, 5, 5]) is None


def test_reference_pose_is_the_resting_pose_not_the_most_frontal():
    """Controllability and edits start from the reference pose with the neutral expression: it must be a pose the
    calm frames hold, not a frontal one the video passes through only while making faces."""
    from avatar.bundle.reference import reference_pose

    rng = np.random.default_rng(0)
    poses, exprs = [], []
    for i in range(40):
        calm = i % 2 == 0
        ypr = (rng.normal(0, 1.5, 3) + ([4.0, -12.0, 3.0] if calm else [0.0, 0.0, 0.0])).tolist()
        poses.append(camera.make_pose(camera.euler_to_matrix(*ypr), np.array([0.0, 0.0, -40.0])))
        e = np.zeros(len(BLENDSHAPE_NAMES))
        e[1:] = 0.0 if calm else 0.4
        exprs.append(e)
    poses, exprs = np.array(poses), np.array(exprs)
    ref = reference_pose(poses, exprs)
    calm_rows = np.arange(0, 40, 2)
    assert any(np.allclose(ref, poses[r]) for r in calm_rows)
    assert camera.rotation_angle_deg(ref[:3, :3], camera.euler_to_matrix(4.0, -12.0, 3.0)) < 4.0
    # without expressions: the typical pose of all frames (between the two clusters), still a training pose
    mid = reference_pose(poses)
    assert any(np.allclose(mid, p) for p in poses)


def test_aed_zero_for_the_real_frame_positive_for_another_and_misses_counted(splits, tracker):
    train, test = splits
    truths = [as_float(test.images[k]) for k in range(3)]
    others = [as_float(train.images[k]) for k in (0, 10, 20)]
    others[2] = np.full_like(others[2], 0.5)  # no face: counted, not hidden
    held = fidelity.heldout_fidelity(tracker, truths, {"avatar": truths, "nearest_training_frame": others}, CFG)
    same, other = held["avatar"], held["nearest_training_frame"]
    assert held["undetected"] == {"real_frame": 0, "avatar": 0, "nearest_training_frame": 1}
    assert same["aed"] == 0.0 and same["head_pose_error_deg"] < 1e-3 and same["aed_frames"] == 3
    assert other["aed"] > 0.01 and other["head_pose_error_deg"] > 0.5 and other["aed_frames"] == 2
    assert same["mouth_psnr"] == float("inf") and np.isfinite(other["mouth_psnr"])
    assert other["region_frames"] == 3  # regions come from the real frame, so the blank one is still scored


def test_region_masks_cover_the_mouth_and_the_eyes(splits, tracker):
    _, test = splits
    img = test.images[0]
    obs = fidelity.track(tracker, img, CFG.track_size)
    h, w = img.shape[:2]
    masks = fidelity.region_masks(obs.landmarks, w, h, CFG.region_dilation)
    px = np.clip(np.round(obs.landmarks[:, :2] * [w, h]).astype(int), 0, [w - 1, h - 1])
    inside = lambda name, ids: masks[name][px[list(ids), 1], px[list(ids), 0]]
    lips = fidelity.region_polygons()["mouth"][0]
    assert inside("mouth", lips).all() and inside("mouth", (13, 14)).all()  # lips and the gap between them
    assert inside("eyes", (159, 145, 386, 374, 105, 334)).all()  # both eyelids and brows
    assert not inside("mouth", (159, 386)).any() and not inside("eyes", (13, 14)).any()
    face_box = np.prod(np.ptp(obs.landmarks[:, :2] * [w, h], axis=0))
    assert 0.02 < masks["mouth"].sum() / face_box < 0.15  # the mouth, not the lower face
    assert 0.04 < masks["eyes"].sum() / face_box < 0.3
    assert fidelity.masked_psnr(as_float(img), as_float(img), np.zeros((h, w), bool)) is None


def test_controllability_is_zero_for_a_frozen_renderer_and_the_recordings_own_for_real_frames(splits, tracker):
    train, _ = splits
    names = train.expression_names
    neutral = np.asarray(expression_stats(train.expressions)["neutral"], np.float32)
    neutral_index = int(np.abs(train.expressions - neutral).sum(1).argmin())
    real = lambda j: as_float(train.images[j])

    def lookup(expr):  # "renders" the training frame whose expression is closest: the real peak frame
        return real(int(np.linalg.norm(train.expressions - expr, axis=1).argmin()))

    frozen = fidelity.controllability(lambda expr: real(0), tracker, train.expressions, names, neutral, CFG, real,
                                      neutral_index)
    shown = fidelity.controllability(lookup, tracker, train.expressions, names, neutral, CFG, real, neutral_index,
                                     render_frame=real)
    tested = [g for g, r in shown["groups"].items() if r["tested"]]
    assert "mouthSmile" in tested and "mouthPucker" not in tested  # the subject smiles but never puckers
    for g in tested:
        f, s = frozen["groups"][g]["whole"], shown["groups"][g]["whole"]
        assert frozen["groups"][g]["single"]["response"] == 0.0 and f["response"] == 0.0
        if "real_frames_response" not in s:  # MediaPipe found no face on that 64² real frame: counted, not scored
            continue
        assert s["response"] == pytest.approx(s["real_frames_response"]) and s["response"] > 0.1
        assert s["own_pose"]["render"] == s["own_pose"]["real_frame"] is not None
    assert "real_frames_response" in shown["groups"]["mouthSmile"]["whole"]
    assert shown["groups"]["mouthSmile"]["whole"]["response"] > 0.5


def test_evaluate_writes_and_prints_the_fidelity_block(fast_bundle, dataset64, tmp_path):
    r = run_script("trainer/evaluate.py", str(fast_bundle), "--data", str(dataset64), "--frames", "3",
                   "--out", str(tmp_path / "ev"))
    assert r.returncode == 0, r.stderr[-2000:]
    block = json.loads((tmp_path / "ev" / "metrics.json").read_text())["fidelity"]
    held = block["heldout"]
    assert held["frames"] == 3 and set(held["undetected"]) == {"real_frame", "avatar", "nearest_training_frame"}
    for side in ("avatar", "nearest_training_frame"):
        assert {"aed", "head_pose_error_deg", "mouth_psnr", "eye_psnr", "whole_psnr"} <= set(held[side])
    assert held["nearest_training_frame"]["aed"] > 0  # the baseline's frames are tracked
    groups = block["controllability"]["groups"]
    assert set(groups) == set(fidelity.CONTROL_GROUPS) and any(g["tested"] for g in groups.values())
    assert "jaw_open" in block["truth"]  # the synthetic subject is checked against its truth.json
    for text in ("| avatar |", "| nearest training frame |", "response single", "| mouthSmile |", "| jaw_open |"):
        assert text in r.stdout
    r = run_script("trainer/evaluate.py", str(fast_bundle), "--data", str(dataset64), "--frames", "1",
                   "--no-fidelity", "--out", str(tmp_path / "plain"))
    assert r.returncode == 0 and "fidelity" not in json.loads((tmp_path / "plain" / "metrics.json").read_text())
