import json

import numpy as np

from avatar.capture import camera
from avatar.capture.video import probe_video
from avatar.data.prepare import track_video
from avatar.data.synth import EXPRESSION_NAMES
from avatar.data.synth.motion import make_motion


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


def _active(expression, eps=0.05):
    return np.abs(expression) > eps


def test_schedule_shows_each_channel_alone_and_in_pairs_independently_of_the_head():
    for frames, seed in ((300, 0), (300, 5), (48, 3)):
        m = make_motion(frames, 25.0, seed)
        e, act = m.expression, _active(m.expression)
        for k in range(len(EXPRESSION_NAMES)):
            alone = act[:, k] & (act.sum(1) == 1)
            assert (alone & (e[:, k] >= 0.99)).sum() >= (2 if frames == 48 else 8)  # held at full value alone
            assert frames < 300 or (act[:, k] & (act.sum(1) > 1)).sum() >= 8  # and together with others
        if frames >= 300:
            r = np.corrcoef(np.concatenate([e, m.angles_deg], 1).T)
            n = len(EXPRESSION_NAMES)
            assert np.abs(r[:n, :n] - np.eye(n)).max() < 0.3  # no channel predicts another
            assert np.abs(r[:n, n:]).max() < 0.15  # nor the head pose (by chance: |r| ≈ 0.2 unless chosen)
            pairs = {frozenset(np.nonzero(row)[0]) for row in act if row.sum() == 2}
            assert len(pairs) == n * (n - 1) // 2  # every pair of channels co-occurs somewhere
            tail = e[-int(round(0.17 * frames)):]  # the held-out end of a prepared dataset
            assert (tail.max(0) >= 0.99).all()


def test_truth_records_the_performance(subject):
    truth = json.loads((subject / "truth.json").read_text())
    e = np.array([f["expression"] for f in truth["frames"]])
    segments = truth["performance"]
    assert segments[0]["start"] == 0 and segments[-1]["end"] == len(e)
    assert all(a["end"] == b["start"] for a, b in zip(segments, segments[1:]))  # they tile the clip
    alone_seen = set()
    for seg in segments:
        cols = [EXPRESSION_NAMES.index(c) for c in seg["channels"]]
        rows = e[seg["start"]:seg["end"]]
        others = np.delete(rows, cols, axis=1)
        assert np.abs(others).max() < 1e-9  # nothing moves that the segment does not name
        if seg["kind"] == "alone":
            assert len(cols) == 1 and rows[:, cols[0]].max() >= 0.99
            alone_seen.add(seg["channels"][0])
        elif seg["kind"] == "combination":
            assert len(cols) == 2
            assert (_active(rows[:, cols]).all(1)).any()  # the two overlap in time
    assert alone_seen == set(EXPRESSION_NAMES)  # even the 48-frame clip shows every channel alone


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


def test_command_line_writes_a_subject_and_refuses_bad_input(tmp_path):
    from tests.conftest import run_script

    out = tmp_path / "s"
    r = run_script("trainer/synth.py", "--out", str(out), "--frames", "4", "--size", "64", "--novel", "2", "--seed", "5")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wrote 4 frames + 2 novel-pose frames" in r.stdout
    info = probe_video(out / "video.mp4")
    assert (info.width, info.height) == (64, 64)
    truth = json.loads((out / "truth.json").read_text())
    assert len(truth["frames"]) == 4 and truth["config"]["seed"] == 5
    assert len(json.loads((out / "novel" / "truth.json").read_text())["frames"]) == 2
    for args, words in ((["--out", str(out), "--frames", "4", "--size", "64"], "already exists"),
                        (["--out", str(tmp_path / "t"), "--size", "63"], "even number"),
                        (["--out", str(tmp_path / "u"), "--photo", str(tmp_path / "none.jpg")], "no such file"),
                        (["--out", str(tmp_path / "v"), "--frame", "641x480"], "even numbers"),
                        (["--out", str(tmp_path / "w"), "--frame", "wide"], "WIDTHxHEIGHT")):
        r = run_script("trainer/synth.py", *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # nothing half-written
    # camera-shaped: the default of the command (640×480), any WxH with --frame
    r = run_script("trainer/synth.py", "--out", str(tmp_path / "cam"), "--frames", "2", "--frame", "96x72",
                   "--novel", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    info = probe_video(tmp_path / "cam" / "video.mp4")
    assert (info.width, info.height) == (96, 72)
    assert json.loads((tmp_path / "cam" / "truth.json").read_text())["image_size"] == [96, 72]
