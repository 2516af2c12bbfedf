"""Full-frame output: the head composited into the recording's plate at camera sizes; the guided recorder's
coverage; old (version 1) bundles keep their square output."""

import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from avatar.base.metrics import psnr
from avatar.bundle.bundle import load_bundle
from streamer.pipeline import Compositor, FrameLayout, default_output, feather_mask, frame_layout, make_compositor
from tests.conftest import run_script

FULL = {"crop": [200, 40, 240], "source_size": [640, 480]}


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two uint8 pictures (the project's metric, on [0, 1])."""
    return psnr(np.asarray(a) / 255.0, np.asarray(b) / 255.0)


def _outside(layout: FrameLayout) -> np.ndarray:
    """``[H, W] bool``: pixels outside the head box."""
    mask = np.ones((layout.height, layout.width), bool)
    x0, y0, side = (int(round(v)) for v in layout.box)
    mask[max(y0, 0):max(y0 + side, 0), max(x0, 0):max(x0 + side, 0)] = False
    return mask


# -- layout and composition (pure) -----------------------------------------------------------------------------

def test_default_output_is_the_recordings_framing_at_most_1280x720():
    assert default_output((640, 480)) == (640, 480)
    assert default_output((1920, 1080)) == (1280, 720)
    assert default_output((3840, 2160)) == (1280, 720)
    w, h = default_output((1080, 1920))  # portrait: fits the height
    assert h == 720 and w % 2 == 0 and abs(w / h - 1080 / 1920) < 0.01


def test_layout_maps_the_crop_into_the_output_covering_it():
    same = frame_layout(FULL, None, 256)
    assert (same.width, same.height) == (640, 480) and same.box == (200, 40, 240)
    wide = frame_layout(FULL, (1280, 720), 256)  # 4:3 into 16:9: scaled by 2, top and bottom cut
    assert wide.scale == 2.0 and wide.offset == (0.0, 120.0)
    assert wide.box == (400.0, 80.0 - 120.0, 480.0)
    square = frame_layout(None, None, 96)  # a version-1 bundle: its square crop is the whole output
    assert (square.width, square.height, square.box) == (96, 96, (0.0, 0.0, 96.0))


def test_compositor_keeps_the_plate_outside_the_box_and_the_head_inside():
    rng = np.random.default_rng(0)
    layout = frame_layout(FULL, None, 256)
    base = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    comp = Compositor(layout, base)
    rgb = torch.full((64, 64, 3), 0.5)
    alpha = torch.zeros(64, 64)
    alpha[16:48, 16:48] = 1.0  # an opaque head in the middle of the crop
    frame = comp(rgb * alpha[..., None], alpha)  # premultiplied, as the engines render over black
    outside = _outside(layout)
    assert np.array_equal(frame[outside], base[outside])  # the room untouched, exactly
    centre = frame[40 + 100:40 + 140, 200 + 100:200 + 140]
    assert np.abs(centre.astype(int) - 128).max() <= 1  # the head, exactly, where it is opaque
    # where the render is transparent inside the box, the plate shows through too
    assert np.array_equal(frame[45:60, 205:230], base[45:60, 205:230])
    # the box's inner edges blend (no hard seam): a fully opaque render fades into the plate at the left edge
    frame = Compositor(layout, np.zeros_like(base))(torch.full((64, 64, 3), 1.0), torch.ones(64, 64))
    row = frame[160, 200:240, 0].astype(int)
    assert row[0] < 50 and row[-1] == 255 and np.all(np.diff(row) >= 0)  # a ramp from the plate to the head
    assert frame[40, 320, 0] < 50  # the top edge too: it lies inside the frame
    top = frame_layout({"crop": [200, 0, 240], "source_size": [640, 480]}, None, 256)
    frame = Compositor(top, np.zeros_like(base))(torch.full((64, 64, 3), 1.0), torch.ones(64, 64))
    assert frame[0, 320, 0] == 255  # a crop edge on the frame's border: nothing to blend with, no ramp


def test_feather_leaves_edges_on_the_frame_border_hard():
    m = feather_mask(20, 5, (True, False, False, True))  # feathered left and bottom only
    assert m[10, 0] < 0.1 and m[0, 10] == 1.0 and m[10, 19] == 1.0 and m[19, 10] < 0.1 and m[10, 10] == 1.0


def test_blur_and_image_backgrounds_cover_the_output(fast_bundle, tmp_path):
    loaded = load_bundle(fast_bundle)
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, :150] = (255, 0, 0)
    comp = make_compositor(loaded, (320, 180), 64, img)
    assert comp.base.shape == (180, 320, 3)
    assert comp.base[90, 5].tolist() == [255, 0, 0] and comp.base[90, 315].tolist() == [0, 0, 0]
    sharp, blurred = make_compositor(loaded, (320, 180), 64), make_compositor(loaded, (320, 180), 64, "blur")
    assert np.abs(np.diff(blurred.base.astype(float), axis=1)).mean() < np.abs(np.diff(sharp.base.astype(float), axis=1)).mean()


