import json

import numpy as np

from avatar import camera
from avatar.dataset import track_video
from avatar.synth import EXPRESSION_NAMES, make_motion
from avatar.video import probe_video


def test_subject_files_and_truth(subject):
    info = probe_video(subject / "video.mp4")
    assert (info.width, info.height) == (128, 128)
    truth = json.loads((subject / "truth.json").read_text())
    assert len(truth["frames"]) == 48 and truth["expression_names"] == list(EXPRESSION_NAMES)
    assert (subject / "background.png").is_file() and (subject / "preview.png").is_file()
    novel = json.loads((subject / "novel" / "truth.json").read_text())
    assert len(novel["frames"]) == 6
    seen = np.array([f["yaw_pitch_roll_deg"] for f in truth["frames"]])
    for f in novel["frames"]:
        assert (subject / "novel" / f["file_path"]).is_file()
        assert np.linalg.norm(seen - f["yaw_pitch_roll_deg"], axis=1).min() >= 8.0  # really unseen


def test_motion_stays_in_range_and_moves():
    m = make_motion(300, 25.0, seed=0)
    assert np.abs(m.angles_deg).max() <= 25.0
    assert np.ptp(m.angles_deg[:, 0]) > 30  # it does turn
    assert m.expression.min() >= -0.5 and m.expression.max() <= 1.0
    for k in (0, 2, 3, 4):  # jaw, blinks and brows all happen
        assert m.expression[:, k].max() > 0.5


def test_mediapipe_tracks_the_subject_and_its_poses(subject):
    track = track_video(subject / "video.mp4", progress=False)
    assert len(track.frame_indices) >= 0.95 * track.total
    truth = json.loads((subject / "truth.json").read_text())
    true_poses = np.array([f["head_pose"] for f in truth["frames"]])[track.frame_indices]
    # The tracked head turns the way the true head turns (relative rotations agree within a few degrees).
    errs = [camera.rotation_angle_deg(track.poses[i, :3, :3] @ track.poses[0, :3, :3].T,
                                      true_poses[i, :3, :3] @ true_poses[0, :3, :3].T)
            for i in range(len(true_poses))]
    assert np.median(errs) < 6.0
