"""Soak test of the WebRTC server of `run_live.py --sink webrtc`: viewers, connect/disconnect churn and junk
requests for a bounded time and count, on the loopback interface only.

    python bench/server_soak.py [--bundle BUNDLE --source clip.mp4] [--minutes 5] [--viewers 4] [--cycles 200] \\
        [--junk 10000] [--json soak.json]

Without --bundle, a synthetic subject (trainer/synth.py, 48 frames at 128²) is prepared at 64² and a fast-field
avatar is fitted on it (trainer/fit.py --preset smoke --max-steps 200; about a minute on 2 cores); without
--source the subject's video drives the avatar.

1. starts `run_live.py --target BUNDLE --source VIDEO --loop --sink webrtc --port P --render-size 64 --quiet` on a free
   127.0.0.1 port (with --max-viewers VIEWERS + 2, so that the churn below has room beside the viewers);
2. warm-up: VIEWERS viewers receive frames for --warm-up seconds (30) with connect/disconnect cycles beside; then
   the server's resident memory (VmRSS) and open file descriptors are recorded (start), and every few seconds after;
3. load: VIEWERS aiortc viewers stay connected for --minutes, counting the frames each receives, while --cycles
   connect/disconnect cycles run one after another beside them (offer, answer, a frame or two, close);
   then /stats is polled until "viewers" is 0;
4. junk: --junk requests (--concurrency in flight) to POST /offer and POST /control with junk in every field
   (wrong types, huge strings up to and beyond the 64 KiB limit, malformed / truncated / mangled SDP, unknown
   keys, invalid UTF-8, non-JSON, wrong content types, empty and chunked bodies, deeply nested JSON,
   NaN/Infinity) and other methods and paths; status codes are counted. A 5xx or a failed connection is a server
   error, except 503 "too many viewers" (the cap doing its job: junk offers that parse are real peers until
   they fail to connect). Then /stats is polled until "viewers" is 0 again (--settle seconds at most);
5. end: memory and descriptors again, the server must still be alive and answer /stats; SIGTERM stops it
   (killed if it has not exited 30 s later; also on Ctrl-C or an error).

Prints a Markdown table and a last line `PASS` or `FAIL: reasons` (exit 1): the criteria are no server errors,
RSS growth ≤ --max-growth-mb (50), no peers left, server alive, and the load really ran (every viewer got
frames, every cycle got a frame). Tracebacks the server printed are listed below the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MAX_BODY = 64 * 1024  # streamer/webrtc.py's limit on a request body
SAMPLE_EVERY_S = 5.0


def say(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


# -- a subject and an avatar when none is given ----------------------------------------------------------------
def make_subject(work: Path) -> Path:
    """A short synthetic talking head (trainer/synth.py); returns its directory (video.mp4, background.png)."""
    from trainer.synth import SynthConfig
    from trainer.synth import make_subject as synth

    out = work / "subject"
    synth(SynthConfig(out=str(out), frames=48, size=128, novel=6, seed=3))
    return out


def make_avatar(subject: Path, work: Path) -> Path:
    """The subject prepared at 64² and a fast-field avatar fitted on it briefly (as tests/conftest.py does)."""
    from avatar.data.prepare import PrepareConfig, prepare_dataset

    data, out = work / "d64", work / "avatar"
    prepare_dataset(PrepareConfig(video=str(subject / "video.mp4"), out=str(data), size=64,
                                  background=str(subject / "background.png")), progress=False, log=lambda s: None)
    r = subprocess.run([sys.executable, "trainer/fit.py", "--data", str(data), "--field", "fast", "--preset", "smoke",
                        "--max-steps", "200", "--eval-frames", "3", "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise RuntimeError(f"trainer/fit.py failed: {r.stderr[-2000:]}")
    return out


# -- the server process ----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():
    """A preexec_fn that has the server get SIGTERM should this process die without stopping it (Linux), or None.
    prctl is looked up here, before the fork: the child only calls it."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Server:
    """`run_live.py --sink webrtc` as a subprocess whose output goes to files; always stopped by `stop()`."""

    def __init__(self, bundle: str, source: str, port: int, max_viewers: int, logs: Path):
        self.port, self.logs = port, logs
        self.out_path, self.err_path = logs / "server.out", logs / "server.err"
        cmd = [sys.executable, "run_live.py", "--target", bundle, "--source", source, "--loop", "--sink", "webrtc",
               "--port", str(port), "--render-size", "64", "--max-viewers", str(max_viewers), "--quiet"]
        self.command = " ".join(cmd[1:])
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                         preexec_fn=_die_with_parent() if sys.platform == "linux" else None)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for_url(self, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.out_path.read_text().splitlines():
                if "http://" in line:
                    return line[line.index("http://"):].strip()
            if not self.alive():
                raise RuntimeError(f"run_live.py exited with {self.proc.returncode}: {self.stderr()[-2000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"run_live.py printed no URL in {timeout:.0f} s: {self.stderr()[-2000:]}")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace") if self.err_path.exists() else ""

    def sample(self) -> dict:
        """Resident memory (MB) and open file descriptors of the server process."""
        pid = self.proc.pid
        rss_kb = None
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
        return {"t": time.monotonic(), "rss_mb": round(rss_kb / 1024, 1), "fds": len(os.listdir(f"/proc/{pid}/fd"))}

    def stop(self, timeout: float = 30) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):  # (a second Ctrl-C: no more waiting)
                say("the server did not exit after SIGTERM: killing it")
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def tracebacks(text: str) -> list[str]:
    """The error reports in the server's stderr (aiohttp's "Error handling request", asyncio's "Task exception was
    never retrieved", bare tracebacks), each with its traceback, as blocks of text."""
    starters = ("Traceback (most recent call last)", "Error handling request", "Task exception was never retrieved",
                "Exception in callback", "Unhandled exception")
    blocks: list[list[str]] = []
    open_block = False
    for line in text.splitlines():
        if not open_block and blocks and line.startswith(("During handling", "The above exception")):
            open_block = True  # a chained exception: the same report goes on
        if line.startswith(starters) and not (open_block and line.startswith("Traceback")):
            blocks.append([line])
            open_block = True
        elif open_block:
            blocks[-1].append(line)
            inside = line.startswith((" ", "\t", "Traceback", "During handling", "The above exception")) or not line
            if not inside and any(b.startswith("Traceback") for b in blocks[-1]):
                open_block = False  # the exception line ends the traceback
    return ["\n".join(b) for b in blocks]


