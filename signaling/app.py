"""The HTTP side of the server: WebSocket signaling, REST API, browser page, metrics.

``create_app`` builds the aiohttp application around a ``MediaServer``.
Every request path validates its input and answers errors as JSON
``{"error": code, "message": ...}`` with a 4xx/5xx status and a log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import web

from mediaserver.auth import AuthError
from mediaserver.config import LimitsConfig
from mediaserver.room import RoomError
from mediaserver.server import MediaServer
from signaling.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from signaling.metrics import render_metrics
from signaling.prompts_api import post_prompt
from signaling.rollout_api import add_routes as add_rollout_routes  # rollout: admin API (docs/ROLLOUT.md)
from signaling.sip.server import SipEndpoint  # sip: the SIP/IVR bridge (docs/SIP.md)
from signaling.websocket import SignalingConnection

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
SERVER_KEY: web.AppKey[MediaServer] = web.AppKey("server", MediaServer)
CONN_KEY: web.AppKey[Counter[str]] = web.AppKey("connections", Counter)
SOCKETS_KEY: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("sockets", set)  # type: ignore[arg-type]
PREPARED: web.RequestKey[web.WebSocketResponse] = web.RequestKey("prepared", web.WebSocketResponse)  # after handshake
SIP_KEY: web.AppKey[SipEndpoint] = web.AppKey("sip", SipEndpoint)  # sip: set when config.sip_port is
# a media worker behind the front (signaling/cluster): the client's address comes in X-Forwarded-For
FORWARDED_KEY: web.AppKey[bool] = web.AppKey("forwarded", bool)


class AbuseTracker:
    """Addresses whose sockets keep getting closed for policy violations (floods, no join) are cooled down.

    More than ``closes`` such closes within ``window_s`` refuse that address's
    next handshakes for ``window_s`` (HTTP 429 ``cooling-down``): a refused
    handshake costs the server far less than an upgrade and the messages
    before the next close.  Bounded: at most ``max_addresses`` are tracked.
    """

    def __init__(self, closes: int, window_s: float, max_addresses: int = 10_000) -> None:
        self.closes = closes
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._seen: dict[str, tuple[float, int]] = {}  # address -> (window start, policy closes in it)
        self._blocked: dict[str, float] = {}  # address -> monotonic time its cool-down ends
        self.refused = 0

    def blocked_for(self, address: str) -> float:
        """Seconds this address still cools down (0: it may connect)."""
        until = self._blocked.get(address)
        if until is None:
            return 0.0
        left = until - time.monotonic()
        if left <= 0:
            del self._blocked[address]
            return 0.0
        return left

    def policy_closed(self, address: str) -> None:
        now = time.monotonic()
        start, count = self._seen.get(address, (now, 0))
        if now - start > self.window_s:
            start, count = now, 0
        count += 1
        if len(self._seen) >= self.max_addresses and address not in self._seen:
            self._seen = {a: v for a, v in self._seen.items() if now - v[0] <= self.window_s}
            if len(self._seen) >= self.max_addresses:
                return
        self._seen[address] = (start, count)
        if count > self.closes and address not in self._blocked and len(self._blocked) < self.max_addresses:
            log.warning("%s: %d policy closes within %.0f s, cooling down for %.0f s", address, count,
                        self.window_s, self.window_s)
            self._blocked[address] = now + self.window_s
            self._seen.pop(address, None)


ABUSE_KEY: web.AppKey[AbuseTracker] = web.AppKey("abuse", AbuseTracker)


def json_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except (RoomError, AuthError) as exc:
        log.info("%s %s: %s (%s)", request.method, request.path, exc, exc.code)
        return json_error(exc.status, exc.code, str(exc))
    except web.HTTPException as exc:
        if exc.status >= 400 and request.path.startswith("/api"):
            log.info("%s %s: %s", request.method, request.path, exc.reason)
            return json_error(exc.status, exc.reason.lower().replace(" ", "-"), exc.reason)
        raise
    except Exception:  # a bug answers a JSON 500 and a log line, never a dropped connection
        log.exception("%s %s: internal error", request.method, request.path)
        prepared = request.get(PREPARED)
        if prepared is not None:  # a WebSocket already upgraded: nothing more to answer
            return prepared
        return json_error(500, "internal-error", "the server failed to handle this request")


async def read_json(request: web.Request, max_bytes: int = 64 * 1024) -> dict[str, Any]:
    """The request's JSON object body: at most ``max_bytes`` (413), within ``http_body_timeout_s`` (408)."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise RoomError("too-large", f"request bodies are limited to {max_bytes} bytes", status=413)
    timeout = request.app[SERVER_KEY].config.limits.http_body_timeout_s
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while size <= max_bytes:
                chunk = await request.content.read(max_bytes + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except TimeoutError:
        raise RoomError("timeout", f"the request body did not arrive within {timeout:.0f} s", status=408) from None
    if size > max_bytes:
        raise RoomError("too-large", f"request bodies are limited to {max_bytes} bytes", status=413)
    try:
        body = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        raise RoomError("bad-json", "the request body is not valid JSON") from None
    except RecursionError:
        raise RoomError("bad-json", "the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise RoomError("bad-json", "the request body must be a JSON object")
    return body


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else None


def require_admin(request: web.Request, room_id: str) -> None:
    """Admin actions on a room need a token with the admin permission (any token in dev mode)."""
    request.app[SERVER_KEY].auth.require(bearer(request), "admin", room_id)


def refuse_connection(app: web.Application, conns: Counter[str], peer: str,
                      limits: LimitsConfig) -> web.Response | None:
    """Why a new signaling WebSocket from ``peer`` is refused before its handshake (None: it is not):
    the server's total, the address's cool-down, the address's own cap.  O(1), no parsing."""
    if conns.total() >= limits.max_connections:
        log.warning("%s: signaling connection refused: the server holds %d (limit)", peer, limits.max_connections)
        return json_error(503, "server-busy", f"the server is at its limit of {limits.max_connections} "
                                              "signaling connections; retry later")
    cooling = app[ABUSE_KEY].blocked_for(peer)
    if cooling > 0:
        app[ABUSE_KEY].refused += 1
        return json_error(429, "cooling-down", f"this address's connections kept breaking the rules; retry in "
                                               f"{cooling:.0f} s")
    limit = limits.max_connections_per_address
    if conns[peer] >= limit:
        log.warning("%s: too many connections (limit %d)", peer, limit)
        return json_error(429, "too-many-connections",
                          f"at most {limit} signaling connections per address; close one and retry")
    return None


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    server = request.app[SERVER_KEY]
    limits = server.config.limits
    peer = client_address(request)
    conns = request.app[CONN_KEY]
    refused = refuse_connection(request.app, conns, peer, limits)
    if refused is not None:
        return refused
    conns[peer] += 1  # counted before the handshake awaits: simultaneous handshakes cannot overshoot
    try:
        conn: SignalingConnection | None = None
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=limits.max_ws_message_bytes)
        await ws.prepare(request)
        request[PREPARED] = ws
        sockets = request.app[SOCKETS_KEY]
        sockets.add(ws)
        try:
            conn = SignalingConnection(ws, server, peer, request.transport)
            await conn.run()
        finally:
            sockets.discard(ws)
            if conn is not None and conn.policy_closed:
                request.app[ABUSE_KEY].policy_closed(peer)
    finally:
        conns[peer] -= 1
        if conns[peer] <= 0:
            del conns[peer]
    return ws


def client_address(request: web.Request) -> str:
    """The client's address: the socket's peer, or what the front says it was (workers only: their socket
    is a private Unix socket that only the front reaches)."""
    if request.app.get(FORWARDED_KEY):
        forwarded = request.headers.get("X-Forwarded-For", "").strip()
        if forwarded:
            return forwarded[:64]
    return request.remote or "?"


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVER_KEY].health())


