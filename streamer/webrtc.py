"""WebRTC sink: an aiohttp server (127.0.0.1:8080 by default) with a page that plays the avatar over aiortc.

- ``GET /``: the page (video, live stats, controls). ``POST /offer``: SDP offer → answer; the body is validated
  (JSON, ≤ 64 KiB, ``{"sdp": str, "type": "offer"}``) and anything else gets 400. ``GET /stats``: JSON stats.
  ``POST /control``: recalibrate, pose lock, expression gain.
- Off the loopback interface every request needs the token the server prints (``?token=…`` or the
  ``X-Token`` header).
- Each viewer's track pulls the newest frame when its encoder is ready: a slow viewer skips frames instead
  of queueing them, so it cannot delay the others or build up latency. Viewers are capped; a peer that has not
  connected ``CONNECT_TIMEOUT_S`` after its offer is dropped (an offer whose candidates lead nowhere, or that lacks
  ``a=end-of-candidates``, would otherwise hold a viewer slot forever).
"""

from __future__ import annotations

import asyncio
import fractions
import hmac
import ipaddress
import json
import secrets
import threading
import time
from pathlib import Path

import numpy as np

from avatar.base.errors import UserError
from streamer.pipeline import Controls
from streamer.sinks import Sink

PAGE = Path(__file__).with_name("static") / "index.html"
MAX_OFFER_BYTES = 64 * 1024
CLOCK_RATE = 90_000
CONNECT_TIMEOUT_S = 30.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class FrameBoard:
    """The newest frame and a per-loop event that wakes the viewers' tracks when it changes."""

    def __init__(self):
        self.frame: np.ndarray | None = None
        self.captured = 0.0
        self.serial = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.event: asyncio.Event | None = None

    def publish(self, rgb: np.ndarray, captured: float) -> None:
        self.frame, self.captured = rgb, captured
        self.serial += 1
        if self.loop is not None and self.event is not None:
            self.loop.call_soon_threadsafe(self.event.set)


def _make_track(board: FrameBoard, stats: dict):
    from aiortc import VideoStreamTrack
    from av import VideoFrame

    class AvatarTrack(VideoStreamTrack):
        kind = "video"

        def __init__(self):
            super().__init__()
            self.sent = 0
            self._start = time.monotonic()

        async def recv(self):
            while board.frame is None or board.serial == self.sent:
                board.event.clear()
                await board.event.wait()
            self.sent = board.serial
            frame = VideoFrame.from_ndarray(np.ascontiguousarray(board.frame), format="rgb24")
            frame.pts = int((time.monotonic() - self._start) * CLOCK_RATE)
            frame.time_base = fractions.Fraction(1, CLOCK_RATE)
            stats["frames_sent"] = stats.get("frames_sent", 0) + 1
            stats["send_latency_ms"] = round((time.monotonic() - board.captured) * 1000, 1)
            return frame

    return AvatarTrack