# -- WebRTC clients --------------------------------------------------------------------------------------------
class Refused(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(f"HTTP {status}: {text[:200]}")
        self.status = status


async def connect(session, base: str, timeout: float = 30):
    """An aiortc receiver connected to the server: returns (peer connection, remote video track)."""
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # host candidates only: nothing leaves the machine
    try:
        pc.addTransceiver("video", direction="recvonly")
        track = asyncio.get_running_loop().create_future()

        @pc.on("track")
        def on_track(t):
            if not track.done():
                track.set_result(t)

        await pc.setLocalDescription(await pc.createOffer())
        async with session.post(base + "/offer", json={"sdp": pc.localDescription.sdp,
                                                       "type": pc.localDescription.type}) as resp:
            if resp.status != 200:
                raise Refused(resp.status, await resp.text())
            answer = await resp.json()
        await pc.setRemoteDescription(RTCSessionDescription(**answer))
        return pc, await asyncio.wait_for(track, timeout)
    except BaseException:
        await pc.close()
        raise


async def viewer(session, base: str, until: float, result: dict) -> None:
    """Stay connected until `until` (monotonic), counting received frames into result["frames"]."""
    result.update(frames=0, stalls=0, error=None)
    try:
        pc, track = await connect(session, base)
    except Exception as exc:
        result["error"] = f"connect: {exc!r}"[:300]
        return
    try:
        while (left := until - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(track.recv(), min(left, 10.0))
                result["frames"] += 1
            except asyncio.TimeoutError:
                if until - time.monotonic() > 0:
                    result["stalls"] += 1  # 10 s without a frame
    except Exception as exc:  # the track ended (the server dropped us)
        result["error"] = f"stream: {exc!r}"[:300]
    finally:
        await pc.close()


async def cycle(session, base: str, frames: int = 2, full_retry_s: float = 15.0) -> dict:
    """Connect, receive `frames` frames, close. A 503 (all viewer slots taken) is retried for `full_retry_s`."""
    deadline = time.monotonic() + full_retry_s
    retries = 0
    while True:
        try:
            pc, track = await connect(session, base)
            break
        except Refused as exc:
            if exc.status != 503 or time.monotonic() > deadline:
                return {"ok": False, "error": str(exc), "retries": retries}
            retries += 1
            await asyncio.sleep(0.2)
        except Exception as exc:
            return {"ok": False, "error": f"connect: {exc!r}"[:300], "retries": retries}
    try:
        for _ in range(frames):
            await asyncio.wait_for(track.recv(), 20)
        return {"ok": True, "retries": retries}
    except Exception as exc:
        return {"ok": False, "error": f"receive: {exc!r}"[:300], "retries": retries}
    finally:
        await pc.close()


async def server_stats(session, base: str) -> dict | None:
    """The server's GET /stats (None when it does not answer)."""
    try:
        async with session.get(base + "/stats") as resp:
            return await resp.json() if resp.status == 200 else None
    except Exception:
        return None


async def peers(session, base: str) -> int | None:
    stats = await server_stats(session, base)
    return None if stats is None else stats["viewers"]


async def wait_for_no_peers(session, server: "Server", timeout: float) -> tuple[int | None, float]:
    """Poll /stats until "viewers" is 0: (last count, seconds waited)."""
    start = time.monotonic()
    while True:
        n = await peers(session, server.base)
        if n == 0 or time.monotonic() - start > timeout or not server.alive():
            return n, round(time.monotonic() - start, 1)
        await asyncio.sleep(0.5)


async def real_offer() -> str:
    """The SDP of a real aiortc receive-only offer (its peer connection closed again: nobody answers on it)."""
    from aiortc import RTCConfiguration, RTCPeerConnection

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


# -- junk ------------------------------------------------------------------------------------------------------
JSON = "application/json"


def _garbage(rng: random.Random, n: int) -> str:
    alphabet = "abcxyz0129 =:/.-_+*#@!?~\t\"\\{}[]" + "é€😀\u0000\u202e"
    text = "".join(rng.choice(alphabet) for _ in range(n))
    return text.replace(".local", ".loc")  # never an mDNS name: nothing may leave the loopback


def _garbage_lines(rng: random.Random, n: int) -> str:
    prefixes = ["a=", "m=", "c=", "o=", "s=", "t=", "b=", "a=rtpmap:", "a=fingerprint:", "a=ice-ufrag:", "a=mid:",
                "m=video ", "a=group:BUNDLE ", "x=", "", " "]
    return "\r\n".join(rng.choice(prefixes) + _garbage(rng, rng.randint(0, 40)) for _ in range(n))


def _mangle(rng: random.Random, sdp: str) -> str:
    """A real SDP with one to three lines changed. Candidate lines are only dropped, cut short before their
    address, or duplicated, so that no mangled candidate points anywhere but at this machine."""
    lines = sdp.split("\r\n")
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(1, len(lines))  # keep "v=0" first
        line = lines[i]
        op = rng.choice(["drop", "dup", "swap", "token", "cut", "crlf", "value", "upper"])
        if line.startswith("a=candidate") and op not in ("drop", "dup"):
            op = "cut_candidate"
        if op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(i, line)
        elif op == "swap":
            j = rng.randrange(1, len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "token":
            parts = line.split(" ")
            parts[rng.randrange(len(parts))] = _garbage(rng, rng.randint(0, 12))
            lines[i] = " ".join(parts)
        elif op == "cut":
            lines[i] = line[: rng.randrange(len(line) + 1)]
        elif op == "crlf":
            lines[i] = line + "\n"
        elif op == "value":
            key = line.split(":", 1)[0] if ":" in line else line[:2]
            lines[i] = key + ":" + rng.choice(["", "-1", "99999999999999999999", "\u0000", "😀", "a" * 300,
                                               _garbage(rng, 20)])
        elif op == "upper":
            lines[i] = line.upper()
        elif op == "cut_candidate":
            lines[i] = " ".join(line.split(" ")[: rng.randint(0, 3)])
        if len(lines) < 2:
            break
    return "\r\n".join(lines)


def junk_sdp(rng: random.Random, real: str) -> str:
    kind = rng.choice(["garbage", "garbage", "short", "truncated", "truncated", "mangled", "mangled", "mangled",
                       "no_end", "no_candidates", "real", "huge_line"])
    if kind == "garbage":
        return "v=0\r\n" + _garbage_lines(rng, rng.randint(0, 30))
    if kind == "short":
        return rng.choice(["v=0", "v=0\r\n", "v=0\n", "v=0\r\n\r\n", "v=0 ", "v=00", "v=0\x00"])
    if kind == "truncated":
        return real[: rng.randint(3, len(real))]
    if kind == "mangled":
        return _mangle(rng, real)
    if kind == "no_end":  # a whole offer without a=end-of-candidates (as browsers send them)
        return real.replace("a=end-of-candidates\r\n", "")
    if kind == "no_candidates":
        return "\r\n".join(l for l in real.split("\r\n") if not l.startswith("a=candidate")
                           and not l.startswith("a=end-of-candidates"))
    if kind == "real":
        return real
    return real + "a=x-junk:" + "y" * rng.randint(1000, 60_000) + "\r\n"


WRONG_TYPES = [0, 1, -1, 3.5, -0.0, 1e308, 10 ** 30, True, False, None, [], [1, 2], ["offer"], {}, {"sdp": "v=0"},
               "", " ", "null", "true", "1", "offer\u0000", "😀"]


def _value(rng: random.Random, valid: list) -> object:
    r = rng.random()
    if r < 0.1 and valid:
        return rng.choice(valid)
    if r < 0.75:
        return rng.choice(WRONG_TYPES)
    if r < 0.9:
        return _garbage(rng, rng.randint(1, 200))
    return "x" * rng.choice([1000, 30_000, 65_000, 70_000])


def _nested(rng: random.Random) -> bytes:
    depth = rng.choice([100, 1000, 5000, 20_000, 30_000])
    if rng.random() < 0.5:
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def _sized_offer(size: int) -> bytes:
    """A JSON offer body of exactly `size` bytes (≥ 40)."""
    head, tail = b'{"type": "offer", "sdp": "v=0\\r\\n', b'"}'
    return head + b"a" * (size - len(head) - len(tail)) + tail


def junk_request(rng: random.Random, real: str) -> dict:
    """One junk request: method, path, body bytes (None: none), content type (None: no header), chunked, kind."""
    route = rng.choice(["/offer", "/offer", "/offer", "/control", "/control", "other"])
    if route == "other":
        method, path = rng.choice([("GET", "/offer"), ("GET", "/control"), ("PUT", "/offer"), ("DELETE", "/control"),
                                   ("PATCH", "/offer"), ("OPTIONS", "/offer"), ("HEAD", "/control"), ("POST", "/stats"),
                                   ("POST", "/"), ("GET", "/nope"), ("GET", "/%2e%2e/%2e%2e/etc/passwd"),
                                   ("GET", "/stats?token=" + "t" * 2000), ("POST", "/offer/"), ("GET", "/?x=\u00e9")])
        body = rng.choice([None, b"", b"{}", json.dumps({"sdp": real, "type": "offer"}).encode()])
        return {"method": method, "path": path, "body": body, "ctype": JSON if body else None, "chunked": False,
                "kind": f"{method} {path.split('?')[0][:20]}"}
    ctype, chunked = JSON, False
    r = rng.random()
    if r < 0.45:  # a JSON object with junk in its fields
        if route == "/offer":
            obj = {"sdp": junk_sdp(rng, real) if rng.random() < 0.6 else _value(rng, []),
                   "type": _value(rng, ["offer"] * 8 + ["answer", "pranswer", "rollback", "OFFER"])}
            if rng.random() < 0.3:
                del obj[rng.choice(["sdp", "type"])]
        else:
            key = rng.choice(["action", "pose_lock", "gain"])
            obj = {key: _value(rng, {"action": ["recalibrate", "quit", "reset"], "pose_lock": [True, False],
                                     "gain": [0, 1, 2.5, 3]}[key])}
        if rng.random() < 0.25:
            obj[rng.choice(["extra", "__proto__", "constructor", "", "sdp ", _garbage(rng, 8)])] = _value(rng, [])
        text = json.dumps(obj, ensure_ascii=rng.random() < 0.5)
        body, kind = text.encode("utf-8", "surrogatepass"), "json fields"
    elif r < 0.55:  # NaN / Infinity / huge numbers / lone surrogates / duplicate keys, as raw JSON text
        field = "gain" if route == "/control" else rng.choice(["sdp", "type"])
        value = rng.choice(["NaN", "Infinity", "-Infinity", "1e309", "-1e309", "1" + "0" * 5000, "-0", "1e-400",
                            '"\\ud800"', '"\\udfff v=0"', '"v=0\\u0000"', "[NaN]", "{}", "3.0000000001", "true"])
        text = "{" + f'"{field}": {value}'
        if rng.random() < 0.3:
            text += f', "{field}": 1'
        body, kind = (text + "}").encode(), "raw json"
    elif r < 0.65:
        body, kind = _nested(rng), "deep nesting"
    elif r < 0.75:  # sizes around the 64 KiB limit
        size = rng.choice([MAX_BODY - 1, MAX_BODY, MAX_BODY + 1, 100_000, 1_000_000])
        body, kind = _sized_offer(size), f"size {size}"
        chunked = rng.random() < 0.3
    else:
        raw_kind = rng.choice(["empty", "not json", "invalid utf-8", "utf-16", "bom", "top-level", "wrong type",
                               "no type", "form", "chunked"])
        kind = raw_kind
        good = json.dumps({"sdp": real, "type": "offer"} if route == "/offer" else {"gain": 1.0}).encode()
        if raw_kind == "empty":
            body = b""
        elif raw_kind == "not json":
            body = _garbage(rng, rng.randint(1, 300)).encode()
        elif raw_kind == "invalid utf-8":
            body = b'{"sdp": "v=0\xff\xfe\xc3\x28", "type": "offer"}' if rng.random() < 0.5 else \
                bytes(rng.randrange(256) for _ in range(rng.randint(1, 500)))
        elif raw_kind == "utf-16":
            body = good.decode().encode("utf-16")
        elif raw_kind == "bom":
            body = b"\xef\xbb\xbf" + good
        elif raw_kind == "top-level":
            body = rng.choice([b"[]", b"null", b"1", b'"offer"', b"true", b"[{\"sdp\": \"v=0\"}]"])
        elif raw_kind == "wrong type":
            body, ctype = good, rng.choice(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                            "application/json5", "application/jsonx", "json", "*/*", ";;;",
                                            "application/json; charset=latin-1", "APPLICATION/JSON"])
        elif raw_kind == "no type":
            body, ctype = good, None
        elif raw_kind == "form":
            body, ctype = b"sdp=v%3D0&type=offer", "application/x-www-form-urlencoded"
        else:
            body, chunked = good, True
    return {"method": "POST", "path": route, "body": body, "ctype": ctype, "chunked": chunked, "kind": kind}


async def send_junk(session, base: str, req: dict) -> tuple[int | str, str]:
    """(status code or "connection error: …", body text head)."""
    import aiohttp

    headers, skip = {}, []
    if req["ctype"] is None:
        skip = ["Content-Type"]
    else:
        headers["Content-Type"] = req["ctype"]
    data = req["body"]
    if req["chunked"] and data is not None:
        async def chunks(payload=data):
            for i in range(0, len(payload), 8192):
                yield payload[i:i + 8192]
        data = chunks()
    try:
        async with session.request(req["method"], base + req["path"], data=data, headers=headers,
                                   skip_auto_headers=skip) as resp:
            return resp.status, (await resp.text(errors="replace"))[:300]
    except asyncio.TimeoutError:
        return "connection error: timeout", ""
    except aiohttp.ClientError as exc:
        return f"connection error: {type(exc).__name__}", str(exc)[:300]


async def run_junk(base: str, count: int, concurrency: int, seed: int, real: str) -> dict:
    import aiohttp

    rng = random.Random(seed)
    statuses: Counter = Counter()
    by_route: dict[str, Counter] = {}
    errors: list[dict] = []
    full = 0
    queue = iter(range(count))
    timeout = aiohttp.ClientTimeout(total=60)
    start = time.monotonic()
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def worker():
            nonlocal full
            for _ in queue:
                req = junk_request(rng, real)
                status, text = await send_junk(session, base, req)
                statuses[str(status)] += 1
                route = req["path"] if req["method"] == "POST" and req["path"] in ("/offer", "/control") else "other"
                by_route.setdefault(route, Counter())[str(status)] += 1
                if status == 503 and "too many viewers" in text:
                    full += 1
                elif isinstance(status, str) or status >= 500:
                    if len(errors) < 20:
                        body = req["body"] or b""
                        errors.append({"status": status, "response": text, "method": req["method"],
                                       "path": req["path"], "content_type": req["ctype"], "chunked": req["chunked"],
                                       "kind": req["kind"], "body_bytes": len(body),
                                       "body_head": body[:300].decode("utf-8", "backslashreplace")})
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.monotonic() - start
    server_errors = sum(v for k, v in statuses.items() if k.startswith("connection error") or
                        (k.isdigit() and int(k) >= 500)) - full
    return {"requests": count, "seconds": round(seconds, 1), "per_second": round(count / seconds, 1) if seconds else 0,
            "statuses": dict(sorted(statuses.items())), "by_route": {k: dict(sorted(v.items())) for k, v in
                                                                    by_route.items()},
            "refused_full": full, "server_errors": server_errors, "error_examples": errors}


# -- the soak --------------------------------------------------------------------------------------------------
async def soak(server: Server, args, results: dict, handle: dict) -> None:
    import aiohttp

    handle.update(loop=asyncio.get_running_loop(), task=asyncio.current_task())
    samples: list[dict] = results["samples"]
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        # warm-up: one-time imports and allocations (encoders, the ICE stack, the allocator's arenas for as many
        # peers at once as the load will have) are not growth. Measured: RSS climbs ~65 MB over the first ~25 s
        # of viewers plus churn, then stays flat (±10 MB) for the next 5 minutes.
        say(f"warm-up: {args.viewers} viewers with connect/disconnect cycles beside, {args.warm_up:.0f} s")
        until = time.monotonic() + args.warm_up
        warm = [{} for _ in range(args.viewers)]

        async def warm_churn():
            done = 0
            while time.monotonic() < until or done < 2:
                await cycle(session, server.base)
                done += 1

        await asyncio.gather(warm_churn(), *(viewer(session, server.base, until, w) for w in warm))
        n, _ = await wait_for_no_peers(session, server, args.settle)
        results["warm_up"] = {"viewer_frames": [w.get("frames") for w in warm], "peers_after": n}
        results["start"] = server.sample()
        samples.append({**results["start"], "phase": "start"})

        async def sampler():
            while True:
                await asyncio.sleep(SAMPLE_EVERY_S)
                try:
                    samples.append({**server.sample(), "phase": phase})
                except OSError:  # the server has gone: the phase notices
                    pass

        phase = "load"
        sampling = asyncio.ensure_future(sampler())
        try:
            say(f"load: {args.viewers} viewers for {args.minutes} min, {args.cycles} connect/disconnect cycles beside")
            until = time.monotonic() + args.minutes * 60
            views = [{} for _ in range(args.viewers)]
            cycles: list[dict] = []

            async def churn():
                for _ in range(args.cycles):
                    cycles.append(await cycle(session, server.base))

            load_start = time.monotonic()
            rendered_before = ((await server_stats(session, server.base)) or {}).get("frames", 0)

            async def rendered_at_end():  # the frames the server's loop made while the viewers watched
                await asyncio.sleep(max(0.0, until - time.monotonic()))
                return ((await server_stats(session, server.base)) or {}).get("frames", 0) - rendered_before

            rendered, *_ = await asyncio.gather(rendered_at_end(), churn(),
                                                *(viewer(session, server.base, until, v) for v in views))
            results["load"] = {"seconds": round(time.monotonic() - load_start, 1), "viewers": views,
                               "frames_rendered": rendered,
                               "cycles_ok": sum(c["ok"] for c in cycles),
                               "cycles_failed": sum(not c["ok"] for c in cycles),
                               "cycle_retries_503": sum(c["retries"] for c in cycles),
                               "cycle_errors": [c["error"] for c in cycles if not c["ok"]][:10]}
            if not server.alive():
                raise RuntimeError(f"the server died during the load (exit code {server.proc.returncode})")
            n, waited = await wait_for_no_peers(session, server, args.settle)
            results["load"].update(peers_after=n, settle_seconds=waited)
            say(f"load done: frames per viewer {[v['frames'] for v in views]}, cycles ok "
                f"{results['load']['cycles_ok']}/{args.cycles}, peers after {n} ({waited} s)")

            phase = "junk"
            say(f"junk: {args.junk} requests, {args.concurrency} in flight")
            results["junk"] = await run_junk(server.base, args.junk, args.concurrency, args.seed, await real_offer())
            if not server.alive():
                raise RuntimeError(f"the server died during the junk (exit code {server.proc.returncode})")
            say(f"junk done in {results['junk']['seconds']} s: {results['junk']['statuses']}")
            n, waited = await wait_for_no_peers(session, server, args.settle)
            results["junk"].update(peers_after=n, settle_seconds=waited)
        finally:
            sampling.cancel()
        results["alive"] = server.alive()
        results["stats_answers"] = await peers(session, server.base) is not None
        results["peers_end"] = n
        if server.alive():
            results["end"] = server.sample()
            samples.append({**results["end"], "phase": "end"})


def verdict(results: dict, args) -> list[str]:
    fails = []
    load, junk = results.get("load"), results.get("junk")
    if load is None or junk is None:
        return [f"the soak did not finish ({results.get('error', 'unknown error')})"]
    if junk["server_errors"]:
        fails.append(f"{junk['server_errors']} server errors")
    start, end = results.get("start"), results.get("end")
    if not results["alive"] or not results["stats_answers"]:
        fails.append("server died" if not results["alive"] else "/stats did not answer at the end")
    elif end["rss_mb"] - start["rss_mb"] > args.max_growth_mb:
        fails.append(f"RSS grew {end['rss_mb'] - start['rss_mb']:.1f} MB (> {args.max_growth_mb})")
    if results["peers_end"] != 0 or load["peers_after"] != 0:
        fails.append(f"peers left: {load['peers_after']} after the load, {results['peers_end']} at the end")
    bad = [v["error"] or "0 frames" for v in load["viewers"] if v["frames"] == 0 or v["error"]]
    if bad and args.minutes > 0:
        fails.append("a viewer got no frames or was dropped: " + "; ".join(bad))
    if load["cycles_failed"]:
        fails.append(f"{load['cycles_failed']} connect/disconnect cycles failed ({load['cycle_errors'][0]})")
    return fails


def _second_half(samples: list[dict]) -> str:
    """A leak keeps climbing; allocator warm-up levels off: RSS at the middle and the end of the load phase."""
    load = [s["rss_mb"] for s in samples if s.get("phase") == "load"]
    if len(load) < 4:
        return "–"
    half = load[len(load) // 2:]
    return f"{half[0]} / {half[-1]} ({half[-1] - half[0]:+.1f}; range {min(half)}–{max(half)})"


def markdown(results: dict, args) -> str:
    load, junk, start, end = results.get("load", {}), results.get("junk", {}), results.get("start", {}), \
        results.get("end", {})
    frames = [v["frames"] for v in load.get("viewers", [])]
    fps = [f / (args.minutes * 60) for f in frames] if args.minutes else []
    rss = [s["rss_mb"] for s in results["samples"]]
    fmt = lambda v, unit="": "–" if v is None else f"{v}{unit}"  # noqa: E731
    rows = [
        ("viewers × minutes", f"{args.viewers} × {args.minutes}"),
        ("frames delivered per viewer (min / median)",
         f"{min(frames)} / {statistics.median(frames):.0f}"
         + (f" ({min(fps):.1f} / {statistics.median(fps):.1f} fps)" if fps else "") if frames else "–"),
        ("frames the server's loop rendered meanwhile", f"{load['frames_rendered']} "
         f"({load['frames_rendered'] / (args.minutes * 60):.1f} fps)" if load and args.minutes else "–"),
        ("viewer stalls (10 s without a frame) / dropped", f"{sum(v['stalls'] for v in load.get('viewers', []))} / "
                                                           f"{sum(bool(v['error']) for v in load.get('viewers', []))}"),
        ("connect/disconnect cycles done (failed; 503 retries)",
         f"{fmt(load.get('cycles_ok'))} of {args.cycles} ({fmt(load.get('cycles_failed'))}; "
         f"{fmt(load.get('cycle_retries_503'))})"),
        ("load phase", f"{fmt(load.get('seconds'), ' s')}; peers after {fmt(load.get('peers_after'))} "
                       f"(settled in {fmt(load.get('settle_seconds'), ' s')})"),
        ("junk requests", f"{junk.get('requests', 0)} in {fmt(junk.get('seconds'), ' s')} "
                          f"({fmt(junk.get('per_second'))}/s, {args.concurrency} in flight)"),
        ("status codes", ", ".join(f"{k}: {v}" for k, v in junk.get("statuses", {}).items()) or "–"),
        ("of which 503 too many viewers (not an error)", fmt(junk.get("refused_full"))),
        ("server errors (5xx + connection failures)", fmt(junk.get("server_errors"))),
        ("RSS start / end / growth (MB)",
         f"{start['rss_mb']} / {end['rss_mb']} / {end['rss_mb'] - start['rss_mb']:+.1f} (peak {max(rss)})"
         if start and end else "–"),
        ("RSS over the load's second half: first / last sample (MB)", _second_half(results["samples"])),
        ("open fds start / end", f"{start['fds']} / {end['fds']} (peak {max(s['fds'] for s in results['samples'])})"
         if start and end else "–"),
        ("peers at end", fmt(results.get("peers_end"))
         + (f" (settled in {junk['settle_seconds']} s after the junk)" if "settle_seconds" in junk else "")),
        ("server alive, /stats answers", f"{'yes' if results.get('alive') else 'NO'}, "
                                         f"{'yes' if results.get('stats_answers') else 'NO'}"),
        ("tracebacks in server stderr", str(len(results.get("tracebacks", [])))),
    ]
    lines = ["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", help="avatar bundle (a fast field); default: fit one on a synthetic subject")
    p.add_argument("--source", help="video file that drives the avatar (looped); default: a synthetic subject's")
    p.add_argument("--minutes", type=float, default=5.0, help="how long the viewers stay connected (default 5)")
    p.add_argument("--viewers", type=int, default=4, help="viewers connected throughout (default 4)")
    p.add_argument("--cycles", type=int, default=200, help="connect/disconnect cycles beside them (default 200)")
    p.add_argument("--junk", type=int, default=10_000, help="junk requests (default 10000)")
    p.add_argument("--concurrency", type=int, default=16, help="junk requests in flight (default 16)")
    p.add_argument("--settle", type=float, default=90.0,
                   help="seconds to wait for the server's peer count to fall to 0 after each phase (default 90)")
    p.add_argument("--max-growth-mb", type=float, default=50.0, help="largest RSS growth that passes (default 50)")
    p.add_argument("--warm-up", type=float, default=30.0,
                   help="seconds of viewers and churn before the start sample (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the junk")
    p.add_argument("--json", help="write the figures (and samples, errors, tracebacks) to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("minutes", "viewers", "cycles", "junk"):
        if getattr(args, name) < 0:
            say(f"error: --{name} must not be negative")
            return 2
    if args.viewers < 1 or args.concurrency < 1:
        say("error: --viewers and --concurrency must be at least 1")
        return 2
    if args.bundle and not (Path(args.bundle) / "avatar.json").is_file():
        say(f"error: {args.bundle} is not an avatar bundle (no avatar.json); make one with trainer/fit.py --field fast")
        return 2
    if args.source and not Path(args.source).is_file():
        say(f"error: no such video: {args.source}")
        return 2

    def on_term(signum, frame):
        raise KeyboardInterrupt  # so that the server is stopped on the way out

    signal.signal(signal.SIGTERM, on_term)
    results: dict = {"samples": [], "config": {k: v for k, v in vars(args).items()}}
    server = None
    handle: dict = {}  # the soak's event loop and task, to cancel it from here
    interrupted = False

    def run_soak():
        try:
            asyncio.run(soak(server, args, results, handle))
        except BaseException as exc:  # noqa: B036 — reported, not raised, in this thread
            results["error"] = f"{type(exc).__name__}: {exc}"
            say(f"the soak stopped: {results['error']}")

    with tempfile.TemporaryDirectory(prefix="server_soak_") as tmp:
        work = Path(tmp)
        try:
            source, bundle = args.source, args.bundle
            if not source or not bundle:
                started = time.monotonic()
                say("making a synthetic subject" + ("" if bundle else " and fitting an avatar on it (about a minute)"))
                subject = make_subject(work)
                source = source or str(subject / "video.mp4")
                bundle = bundle or str(make_avatar(subject, work))
                say(f"… ready in {time.monotonic() - started:.0f} s")
            server = Server(bundle, source, free_port(), args.viewers + 2, work)
            results["command"] = server.command
            results["url"] = server.wait_for_url()
            say(f"server: {results['url']} (pid {server.proc.pid})")
            # The clients run in a thread of their own: Ctrl-C / SIGTERM arrive here, in the main thread, which stops
            # the server first and does not depend on the clients' event loop winding down.
            soak_thread = threading.Thread(target=run_soak, daemon=True, name="soak")
            soak_thread.start()
            while soak_thread.is_alive():
                soak_thread.join(0.5)
        except KeyboardInterrupt:
            interrupted = True
            say("interrupted: stopping the server")
        except RuntimeError as exc:  # the avatar or the server could not be made / started
            results["error"] = str(exc)
            say(f"error: {exc}")
        finally:
            if server is not None:
                results.setdefault("alive", server.alive())
                results["exit_code"] = server.stop()
            if handle.get("task") is not None and not handle["task"].done():
                try:
                    handle["loop"].call_soon_threadsafe(handle["task"].cancel)
                except RuntimeError:  # its loop has closed meanwhile
                    pass
            if server is not None:
                results["tracebacks"] = tracebacks(server.stderr())
                results["server_stderr_tail"] = server.stderr()[-3000:]
    if interrupted:
        return 130
    fails = verdict(results, args)
    print(f"WebRTC server soak, {date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"64² output; bundle {Path(args.bundle).name if args.bundle else 'synthetic (fitted here)'}, source "
          f"{Path(args.source).name if args.source else 'synthetic'}\n")
    print(markdown(results, args))
    for example in results.get("junk", {}).get("error_examples", [])[:5]:
        print(f"\nserver error: {json.dumps(example, ensure_ascii=False)}")
    for block in results.get("tracebacks", [])[:3]:
        print("\nserver traceback:\n" + block)
    print("\n" + ("PASS" if not fails else "FAIL: " + "; ".join(fails)))
    results["verdict"] = "PASS" if not fails else fails
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0 if not fails else 1


if __name__ == "__main__":
    sys.exit(main())