async def metrics(request: web.Request) -> web.Response:
    body = await render_metrics(request.app[SERVER_KEY])  # telemetry: collected off the event loop
    if body is None:  # telemetry: OTEL_SDK_DISABLED=true (signaling/telemetry_setup.py)
        return json_error(503, "telemetry-disabled", "the OpenTelemetry SDK is disabled in this process")
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE,
                                            "X-Content-Type-Options": "nosniff"})


async def list_rooms(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    require_admin(request, "*")
    rooms = [{"id": r.id, "participants": len(r.participants), "stages": r.stages}
             for r in server.rooms.rooms.values()]
    return web.json_response({"rooms": rooms})


async def get_room(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    require_admin(request, request.match_info["room_id"])
    room = server.rooms.get(request.match_info["room_id"])
    body = room.describe()
    body["stats"] = [server.stream_stats(s) for s in room.streams.values()]
    return web.json_response(body)


async def put_room_stages(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    require_admin(request, request.match_info["room_id"])
    room = server.rooms.get(request.match_info["room_id"])
    body = await read_json(request)
    await server.set_room_stages(room, body.get("stages"))  # validate_stages: 400 bad-stages
    return web.json_response(room.describe())


async def put_participant_stages(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    require_admin(request, request.match_info["room_id"])
    room = server.rooms.get(request.match_info["room_id"])
    participant = room.participants.get(request.match_info["participant_id"])
    if participant is None:
        raise RoomError("unknown-participant", "no such participant in this room", status=404)
    body = await read_json(request)
    await server.set_participant_stages(participant, body.get("stages"))  # null: the room's stages
    return web.json_response(participant.describe())


async def kick_participant(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    require_admin(request, request.match_info["room_id"])
    room = server.rooms.get(request.match_info["room_id"])
    participant = room.participants.get(request.match_info["participant_id"])
    if participant is None:
        raise RoomError("unknown-participant", "no such participant in this room", status=404)
    await server.kick(participant)
    return web.json_response({"kicked": participant.id})


async def list_stages(request: web.Request) -> web.Response:
    from enhancers.registry import STAGES

    return web.json_response({"stages": sorted(STAGES)})


def create_app(server: MediaServer, *, forwarded: bool = False) -> web.Application:
    """The application around ``server``; ``forwarded``: it is a media worker behind the front."""
    app = web.Application(middlewares=[error_middleware], client_max_size=256 * 1024)
    app[SERVER_KEY] = server
    app[FORWARDED_KEY] = forwarded
    app[CONN_KEY] = Counter()
    app[SOCKETS_KEY] = set()
    app[ABUSE_KEY] = AbuseTracker(server.config.limits.abuse_closes, server.config.limits.abuse_cooldown_s)
    app.router.add_get("/", index)
    app.router.add_get("/ws", websocket_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/stages", list_stages)
    app.router.add_get("/api/rooms", list_rooms)
    app.router.add_get("/api/rooms/{room_id}", get_room)
    app.router.add_put("/api/rooms/{room_id}/stages", put_room_stages)
    app.router.add_put("/api/rooms/{room_id}/participants/{participant_id}/stages", put_participant_stages)
    app.router.add_delete("/api/rooms/{room_id}/participants/{participant_id}", kick_participant)
    app.router.add_post("/api/rooms/{room_id}/prompts", post_prompt)  # signaling/prompts_api.py
    add_rollout_routes(app, server.rollout, require_admin, read_json)  # signaling/rollout_api.py
    app.router.add_static("/static/", STATIC)

    async def on_startup(app: web.Application) -> None:
        await server.start()
        if server.config.sip_port is not None:  # sip: phones call in (0: any free port)
            app[SIP_KEY] = await SipEndpoint.start(server)

    async def on_shutdown(app: web.Application) -> None:
        # Graceful drain (SIGTERM): tell every participant, close sessions, then the sockets,
        # so that aiohttp does not wait for the WebSocket handlers to time out.
        log.info("shutting down: draining %d participants", server.rooms.participant_count)
        if SIP_KEY in app:  # sip: BYE to every call first
            await app[SIP_KEY].close()
        await server.close()
        for ws in list(app[SOCKETS_KEY]):  # type: ignore[index]
            await ws.close(code=1001, message=b"server shutting down")

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    return app
