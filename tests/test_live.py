import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from avatar.base.metrics import psnr
from avatar.bundle.bundle import load_bundle
from avatar.engines.torch_engine import TorchEngine
from streamer.pipeline import BLACK, Controls, RetargetConfig, Retargeter, make_compositor
from tests.conftest import ROOT, run_script


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_live(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run_live.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for_url(proc: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "http://" in line:
            return line[line.index("http://"):].strip()
        if proc.poll() is not None:
            raise AssertionError(f"run_live.py exited: {proc.stderr.read()[-2000:]}")
    raise AssertionError("no URL printed")


# -- retargeting -----------------------------------------------------------------------------------------------

class _Obs:
    def __init__(self, blendshapes, head_pose):
        self.blendshapes, self.head_pose = np.asarray(blendshapes, np.float32), head_pose


def _meta():
    neutral = np.full(52, 0.1)
    ref = np.eye(4)
    ref[2, 3] = -50
    return {"expression_stats": {"neutral": neutral.tolist(), "min": np.zeros(52).tolist(),
                                 "max": np.full(52, 0.6).tolist(), "mean": neutral.tolist()},
            "reference_head_pose": ref.tolist(),
            "pose_range": {"euler_min": [-20, -10, -5], "euler_max": [20, 10, 5], "translation_min": [-2, -2, -2],
                           "translation_max": [2, 2, 2]}}


def test_relative_retargeting_calibrates_clamps_holds_and_eases():
    from avatar.capture.camera import euler_to_matrix, make_pose, matrix_to_euler

    controls = Controls()
    rt = Retargeter(_meta(), RetargetConfig(calibration_frames=3, hold_seconds=0.5, ease_seconds=1.0), controls)
    src_neutral = np.full(52, 0.3)
    src_pose = make_pose(np.eye(3), [1.0, 2.0, -40.0])
    t = 0.0
    for _ in range(3):
        t += 0.04
        expr, pose = rt(_Obs(src_neutral, src_pose), t)
    assert rt.source_neutral is not None
    np.testing.assert_allclose(expr, 0.1, atol=1e-5)  # the source's neutral maps onto the target's neutral
    # Smiling by +0.2 moves the target by +0.2; +0.9 is clamped to the trained max.
    big = src_neutral.copy()
    big[10], big[11] = 0.5, 1.2
    for _ in range(40):  # let the One Euro filter settle
        t += 0.04
        expr, pose = rt(_Obs(big, make_pose(euler_to_matrix(45, 0, 0), [1.0, 2.0, -40.0])), t)
    assert abs(expr[10] - 0.3) < 0.02 and abs(expr[11] - 0.6) < 1e-6
    yaw = matrix_to_euler((np.linalg.inv(np.asarray(_meta()["reference_head_pose"])) @ pose)[:3, :3])[0]
    assert 20 < yaw <= 25.01  # turned, but clamped to the trained range + 5° margin
    held, _ = rt(None, t + 0.3)
    np.testing.assert_allclose(held, expr)  # no face: hold …
    assert rt.state == "no face: holding"
    halfway, half_pose = rt(None, t + 0.5 + 0.5)  # … then ease linearly: half way after half the ease time …
    np.testing.assert_allclose(halfway, expr + 0.5 * (0.1 - expr), atol=1e-6)
    assert rt.state == "no face: easing to neutral"
    half_yaw = matrix_to_euler((np.linalg.inv(np.asarray(_meta()["reference_head_pose"])) @ half_pose)[:3, :3])[0]
    assert abs(half_yaw - yaw / 2) < 0.5
    eased, _ = rt(None, t + 0.5 + 2.0)  # … and back to neutral
    np.testing.assert_allclose(eased, 0.1, atol=1e-6)
    controls.pose_lock = True
    t += 3
    for _ in range(3):
        t += 0.04
        _, pose = rt(_Obs(big, make_pose(euler_to_matrix(10, 0, 0), [1.0, 2.0, -40.0])), t)
    np.testing.assert_allclose(pose, np.asarray(_meta()["reference_head_pose"]), atol=1e-9)


def test_filter_removes_jitter_of_a_still_face(subject):
    """Tracking a still face with sensor noise: the filtered signal jitters much less than the raw one."""
    from avatar.capture.tracking import FaceTracker
    from avatar.capture.video import iter_frames
    from streamer.filters import OneEuroFilter

    still = next(iter_frames(subject / "video.mp4"))
    rng = np.random.default_rng(0)
    raw, filtered = [], []
    f = OneEuroFilter(1.5, 0.5)
    with FaceTracker("video") as tracker:
        for i in range(40):
            noisy = np.clip(still.astype(np.int16) + rng.normal(0, 6, still.shape), 0, 255).astype(np.uint8)
            obs = tracker.track(noisy, i * 40)
            assert obs is not None
            raw.append(obs.blendshapes)
            filtered.append(f(obs.blendshapes, i * 0.04))
    raw_jitter = np.abs(np.diff(np.array(raw[10:]), axis=0)).mean()
    filtered_jitter = np.abs(np.diff(np.array(filtered[10:]), axis=0)).mean()
    print(f"frame-to-frame blendshape jitter: raw {raw_jitter:.4f}, filtered {filtered_jitter:.4f}")
    assert raw_jitter > 1e-4  # the noise really moves the tracker
    assert filtered_jitter < 0.5 * raw_jitter


# -- the whole command -----------------------------------------------------------------------------------------

def test_file_sink_holds_the_avatar_as_rendered_offline_and_follows_the_face(fast_bundle, subject, tmp_path):
    out, cond, stats = tmp_path / "out.mp4", tmp_path / "cond.json", tmp_path / "stats.json"
    # --every-frame: each source frame in order on the clip's clock, so what is logged does not depend on how
    # fast this machine is; --smoothing 0: no filter lag between the truth and the log.
    r = run_script("run_live.py", "--target", str(fast_bundle), "--source", str(subject / "video.mp4"), "--loop",
                   "--every-frame", "--smoothing", "0", "--sink", f"file:{out}", "--max-frames", "60", "--render-size", "64",
                   "--output", "64x64",
                   "--fps", "0", "--engine", "torch", "--conditioning-log", str(cond), "--stats", str(stats), "--quiet",
                   timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from avatar.capture.camera import matrix_to_euler
    from avatar.capture.video import iter_frames

    frames = list(iter_frames(out))
    log = json.loads(cond.read_text())["frames"]
    assert len(frames) == len(log) == 60
    loaded = load_bundle(fast_bundle)
    engine = TorchEngine(loaded)
    compositor = make_compositor(loaded, (64, 64), 64)  # the loop's own composition, offline
    scores = []
    for frame, c in zip(frames, log):
        out = engine.render(c["expression"], c["head_pose"], loaded.latent(c["latent"]), c["render_size"], BLACK)
        offline = compositor(out["rgb"], out["alpha"])
        scores.append(psnr(frame / 255.0, offline / 255.0))
    # H.264 at crf 10 costs small frames most: 38.3 dB typical, 34.5 the worst of 60 here; a frame rendered from
    # other conditioning scores far lower
    assert np.median(scores) >= 36 and min(scores) >= 32, scores
    # What was rendered follows the synthetic subject's true performance: a tracker or retargeter stuck at
    # neutral (or reading the wrong blendshape) fails here, although the offline comparison above would pass.
    truth = json.loads((subject / "truth.json").read_text())
    names = [n.replace("_", "") for n in truth["expression_names"]]
    assert [c["source_index"] for c in log] == list(range(60))  # every frame, in order
    tracked = [c for c in log if c["state"].startswith("tracking")]
    assert len(tracked) >= 50
    frame_of = [c["source_index"] % len(truth["frames"]) for c in tracked]
    jaw = loaded.meta["expression_names"].index("jawOpen")
    ref_inv = np.linalg.inv(np.asarray(loaded.meta["reference_head_pose"]))
    yaw = [matrix_to_euler((ref_inv @ np.asarray(c["head_pose"]))[:3, :3])[0] for c in tracked]
    true_jaw = [truth["frames"][i]["expression"][names.index("jawopen")] for i in frame_of]
    true_yaw = [truth["frames"][i]["yaw_pitch_roll_deg"][0] for i in frame_of]
    jaw_corr = float(np.corrcoef([c["expression"][jaw] for c in tracked], true_jaw)[0, 1])
    yaw_corr = float(np.corrcoef(yaw, true_yaw)[0, 1])
    print(f"logged vs true: jawOpen r={jaw_corr:.2f}, yaw r={yaw_corr:.2f}")
    # Measured: jawOpen 0.82, yaw 0.99 (MediaPipe's jawOpen on this small synthetic face is itself imperfect, and the
    # avatar's trained range clamps wide openings); frozen at neutral, the correlation is undefined (NaN) and fails.
    assert jaw_corr > 0.7 and yaw_corr > 0.9, (jaw_corr, yaw_corr)
    s = json.loads(stats.read_text())
    assert s["frames"] == 60 and s["latency_ms_median"] > 0 and "render" in s["stages_ms_median"]


def test_command_line_controls_reach_the_loop(fast_bundle, subject, tmp_path):
    """--mode absolute, --pose-lock, --gain and --backdrop, each seen in what the loop rendered."""
    import cv2

    bg_path = tmp_path / "bg.png"
    cv2.imwrite(str(bg_path), np.full((64, 64, 3), (40, 200, 90), np.uint8))  # BGR: a green the plate never has
    runs = {}
    for name, extra in (("relative", []), ("absolute", ["--mode", "absolute", "--gain", "2", "--pose-lock",
                                                         "--backdrop", str(bg_path)])):
        out, cond = tmp_path / f"{name}.mp4", tmp_path / f"{name}.json"
        r = run_script("run_live.py", "--target", str(fast_bundle), "--source", str(subject / "video.mp4"), "--sink",
                       f"file:{out}", "--max-frames", "12", "--render-size", "64", "--fps", "0", "--engine", "torch", "--loop",
                       "--every-frame",
                       "--conditioning-log", str(cond), "--quiet", *extra, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        from avatar.capture.video import iter_frames

        runs[name] = (json.loads(cond.read_text())["frames"], np.stack(list(iter_frames(out))).astype(np.float32))
    loaded = load_bundle(fast_bundle)
    neutral = np.asarray(loaded.meta["expression_stats"]["neutral"])
    reference = np.asarray(loaded.meta["reference_head_pose"])
    rel_log, rel_frames = runs["relative"]
    abs_log, abs_frames = runs["absolute"]
    # relative: the first frames calibrate (the avatar holds its neutral); absolute: no calibration
    assert rel_log[0]["state"].startswith("calibrating") and np.allclose(rel_log[0]["expression"], neutral)
    assert all(c["state"] == "tracking (pose locked)" for c in abs_log)
    # pose lock: the head stays at the reference pose, while the relative run's head moves
    assert all(np.allclose(c["head_pose"], reference) for c in abs_log)
    assert max(np.abs(np.subtract(c["head_pose"], reference)).max() for c in rel_log) > 1e-3
    # absolute with gain 2: the source's own blendshapes doubled (clipped to the trained range): far from neutral
    lo, hi = (np.asarray(loaded.meta["expression_stats"][k]) for k in ("min", "max"))
    first = np.asarray(abs_log[0]["expression"])
    assert np.all(first >= lo - 1e-6) and np.all(first <= hi + 1e-6)
    assert np.abs(first - neutral).max() > 0.05
    # --backdrop: the corners show the given image instead of the avatar's plate
    corner = abs_frames[:, :4, :4].reshape(-1, 3).mean(0)
    assert np.abs(corner - np.array([90, 200, 40])).max() < 12, corner
    assert np.abs(rel_frames[:, :4, :4].reshape(-1, 3).mean(0) - np.array([90, 200, 40])).max() > 40


def test_source_that_ends_stops_cleanly_and_bad_inputs_are_one_line(fast_bundle, subject, tmp_path):
    out = tmp_path / "all.mp4"
    r = run_script("run_live.py", "--target", str(fast_bundle), "--source", str(subject / "video.mp4"),
                   "--sink", f"file:{out}", "--render-size", "64", "--quiet", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "source ended" in r.stdout and out.is_file()
    for args, words in ((["--target", str(tmp_path)], "not an avatar bundle"),
                        (["--target", str(fast_bundle), "--source", str(tmp_path / "none.mp4")], "no such"),
                        (["--target", str(fast_bundle), "--sink", "nonsense"], "unknown sink"),
                        (["--target", str(fast_bundle), "--source", "0", "--every-frame"], "a camera is always live")):
        r = run_script("run_live.py", *args, "--quiet")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr
    assert not list(tmp_path.glob(".*partial*"))


def test_virtual_camera_without_a_device_says_how_to_make_one(fast_bundle, subject):
    import pyvirtualcam

    try:  # where a virtual camera exists this test has nothing to check
        pyvirtualcam.Camera(64, 64, 10).close()
        pytest.skip("a virtual camera device exists here")
    except Exception:
        pass
    r = run_script("run_live.py", "--target", str(fast_bundle), "--source", str(subject / "video.mp4"),
                   "--sink", "virtualcam", "--quiet")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "modprobe v4l2loopback" in lines[0] or "OBS" in lines[0]


@pytest.fixture(scope="module")
def live_server(fast_bundle, subject):
    port = free_port()
    proc = start_live("--target", str(fast_bundle), "--source", str(subject / "video.mp4"), "--loop", "--sink",
                      "webrtc", "--port", str(port), "--render-size", "64", "--output", "64x64", "--quiet")
    url = wait_for_url(proc)
    yield proc, url, port
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def _post(url: str, data: bytes, content_type: str = "application/json") -> int:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


async def receive(base: str, n: int, query: str = "") -> list:
    """Connect an aiortc viewer to ``base``, take ``n`` frames (RGB arrays) and hang up."""
    from aiohttp import ClientSession
    from aiortc import RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    got = asyncio.get_running_loop().create_future()

    @pc.on("track")
    def on_track(track):
        async def pull():
            frames = []
            while len(frames) < n:
                frames.append((await track.recv()).to_ndarray(format="rgb24"))
            got.set_result(frames)
        asyncio.ensure_future(pull())

    await pc.setLocalDescription(await pc.createOffer())
    async with ClientSession() as session:
        async with session.post(base + "/offer" + query, json={"sdp": pc.localDescription.sdp,
                                                               "type": pc.localDescription.type}) as resp:
            answer = await resp.json()
    await pc.setRemoteDescription(RTCSessionDescription(**answer))
    try:
        return await asyncio.wait_for(got, 120)
    finally:
        await pc.close()


async def offer_status(base: str, query: str = "") -> int:
    """POST a real aiortc offer and return the HTTP status (the peer is closed again right after)."""
    from aiohttp import ClientSession
    from aiortc import RTCPeerConnection

    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    try:
        async with ClientSession() as session:
            async with session.post(base + "/offer" + query, json={"sdp": pc.localDescription.sdp,
                                                                   "type": "offer"}) as resp:
                return resp.status
    finally:
        await pc.close()


def _stats(base: str) -> dict:
    with urllib.request.urlopen(base + "/stats", timeout=10) as resp:
        return json.loads(resp.read())


def test_webrtc_client_receives_frames_and_junk_gets_400(live_server, fast_bundle):
    import cv2

    proc, url, port = live_server
    base = f"http://127.0.0.1:{port}"
    assert _post(base + "/offer", b"junk") == 400
    assert _post(base + "/offer", b'{"sdp": 5, "type": "offer"}') == 400
    assert _post(base + "/offer", b'{"sdp": "v=0 but not really", "type": "offer"}') == 400
    assert _post(base + "/offer", b"x" * 200_000) in (400, 413)
    assert _post(base + "/offer", b"{}", "text/plain") == 400
    assert _post(base + "/control", b'{"gain": 99}') == 400
    assert _post(base + "/control", b'{"gain": true}') == 400 and _post(base + "/control", b'{"gain": "2"}') == 400
    assert _post(base + "/control", b'{"action": "recalibrate"}') == 200
    # controls take effect: the server reports them back, and a recalibration restarts the calibration
    assert _post(base + "/control", b'{"gain": 2}') == 200 and _stats(base)["gain"] == 2.0
    assert _post(base + "/control", b'{"pose_lock": true}') == 200 and _stats(base)["pose_lock"] is True
    assert _post(base + "/control", b'{"pose_lock": false}') == 200 and _stats(base)["pose_lock"] is False
    assert _post(base + "/control", b'{"gain": 1}') == 200 and _stats(base)["gain"] == 1.0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _stats(base).get("state", "").startswith("calibrating"):
        assert _post(base + "/control", b'{"action": "recalibrate"}') == 200
        time.sleep(0.05)
    assert _stats(base)["state"].startswith("calibrating")

    frames = asyncio.run(receive(base, 50))
    assert len(frames) == 50 and frames[-1].shape == (64, 64, 3)
    # the avatar, not a blank and not the background plate alone (VP8 at 64²: a few levels of coding noise)
    plate = cv2.resize((load_bundle(fast_bundle).background.numpy() * 255).astype(np.uint8), (64, 64),
                       interpolation=cv2.INTER_AREA).astype(np.float32)
    last = frames[-1].astype(np.float32)
    assert float(np.std(last)) > 5
    assert np.abs(last - plate).mean(-1)[16:48, 16:48].mean() > 15
    stats = _stats(base)
    assert stats["frames"] > 0 and "state" in stats


def test_a_second_server_on_a_busy_port_is_one_line_and_leaves_no_file(live_server, fast_bundle, subject, tmp_path):
    """The file sink opens first, then the WebRTC server fails: the file must not be left behind, half or whole."""
    _, _, port = live_server
    out = tmp_path / "out.mp4"
    r = run_script("run_live.py", "--target", str(fast_bundle), "--source", str(subject / "video.mp4"), "--sink",
                   f"file:{out}", "--sink", "webrtc", "--port", str(port), "--quiet")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and str(port) in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []


def test_off_loopback_every_request_needs_the_token_and_viewers_are_capped():
    from streamer.pipeline import Controls
    from streamer.webrtc import WebRTCSink

    port = free_port()
    sink = WebRTCSink(Controls(), host="0.0.0.0", port=port, max_viewers=1)
    try:
        assert sink.token and f"token={sink.token}" in sink.url
        sink.send(np.full((64, 64, 3), 128, np.uint8))
        base = f"http://127.0.0.1:{port}"

        def get(path, headers=None):
            try:
                with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers or {}), timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as exc:
                return exc.code

        for path in ("/", "/stats", "/?token=wrong", "/stats?token=" + sink.token[:-1]):
            assert get(path) == 403, path
        assert get("/", {"X-Token": "nope"}) == 403
        assert _post(base + "/control", b'{"gain": 2}') == 403 and sink.controls.gain == 1.0
        assert get("/?token=" + sink.token) == 200 and get("/stats", {"X-Token": sink.token}) == 200
        assert asyncio.run(offer_status(base)) == 403
        good = "?token=" + sink.token

        async def two_viewers():
            first = await offer_status(base, good)  # closed on our side right after, but the server keeps the
            second = await offer_status(base, good)  # peer until its connection fails: the cap still holds
            return first, second

        assert asyncio.run(two_viewers()) == (200, 503)
    finally:
        sink.close()
    with pytest.raises(ConnectionRefusedError):  # nothing listens any more (binding again would trip over the
        socket.create_connection(("127.0.0.1", port), timeout=5)  # server side's TIME_WAIT connections)


def test_browser_plays_the_stream(live_server, tmp_path):
    """Headless Chromium (Debian's chromium + chromium-driver) loads the page; its screenshot shows the avatar."""
    if not os.path.exists("/usr/bin/chromium") or not os.path.exists("/usr/bin/chromedriver"):
        if os.environ.get("REQUIRE_BROWSER") == "1":  # set by .ci/run: CI must not go green without a browser
            pytest.fail("chromium / chromium-driver are missing but REQUIRE_BROWSER=1")
        pytest.skip("chromium / chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    _, url, _ = live_server
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--autoplay-policy=no-user-gesture-required", "--window-size=700,800"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        driver.get(url)
        deadline = time.monotonic() + 90
        playing = False
        while time.monotonic() < deadline:
            playing = driver.execute_script(
                "const v = document.getElementById('video'); return v.readyState >= 2 && v.currentTime > 0.5 "
                "&& v.videoWidth > 0;")
            if playing:
                break
            time.sleep(0.5)
        assert playing, driver.execute_script("return document.getElementById('conn').textContent")
        video = driver.find_element("id", "video")
        png = tmp_path / "page.png"
        video.screenshot(str(png))
        import cv2

        shot = cv2.imread(str(png))
        assert shot is not None and float(shot.std()) > 10, "the video element shows a blank"
    finally:
        driver.quit()


def test_sigterm_stops_the_server_and_frees_the_port(fast_bundle, subject):
    port = free_port()
    proc = start_live("--target", str(fast_bundle), "--source", str(subject / "video.mp4"), "--loop", "--sink",
                      "webrtc", "--port", str(port), "--render-size", "64", "--quiet")
    wait_for_url(proc)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()[-2000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free again


def test_projection_onto_training_components_and_missing_components():
    from avatar.base.errors import UserError

    meta = _meta()
    comp = np.zeros((2, 52))
    comp[0, 10] = comp[1, 20] = 1.0  # the avatar only ever moved blendshapes 10 and 20
    meta["expression_components"] = comp.tolist()
    rt = Retargeter(meta, RetargetConfig(calibration_frames=1, components=2), Controls())
    pose = np.eye(4)
    rt(_Obs(np.full(52, 0.3), pose), 0.0)
    moved = np.full(52, 0.3)
    moved[[10, 20, 30]] += 0.2
    for k in range(40):
        expr, _ = rt(_Obs(moved, pose), 0.04 * (k + 1))
    assert abs(expr[10] - 0.3) < 0.02 and abs(expr[20] - 0.3) < 0.02
    assert abs(expr[30] - 0.1) < 1e-5  # a direction the avatar never saw is projected away
    del meta["expression_components"]
    with pytest.raises(UserError):
        Retargeter(meta, RetargetConfig(components=2), Controls())


# -- sources ---------------------------------------------------------------------------------------------------

def test_a_slow_consumer_gets_the_newest_frame_not_a_backlog(subject):
    from avatar.capture.sources import VideoFileSource

    source = VideoFileSource(subject / "video.mp4", loop=True).start()
    try:
        first = source.latest(5)
        assert first is not None
        time.sleep(0.5)  # 25 fps: ~12 frames arrive meanwhile; only the newest is handed out
        newest = source.latest(5)
        assert newest.index - first.index >= 8
        assert time.monotonic() - newest.captured < 0.1  # fresh, not queued
        again = source.latest(0.01)
        assert again is None or again.index > newest.index  # each frame is handed out at most once
    finally:
        source.close()


def test_a_camera_that_disappears_is_reopened(monkeypatch):
    import cv2

    from avatar.capture.sources import CameraSource

    opened = []

    class FakeCapture:  # the first camera delivers 3 frames and then nothing (unplugged); the next one works
        def __init__(self, device):
            opened.append(device)
            self.reads, self.generation = 0, len(opened)

        def isOpened(self):
            return True

        def set(self, *args):
            return True

        def read(self):
            self.reads += 1
            time.sleep(0.01)
            if self.generation == 1 and self.reads > 3:
                return False, None
            return True, np.full((8, 8, 3), self.generation, np.uint8)

        def release(self):
            pass

    monkeypatch.setattr(cv2, "VideoCapture", FakeCapture)
    source = CameraSource(0).start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not source.lost:
            time.sleep(0.01)
        assert source.lost and source.frames_read == 3
        while time.monotonic() < deadline and (source.lost or source.frames_read < 10):
            time.sleep(0.01)
        assert not source.lost and source.frames_read >= 10 and len(opened) == 2
        frame = source.latest(1)
        assert frame is not None and frame.rgb[0, 0, 0] == 2  # from the reopened camera (BGR→RGB of a grey)
    finally:
        source.close()
