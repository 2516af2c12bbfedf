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

from avatar.bundle import load_bundle
from avatar.engines import TorchEngine
from avatar.metrics import psnr
from streamer.pipeline import Controls, RetargetConfig, Retargeter, compose
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
    from avatar.camera import euler_to_matrix, make_pose, matrix_to_euler

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
    eased, _ = rt(None, t + 0.5 + 2.0)  # … then back to neutral
    np.testing.assert_allclose(eased, 0.1, atol=1e-6)
    controls.pose_lock = True
    t += 3
    for _ in range(3):
        t += 0.04
        _, pose = rt(_Obs(big, make_pose(euler_to_matrix(10, 0, 0), [1.0, 2.0, -40.0])), t)
    np.testing.assert_allclose(pose, np.asarray(_meta()["reference_head_pose"]), atol=1e-9)


def test_filter_removes_jitter_of_a_still_face(subject):
    """Tracking a still face with sensor noise: the filtered signal jitters much less than the raw one."""
    from avatar.tracking import FaceTracker
    from avatar.video import iter_frames
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

def test_file_sink_holds_the_avatar_as_rendered_offline(fast_bundle, subject, tmp_path):
    out, cond, stats = tmp_path / "out.mp4", tmp_path / "cond.json", tmp_path / "stats.json"
    r = run_script("run_live.py", "--target", str(fast_bundle), "--source", str(subject / "video.mp4"), "--loop",
                   "--sink", f"file:{out}", "--max-frames", "20", "--size", "128", "--fps", "0", "--engine", "torch",
                   "--conditioning-log", str(cond), "--stats", str(stats), "--quiet", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from avatar.video import iter_frames

    frames = list(iter_frames(out))
    log = json.loads(cond.read_text())["frames"]
    assert len(frames) == len(log) == 20
    loaded = load_bundle(fast_bundle)
    engine = TorchEngine(loaded)
    scores = []
    for frame, c in zip(frames, log):
        offline = compose(engine.render(c["expression"], c["head_pose"], loaded.latent(c["latent"]),
                                        c["render_size"])["rgb"], 128)
        scores.append(psnr(frame / 255.0, offline / 255.0))
    assert min(scores) >= 35, scores
    s = json.loads(stats.read_text())
    assert s["frames"] == 20 and s["latency_ms_median"] > 0 and "render" in s["stages_ms_median"]


def test_source_that_ends_stops_cleanly_and_bad_inputs_are_one_line(fast_bundle, subject, tmp_path):
    out = tmp_path / "all.mp4"
    r = run_script("run_live.py", "--target", str(fast_bundle), "--source", str(subject / "video.mp4"),
                   "--sink", f"file:{out}", "--size", "64", "--quiet", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "source ended" in r.stdout and out.is_file()
    for args, words in ((["--target", str(tmp_path)], "not an avatar bundle"),
                        (["--target", str(fast_bundle), "--source", str(tmp_path / "none.mp4")], "no such"),
                        (["--target", str(fast_bundle), "--sink", "nonsense"], "unknown sink")):
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
                      "webrtc", "--port", str(port), "--size", "64", "--quiet")
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


def test_webrtc_client_receives_frames_and_junk_gets_400(live_server):
    proc, url, port = live_server
    base = f"http://127.0.0.1:{port}"
    assert _post(base + "/offer", b"junk") == 400
    assert _post(base + "/offer", b'{"sdp": 5, "type": "offer"}') == 400
    assert _post(base + "/offer", b'{"sdp": "v=0 but not really", "type": "offer"}') == 400
    assert _post(base + "/offer", b"x" * 200_000) in (400, 413)
    assert _post(base + "/offer", b"{}", "text/plain") == 400
    assert _post(base + "/control", b'{"gain": 99}') == 400
    assert _post(base + "/control", b'{"action": "recalibrate"}') == 200

    async def receive(n: int) -> list:
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
            async with session.post(base + "/offer", json={"sdp": pc.localDescription.sdp,
                                                           "type": pc.localDescription.type}) as resp:
                answer = await resp.json()
        await pc.setRemoteDescription(RTCSessionDescription(**answer))
        try:
            return await asyncio.wait_for(got, 120)
        finally:
            await pc.close()

    frames = asyncio.run(receive(50))
    assert len(frames) == 50 and frames[-1].shape == (64, 64, 3)
    assert float(np.std(frames[-1])) > 5  # a picture, not a blank
    with urllib.request.urlopen(base + "/stats", timeout=10) as resp:
        stats = json.loads(resp.read())
    assert stats["frames"] > 0 and "state" in stats


def test_a_second_server_on_a_busy_port_is_one_line(live_server, fast_bundle, subject):
    _, _, port = live_server
    r = run_script("run_live.py", "--target", str(fast_bundle), "--source", str(subject / "video.mp4"), "--sink",
                   "webrtc", "--port", str(port), "--quiet")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and str(port) in lines[0], r.stderr


def test_browser_plays_the_stream(live_server, tmp_path):
    """Headless Chromium (Debian's chromium + chromium-driver) loads the page; its screenshot shows the avatar."""
    if not os.path.exists("/usr/bin/chromium") or not os.path.exists("/usr/bin/chromedriver"):
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
                      "webrtc", "--port", str(port), "--size", "64", "--quiet")
    wait_for_url(proc)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()[-2000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free again


def test_projection_onto_training_components_and_missing_components():
    from avatar.errors import UserError

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