class WebRTCSink(Sink):
    name = "webrtc"

    def __init__(self, controls: Controls, host: str = "127.0.0.1", port: int = 8080, token: str | None = None,
                 max_viewers: int = 4, status=None):
        self.controls, self.host, self.port, self.max_viewers = controls, host, port, max_viewers
        self.token = token or (None if is_loopback(host) else secrets.token_urlsafe(16))
        self.status = status or (lambda: {})
        self.board = FrameBoard()
        self.stats: dict = {}
        self.peers: set = set()
        self._ready = threading.Event()
        self._error: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner = None
        self._thread = threading.Thread(target=self._serve, daemon=True, name="webrtc")
        self._thread.start()
        self._ready.wait(15)
        if self._error:
            raise UserError(self._error)
        if not self._ready.is_set():
            raise UserError(f"the WebRTC server did not start on {host}:{port}")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    # -- server thread ---------------------------------------------------------------------------------------
    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except OSError as exc:
            self._error = (f"cannot listen on {self.host}:{self.port} ({exc.strerror or exc}); is another run_live.py "
                           "using it? choose another with --port")
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        from aiohttp import web

        self.board.loop = asyncio.get_running_loop()
        self.board.event = asyncio.Event()
        app = web.Application(client_max_size=MAX_OFFER_BYTES, middlewares=[self._auth()])
        app.router.add_get("/", self._page)
        app.router.add_post("/offer", self._offer)
        app.router.add_get("/stats", self._stats)
        app.router.add_post("/control", self._control)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=False)
        await site.start()

    def _authorised(self, request) -> bool:
        if not self.token:
            return True
        given = request.query.get("token") or request.headers.get("X-Token") or ""
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _auth(self):
        from aiohttp import web

        @web.middleware
        async def middleware(request, handler):
            if not self._authorised(request):
                return web.json_response({"error": "token required"}, status=403)
            return await handler(request)

        return middleware

    async def _page(self, request):
        from aiohttp import web

        return web.Response(text=PAGE.read_text(), content_type="text/html",
                            headers={"Cache-Control": "no-store"})

    async def _json_body(self, request) -> dict | None:
        if request.content_type != "application/json" or (request.content_length or 0) > MAX_OFFER_BYTES:
            return None
        try:
            raw = await request.content.read(MAX_OFFER_BYTES + 1)
            if len(raw) > MAX_OFFER_BYTES:
                return None
            body = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: deeply nested JSON
            return None
        return body if isinstance(body, dict) else None

    async def _offer(self, request):
        from aiohttp import web
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        body = await self._json_body(request)
        if (body is None or set(body) - {"sdp", "type"} or body.get("type") != "offer"
                or not isinstance(body.get("sdp"), str) or not body["sdp"].startswith("v=0")):
            return web.json_response({"error": 'expected JSON {"sdp": "v=0…", "type": "offer"}'}, status=400)
        if len(self.peers) >= self.max_viewers:
            return web.json_response({"error": f"too many viewers (max {self.max_viewers})"}, status=503)
        # No STUN server: aiortc's default would ask Google's for every viewer; host candidates reach the
        # loopback and the LAN, which is where this server is meant to be watched from.
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.peers.add(pc)

        @pc.on("connectionstatechange")
        async def on_state():
            if pc.connectionState in ("failed", "closed"):
                await pc.close()
                self.peers.discard(pc)

        def give_up():  # ICE waits forever for candidates that nobody trickles: not connected by now, never
            if pc.connectionState != "connected":
                self.peers.discard(pc)
                asyncio.ensure_future(pc.close())

        asyncio.get_running_loop().call_later(CONNECT_TIMEOUT_S, give_up)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="offer"))
            pc.addTrack(_make_track(self.board, self.stats)())
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # a malformed SDP body: the client's fault, not ours
            await pc.close()
            self.peers.discard(pc)
            return web.json_response({"error": f"bad offer: {str(exc)[:200]}"}, status=400)
        return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type})

    async def _stats(self, request):
        from aiohttp import web

        return web.json_response({**self.status(), **self.stats, "viewers": len(self.peers),
                                  "pose_lock": self.controls.pose_lock, "gain": self.controls.gain})

    async def _control(self, request):
        from aiohttp import web

        body = await self._json_body(request)
        if body is None:
            return web.json_response({"error": "expected a JSON object"}, status=400)
        if body.get("action") == "recalibrate":
            self.controls.recalibrate = True
        elif isinstance(body.get("pose_lock"), bool):
            self.controls.pose_lock = body["pose_lock"]
        elif (isinstance(body.get("gain"), (int, float)) and not isinstance(body["gain"], bool)
              and 0.0 <= body["gain"] <= 3.0):  # (True is an int to Python, not a gain)
            self.controls.gain = float(body["gain"])
        else:
            return web.json_response({"error": 'expected {"action": "recalibrate"}, {"pose_lock": bool} or '
                                               '{"gain": 0..3}'}, status=400)
        return web.json_response({"ok": True})

    # -- loop side ---------------------------------------------------------------------------------------------
    def send(self, rgb: np.ndarray, captured: float | None = None) -> None:
        self.board.publish(rgb, captured if captured is not None else time.monotonic())

    def close(self) -> None:
        if self._loop is None or not self._loop.is_running():
            return

        async def shutdown():
            for pc in list(self.peers):
                await pc.close()
            self.peers.clear()
            if self._runner is not None:
                await self._runner.cleanup()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=5)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
