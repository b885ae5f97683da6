"""The front process of a multi-worker server: the public port in front of N media workers.

It serves the browser page itself, proxies every signaling WebSocket to the
worker of its room (``SignalingProxy``), sends HTTP API requests about a room
to that room's worker unchanged (the worker authorises them, as it would
alone), gathers ``/api/rooms``, ``/healthz`` and ``/metrics`` from all workers,
and runs the room bus of rooms that span workers on a private Unix socket.  Connection
limits (per address, in all, cool-down of abusive addresses, HTTP connection
cap and header deadline) apply here, before anything reaches a worker.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections import Counter
from typing import Any, Optional

import aiohttp
from aiohttp import web

from mediaserver.config import ServerConfig, worker_count
from mediaserver.room import ROOM_ID_RE
from signaling.app import (
    ABUSE_KEY,
    STATIC,
    AbuseTracker,
    client_address,
    error_middleware,
    json_error,
    refuse_connection,
)
from signaling.cluster.bus import RoomBusHub
from signaling.cluster.nodes import ClusterRouter, NodeDirectory
from signaling.cluster.pool import WorkerPool
from signaling.cluster.prometheus import merge_expositions
from signaling.cluster.proxy import SignalingProxy
from signaling.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

log = logging.getLogger(__name__)

POOL_KEY: web.AppKey[WorkerPool] = web.AppKey("pool", WorkerPool)
CONFIG_KEY: web.AppKey[ServerConfig] = web.AppKey("config", ServerConfig)
PROXIES_KEY: web.AppKey[set[SignalingProxy]] = web.AppKey("proxies", set)  # type: ignore[arg-type]
CONNS_KEY: web.AppKey[Counter[str]] = web.AppKey("front-connections", Counter)
HUB_KEY: web.AppKey[RoomBusHub] = web.AppKey("bus", RoomBusHub)
ROUTER_KEY: web.AppKey[ClusterRouter] = web.AppKey("router", ClusterRouter)
FORWARD_HEADERS = ("Authorization", "Content-Type", "Accept")
MAX_BODY = 256 * 1024


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG_KEY]
    limits = config.limits
    peer = client_address(request)
    # another node of the cluster proxying a participant here: its address is the client's, and the room
    # is hosted here whatever the directory says (no second hop)
    hop = bool(config.cluster_token) and hmac.compare_digest(
        request.headers.get("X-Mediaserver-Node", ""), config.cluster_token)
    if hop:
        peer = request.headers.get("X-Forwarded-For", peer).strip()[:64] or peer
    conns = request.app[CONNS_KEY]
    refused = refuse_connection(request.app, conns, peer, limits)
    if refused is not None:
        return refused
    conns[peer] += 1
    proxies = request.app[PROXIES_KEY]
    proxy: Optional[SignalingProxy] = None
    try:
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=limits.max_ws_message_bytes)
        await ws.prepare(request)
        proxy = SignalingProxy(ws, request.app[POOL_KEY], peer, limits, request.transport,
                               router=None if hop else request.app.get(ROUTER_KEY))
        proxies.add(proxy)
        await proxy.run()
        return ws
    finally:
        if proxy is not None:
            proxies.discard(proxy)
            if proxy.policy_closed:
                request.app[ABUSE_KEY].policy_closed(peer)
        conns[peer] -= 1
        if conns[peer] <= 0:
            del conns[peer]


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html")


async def forward(request: web.Request, worker: int, timeout_s: float = 30.0) -> web.Response:
    """``request`` as it came (method, path, query, auth, body) to ``worker``; its answer back."""
    pool = request.app[POOL_KEY]
    body = await request.read()  # (kept by aiohttp: the same bytes when a router read it first)
    if len(body) > MAX_BODY:
        return json_error(413, "too-large", f"request bodies are limited to {MAX_BODY} bytes")
    headers = {h: request.headers[h] for h in FORWARD_HEADERS if h in request.headers}
    headers["X-Forwarded-For"] = client_address(request)
    try:
        async with pool.session(worker).request(request.method, f"http://worker{request.path_qs}", data=body,
                                                headers=headers,
                                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            data = await resp.read()
            return web.Response(body=data, status=resp.status,
                                content_type=resp.content_type or "application/json")
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return json_error(503, "server-busy", "the room's media worker is not reachable; retry")


async def room_request(request: web.Request) -> web.StreamResponse:
    """To the room's worker; a request about one participant (kick, its stages, a prompt ``to`` it) to
    the worker that participant is on, when the room spans workers."""
    room = request.match_info["room_id"]
    if not ROOM_ID_RE.match(room):
        return json_error(400, "bad-room", "room ids are 1-64 characters: letters, digits, '_', '-', '.'")
    worker = request.app[POOL_KEY].placement.worker_of(room)
    if worker is None:
        return json_error(404, "unknown-room", f"no room {room!r}")
    rest = request.match_info.get("rest", "").split("/")
    participant: Optional[str] = rest[1] if len(rest) >= 2 and rest[0] == "participants" else None
    if rest[0] == "prompts" and request.method == "POST":
        try:
            body = json.loads(await request.read() or b"{}")  # (read once: aiohttp keeps it for forward)
        except (ValueError, RecursionError):
            body = None  # the worker answers bad-json
        participant = body.get("to") if isinstance(body, dict) and isinstance(body.get("to"), str) else None
    if participant is not None:
        host = request.app[HUB_KEY].worker_of_participant(room, participant)
        worker = host if host is not None else worker
    return await forward(request, worker)


async def list_rooms(request: web.Request) -> web.StreamResponse:
    pool = request.app[POOL_KEY]
    rooms: list[Any] = []
    for w in pool.workers:
        if not w.ready:
            continue
        resp = await forward(request, w.index)
        if resp.status != 200:
            return resp  # e.g. 401: the token does not allow listing rooms
        assert isinstance(resp.body, bytes)
        for room in json.loads(resp.body).get("rooms", []):
            rooms.append({**room, "worker": w.index})
    return web.json_response({"rooms": rooms})


async def every_worker(request: web.Request) -> web.StreamResponse:
    """A server-wide request (rollouts): to every ready worker (each runs it on its own streams); the
    first worker's answer, with every worker's under ``workers`` (a refusal by any is returned as is)."""
    pool = request.app[POOL_KEY]
    ready = [w.index for w in pool.workers if w.ready]
    if not ready:
        return json_error(503, "server-busy", "no media worker is ready; retry in a moment")
    body = await request.read()  # (read once, kept for every forward)
    del body
    # in parallel: starting a rollout waits for each worker's executor to load the candidate's stages
    answers = await asyncio.gather(*(forward(request, i, timeout_s=300.0) for i in ready))
    for resp in answers:
        if resp.status >= 400:
            return resp
    bodies = []
    for resp in answers:
        assert isinstance(resp.body, bytes)
        try:
            bodies.append(json.loads(resp.body))
        except ValueError:
            bodies.append(None)
    first = bodies[0]
    if not isinstance(first, dict):
        return answers[0]
    return web.json_response({**first, "workers": {str(i): b for i, b in zip(ready, bodies)}},
                             status=answers[0].status)


async def list_stages(request: web.Request) -> web.Response:
    from enhancers.registry import STAGES

    return web.json_response({"stages": sorted(STAGES)})


async def healthz(request: web.Request) -> web.Response:
    pool = request.app[POOL_KEY]

    async def one(index: int) -> Any:
        try:
            return await pool.get_json(index, "/healthz", timeout_s=5.0)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            return {"status": "unreachable", "error": str(exc)[:200]}

    workers = await asyncio.gather(*(one(w.index) for w in pool.workers))
    ok = all(w.ready for w in pool.workers) and all(h.get("status") == "ok" for h in workers)
    return web.json_response({
        "status": "ok" if ok else "degraded",
        "ready": {k: all(bool((h.get("ready") or {}).get(k)) for h in workers) for k in ("prompts", "quality")},
        "workers": [{**w.describe(), "health": h} for w, h in zip(pool.workers, workers)],
        "rooms": sum(int(h.get("rooms", 0)) for h in workers),
        "participants": sum(int(h.get("participants", 0)) for h in workers),
        "placement": pool.placement.rooms,
        "spanning_rooms": request.app[HUB_KEY].spanning(),
    }, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    pool = request.app[POOL_KEY]

    async def one(index: int) -> tuple[str, bytes]:
        try:
            status, body = await pool.get_bytes(index, "/metrics")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return str(index), b""
        return str(index), body if status == 200 else b""

    parts = await asyncio.gather(*(one(w.index) for w in pool.workers if w.ready))
    return web.Response(body=merge_expositions(list(parts)),
                        headers={"Content-Type": METRICS_CONTENT_TYPE, "X-Content-Type-Options": "nosniff"})


def create_front_app(config: ServerConfig, pool: WorkerPool, hub: RoomBusHub) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY)
    app[CONFIG_KEY] = config
    app[POOL_KEY] = pool
    app[HUB_KEY] = hub
    app[PROXIES_KEY] = set()
    app[CONNS_KEY] = Counter()
    app[ABUSE_KEY] = AbuseTracker(config.limits.abuse_closes, config.limits.abuse_cooldown_s)
    app.router.add_get("/", index)
    app.router.add_get("/ws", websocket_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/stages", list_stages)
    app.router.add_get("/api/rooms", list_rooms)
    app.router.add_route("*", "/api/rooms/{room_id}", room_request)
    app.router.add_route("*", "/api/rooms/{room_id}/{rest:.*}", room_request)
    app.router.add_route("*", "/api/rollouts", every_worker)  # rollouts: each worker over its own streams
    app.router.add_route("*", "/api/rollouts/{rest:.*}", every_worker)
    app.router.add_static("/static/", STATIC)

    def worker_lost(index: int) -> None:
        for proxy in list(app[PROXIES_KEY]):  # type: ignore[index]
            if proxy.worker == index:
                asyncio.ensure_future(proxy.worker_lost())

    pool.on_worker_lost.append(worker_lost)

    async def on_shutdown(app: web.Application) -> None:
        for proxy in list(app[PROXIES_KEY]):  # type: ignore[index]
            if not proxy.ws.closed:
                await proxy.ws.close(code=1001, message=b"server shutting down")

    app.on_shutdown.append(on_shutdown)
    return app


def create_internal_app(pool: WorkerPool, hub: RoomBusHub) -> web.Application:
    app = web.Application()
    app[POOL_KEY] = pool
    app.router.add_get("/internal/bus", hub.handle)
    return app


async def serve_front(config: ServerConfig) -> None:
    """Start the workers and the public port; run until SIGINT/SIGTERM, then stop workers in order."""
    from signaling.http_server import start_http

    count = worker_count(config)
    socket_dir = tempfile.mkdtemp(prefix="mediaserver-")
    front_socket = os.path.join(socket_dir, "front.sock")
    pool = WorkerPool(config, count, socket_dir, front_socket)
    node_id = config.node_id or f"{socket.gethostname()}-{config.port}"
    hub = RoomBusHub(pool.placement, node_id if config.redis_url else "")
    internal = web.AppRunner(create_internal_app(pool, hub))
    await internal.setup()
    await web.UnixSite(internal, front_socket).start()
    runner: Optional[web.AppRunner] = None
    closers: list[Any] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        log.info("starting %d media workers", count)
        await pool.start()
        app = create_front_app(config, pool, hub)
        if config.redis_url:
            app[ROUTER_KEY], cluster_closers = await _join_cluster(config, pool, hub, node_id)
            closers.extend(cluster_closers)
        runner, port = await start_http(app, config.host, config.port, config.limits)
        log.info("front ready on port %d with %d media workers", port, count)
        await stop.wait()
    finally:
        for closer in reversed(closers):
            await closer.close()
        await pool.close()  # workers drain first: their "bye" reaches the clients through the proxies
        if runner is not None:
            await runner.cleanup()
        await internal.cleanup()
        shutil.rmtree(socket_dir, ignore_errors=True)


def _local_state(pool: WorkerPool) -> tuple[int, dict[str, int]]:
    """This node's participants and, per room, its participants here (from the workers' reports)."""
    rooms: dict[str, int] = {}
    for w in pool.workers:
        for room, n in (w.state.get("rooms") or {}).items():
            rooms[room] = rooms.get(room, 0) + int(n)
    return sum(rooms.values()), rooms


async def _join_cluster(config: ServerConfig, pool: WorkerPool, hub: RoomBusHub,
                        node_id: str) -> tuple[ClusterRouter, list[Any]]:
    """Register this node in Redis, follow the room bus, route joins: the router, and what to close (in
    reverse order: the directory and the bus while their Redis client is still open, the client last)."""
    import redis.asyncio as aioredis

    from signaling.cluster.interbus import ClusterBus

    if not config.cluster_token:
        raise SystemExit("mediaserver: a cluster (--redis) needs MEDIASERVER_CLUSTER_TOKEN, the secret its nodes "
                         "share to proxy participants to each other")
    client = aioredis.from_url(config.redis_url)
    url = config.public_url or f"http://{'127.0.0.1' if config.host in ('0.0.0.0', '::') else config.host}" \
                                f":{config.port}"
    directory = NodeDirectory(client, node_id, url, lambda: _local_state(pool))
    bus = ClusterBus(client, hub, node_id)
    hub.cluster = bus
    directory.on_node_lost.append(hub.node_gone)
    await bus.start()
    await directory.start()
    router = ClusterRouter(directory, config.cluster_token, config.room_spill_after)
    log.info("node %s in the cluster at %s (%d live nodes)", node_id, config.redis_url, len(directory.nodes))
    return router, [_RedisCloser(client), router, bus, directory]


class _RedisCloser:
    def __init__(self, client: Any) -> None:
        self.client = client

    async def close(self) -> None:
        await self.client.aclose()