# -- bundles ---------------------------------------------------------------------------------------------------

def test_a_version_1_bundle_still_loads_and_outputs_its_square(fast_bundle, tmp_path):
    loaded = load_bundle(fast_bundle)
    assert loaded.meta["version"] == 2 and loaded.full_frame is not None and loaded.plate is not None
    old = tmp_path / "v1"
    shutil.copytree(fast_bundle, old)
    meta = json.loads((old / "avatar.json").read_text())
    meta["version"] = 1
    del meta["full_frame"]
    (old / "avatar.json").write_text(json.dumps(meta))
    (old / "plate.png").unlink()
    v1 = load_bundle(old)
    assert v1.full_frame is None and v1.plate is None
    layout = make_compositor(v1, None, 48).layout
    assert (layout.width, layout.height) == (48, 48)
    # a version-2 bundle whose plate went missing is one clear error
    broken = tmp_path / "broken"
    shutil.copytree(fast_bundle, broken)
    (broken / "plate.png").unlink()
    with pytest.raises(Exception, match="plate.png"):
        load_bundle(broken)


# -- the whole path on a camera-shaped recording ----------------------------------------------------------------

@pytest.fixture(scope="module")
def camera_subject(tmp_path_factory):
    """A camera-shaped synthetic recording (320×240, 4:3), prepared at 48², and a briefly trained avatar."""
    work = tmp_path_factory.mktemp("camera")
    r = run_script("trainer/synth.py", "--out", str(work / "s"), "--frames", "150", "--frame", "320x240",
                   "--novel", "1", "--seed", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_script("trainer/prepare.py", str(work / "s" / "video.mp4"), "--out", str(work / "d"), "--size", "48",
                   "--background", str(work / "s" / "background.png"), "--refine-poses", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_script("trainer/fit.py", "--data", str(work / "d"), "--field", "fast", "--preset", "smoke",
                   "--max-steps", "150", "--eval-frames", "2", "--out", str(work / "a"), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return work


def test_live_output_is_the_full_camera_frame_with_the_room_around_the_head(camera_subject, tmp_path):
    from avatar.capture.video import iter_frames

    bundle = camera_subject / "a"
    loaded = load_bundle(bundle)
    ff = loaded.full_frame
    assert ff["source_size"] == [320, 240] and loaded.plate.shape == (240, 320, 3)
    x0, y0, side = ff["crop"]
    assert side < 240 and 0 <= x0 and x0 + side <= 320  # a square head crop inside the wider frame
    for output, shape in ((None, (240, 320, 3)), ("256x144", (144, 256, 3))):
        out = tmp_path / f"{output}.mp4"
        r = run_script("run_live.py", "--target", str(bundle), "--source", str(camera_subject / "s" / "video.mp4"),
                       "--every-frame", "--sink", f"file:{out}", "--max-frames", "10", "--render-size", "64", "--fps", "0",
                       "--quiet", *(["--output", output] if output else []), timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        frames = np.stack(list(iter_frames(out)))
        assert frames.shape[1:] == shape
        comp = make_compositor(loaded, None if output is None else tuple(map(int, output.split("x"))), 64)
        outside = _outside(comp.layout)
        # outside the head box: the recording's room (through H.264 4:4:4 at crf 10)
        assert _psnr(frames[:, outside], np.broadcast_to(comp.base[outside], frames[:, outside].shape)) >= 40
        # inside it: the avatar, not the empty room
        assert _psnr(frames[:, ~outside], np.broadcast_to(comp.base[~outside], frames[:, ~outside].shape)) < 30


def test_recorder_measures_what_a_video_performs(camera_subject, tmp_path):
    """`trainer/record.py --source V --no-window` marks each group the synthetic subject performs (its truth
    says which) and names the ones it never does."""
    out = tmp_path / "rec"
    r = run_script("trainer/record.py", "--source", str(camera_subject / "s" / "video.mp4"), "--no-window",
                   "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    cov = json.loads((out / "coverage.json").read_text())
    assert set(cov["performed"]) | set(cov["missing"]) == set(cov["groups"]) and len(cov["groups"]) == 10
    # the synthetic subject talks, opens the jaw, smiles, blinks each eye, raises the brows, turns and nods; it
    # never puckers or says 'oo' (at 192×144 MediaPipe misread a pucker of 0.22 in 5 frames: faces that small
    # are below what a recording should be)
    for group in ("talk", "jawOpen", "mouthSmile", "eyeBlinkLeft", "eyeBlinkRight", "browRaise", "headTurn",
                  "headNod"):
        assert cov["groups"][group]["performed"], (group, cov["groups"][group])
    for group in ("mouthPucker", "mouthFunnel"):
        assert not cov["groups"][group]["performed"] and group in cov["missing"]
    assert "missing: " in r.stdout and "mouthPucker" in r.stdout
    assert not (out / "video.mp4").exists()  # a file source is measured, not copied
    # bad input: one line, non-zero
    r = run_script("trainer/record.py", "--source", str(tmp_path / "none.mp4"), "--no-window", "--out", str(out))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "no such" in lines[0]


def test_recorder_overlay_draws_a_bar_per_group():
    from avatar.data.coverage import recording_coverage
    from trainer.record import draw_overlay

    rgb = np.full((240, 320, 3), 100, np.uint8)
    expressions = np.zeros((10, 52), np.float32)
    cov = recording_coverage(expressions, np.tile(np.eye(4), (10, 1, 1)))
    assert cov["missing"] == list(cov["groups"])  # a still, neutral face performs nothing
    img = draw_overlay(rgb, cov, "Open your mouth wide")
    assert img.shape == rgb.shape and not np.array_equal(img, rgb)
    expressions[:, 25] = np.linspace(0, 0.9, 10)  # jawOpen (index 25 in MediaPipe's order)
    cov2 = recording_coverage(expressions, np.tile(np.eye(4), (10, 1, 1)))
    assert cov2["groups"]["jawOpen"]["progress"] > cov["groups"]["jawOpen"]["progress"]
    assert not np.array_equal(draw_overlay(rgb, cov2, "x"), draw_overlay(rgb, cov, "x"))


def test_output_and_background_flags_are_checked(fast_bundle, subject, tmp_path):
    for extra, words in ((["--output", "640"], "WIDTHxHEIGHT"), (["--output", "641x480"], "even"),
                         (["--backdrop", str(tmp_path / "none.png")], "no such image")):
        r = run_script("run_live.py", "--target", str(fast_bundle), "--source", str(subject / "video.mp4"),
                       "--sink", f"file:{tmp_path / 'x.mp4'}", "--quiet", *extra)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr


def test_one_command_from_a_recording_to_live(camera_subject, tmp_path):
    """`run_live.py --target DIR` on a folder holding only a recording prepares, fits, exports and goes live;
    run again, every step is found up to date and skipped."""
    from avatar.capture.video import iter_frames

    folder = tmp_path / "me"
    folder.mkdir()
    shutil.copy2(camera_subject / "s" / "video.mp4", folder / "video.mp4")
    shutil.copy2(camera_subject / "s" / "background.png", folder / "background.png")
    args = ("run_live.py", "--target", str(folder), "--make-preset", "smoke", "--source", str(folder / "video.mp4"),
            "--every-frame", "--sink", f"file:{tmp_path / 'out.mp4'}", "--max-frames", "5", "--render-size", "48",
            "--fps", "0", "--quiet")
    r = run_script(*args, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    for made in ("dataset/report.json", "dataset/plate.png", "avatar/avatar.json", "avatar/plate.png",
                 "avatar/engines.json"):
        assert (folder / made).is_file(), made
    assert np.stack(list(iter_frames(tmp_path / "out.mp4"))).shape == (5, 240, 320, 3)
    assert "2/4 preparing the dataset" in r.stdout and "4/4 exporting the fast engines" in r.stdout
    r = run_script(*args, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(f"{k}/4" in r.stdout and "up to date" in line for k, line in
               zip((2, 3, 4), [ln for ln in r.stdout.splitlines() if ln[:3] in ("2/4", "3/4", "4/4")])), r.stdout
    # a folder without a video and a file source: one line
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_script("run_live.py", "--record", str(empty), "--source", str(folder / "video.mp4"), "--quiet")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "no video.mp4" in lines[0], r.stderr


def test_the_virtual_camera_opens_at_the_output_size(camera_subject, monkeypatch):
    """No v4l2loopback device exists here: pyvirtualcam's Camera is replaced by a recorder of what it is asked
    to open and sent, and the live loop runs in this process."""
    import pyvirtualcam

    from streamer.app import build_parser, config_from_args, run

    opened, sent = [], []

    class FakeCamera:
        def __init__(self, width, height, fps, fmt=None, device=None, **kw):
            opened.append((width, height))
            self.device = "/dev/video-fake"

        def send(self, frame):
            sent.append(frame.shape)

        def close(self):
            pass

    monkeypatch.setattr(pyvirtualcam, "Camera", FakeCamera)
    for output, size in ((None, (320, 240)), ("1280x720", (1280, 720))):
        args = build_parser().parse_args(["--target", str(camera_subject / "a"), "--source",
                                          str(camera_subject / "s" / "video.mp4"), "--every-frame", "--sink",
                                          "virtualcam", "--max-frames", "3", "--render-size", "48", "--fps", "0", "--quiet",
                                          *(["--output", output] if output else [])])
        opened.clear(), sent.clear()
        run(config_from_args(args), log=lambda *a: None)
        assert opened == [size] and sent == [(size[1], size[0], 3)] * 3


def test_guided_recording_from_a_camera(camera_subject, tmp_path, monkeypatch):
    """The camera path of trainer/record.py, with a clip standing in for the webcam (no camera here): the
    performance is recorded until --seconds, then only face-free frames after the person has left become
    background.png."""
    import avatar.capture.sources
    from avatar.capture.sources import VideoFileSource
    from avatar.capture.video import VideoWriter, iter_frames, probe_video
    from trainer.record import RecordConfig, record

    clip = tmp_path / "webcam.mp4"  # the subject performs 150 frames (6 s), then leaves: 30 frames of the room
    room = cv2.imread(str(camera_subject / "s" / "background.png"))[..., ::-1]
    with VideoWriter(clip, 320, 240, fps=25, crf=12) as w:
        for rgb in iter_frames(camera_subject / "s" / "video.mp4"):
            w.write(rgb)
        for _ in range(30):
            w.write(room)
    monkeypatch.setattr(avatar.capture.sources, "open_source", lambda spec, *a, **k: VideoFileSource(clip, every_frame=True))
    out = tmp_path / "me"
    cov = record(RecordConfig(out=str(out), source="0", window=False, seconds=5.0, background_seconds=0.4),
                 log=lambda *a: None)
    assert probe_video(out / "video.mp4").frame_count == 126  # frames at 0 … 5 s of the performance (25 fps)
    plate = cv2.imread(str(out / "background.png"))[..., ::-1]
    assert _psnr(plate, room) > 35  # the empty room, not a frame with the subject in it
    saved = json.loads((out / "coverage.json").read_text())
    assert saved["missing"] == cov["missing"] and "mouthPucker" in saved["missing"]
    assert saved["groups"]["mouthSmile"]["performed"] and saved["frames"] > 100
    with pytest.raises(Exception, match="exists"):  # a second take needs --overwrite
        record(RecordConfig(out=str(out), source="0", window=False), log=lambda *a: None)
