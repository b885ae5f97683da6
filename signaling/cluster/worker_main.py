"""A media worker process: one whole ``MediaServer`` behind the front, on a private Unix socket.

Started by :class:`signaling.cluster.pool.WorkerPool` (``spawn``); dies with
the front (``PR_SET_PDEATHSIG``).  It serves the same application as a
single-process server (WebSocket signaling, HTTP API, metrics), reached only
through the front, which passes the client's address in ``X-Forwarded-For``,
plus ``GET /internal/state`` (its rooms and load, polled by the front).
It keeps a WebSocket to the front's room bus (``/internal/bus``, see
signaling/cluster/bus.py): rooms may span workers (a phone call on worker 0,
which runs the SIP bridge, into a room of another worker), their events and
streams relayed between the hosts (mediaserver/federation.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from dataclasses import replace
from typing import Any

import aiohttp
from aiohttp import web

from enhancers.process_name import MEDIA_WORKER, die_with_parent, set_process_name
from mediaserver.config import ServerConfig
from mediaserver.process_setup import avoid_huge_pages, freeze_startup_heap
from mediaserver.server import MediaServer
from signaling.app import SERVER_KEY, create_app

log = logging.getLogger(__name__)


async def worker_state(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    executor = server.hub.executor
    return web.json_response({
        "rooms": {r.id: len(r.participants) for r in server.rooms.rooms.values()},
        "participants": server.rooms.participant_count,
        "streams": sum(len(r.streams) for r in server.rooms.rooms.values()),
        "executor_load": round(float(executor.admission.stats().get("load", 0.0)), 3) if executor is not None else 0.0,
        "clock_lag_ms": round(server.clock.max_lag_ms, 1),
        "loaded": bool(server.prompts.ready and server.quality.ready),
    })


class BusClient:
    """Owns this worker's WebSocket to the front's room bus: messages out in order, messages in to the links."""

    def __init__(self, index: int, front_socket: str) -> None:
        self.index = index
        self.front_socket = front_socket
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def send(self, message: dict[str, Any]) -> None:
        self._queue.put_nowait(message)

    async def start(self, hello: dict[str, Any], on_message: Any) -> None:
        self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self.front_socket))
        ws = await self._session.ws_connect("http://front/internal/bus", max_msg_size=1 << 22, heartbeat=None)
        await ws.send_json(hello)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._write(ws)), loop.create_task(self._read(ws, on_message))]

    async def _write(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            message = await self._queue.get()
            await ws.send_json(message)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse, on_message: Any) -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                try:
                    on_message(json.loads(msg.data))
                except Exception:  # noqa: BLE001 - one bad message must not end the bus
                    log.exception("worker %d: room bus message failed", self.index)
        log.error("worker %d: the room bus closed", self.index)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._session is not None:
            await self._session.close()


async def _serve(config: ServerConfig, index: int, socket_path: str, front_socket: str) -> None:
    server = MediaServer(config)
    bus = BusClient(index, front_socket)
    app = create_app(server, forwarded=True)

    async def join_bus(app: web.Application) -> None:  # after the server started (its on_startup)
        links = await server.attach_bus(bus, config.relay_host)
        await bus.start({"op": "hello", "host": f"w{index}", "worker": index,
                         "relay": list(links.endpoint.address)}, links.on_message)

    app.on_startup.append(join_bus)
    app.router.add_get("/internal/state", worker_state)
    runner = web.AppRunner(app, keepalive_timeout=75.0)
    await runner.setup()
    site = web.UnixSite(runner, socket_path)
    await site.start()
    freeze_startup_heap()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()  # on_shutdown: participants drained, executor stopped
        await bus.close()


def _pin(index: int, count: int) -> bool:
    """Run worker ``index`` (and what it starts: its executor worker) on one core of its own, as mediasoup
    does, when every worker can have one: no migrations, its caches stay warm, and its executor knows it
    shares that core with it (admission counts the worker's CPU).  True when it was pinned."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= count > 1:
            os.sched_setaffinity(0, {cpus[index % len(cpus)]})
            return True
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed
        log.info("worker %d stays unpinned: %s", index, exc)
    return False


def run_worker(config: ServerConfig, index: int, count: int, socket_path: str, front_socket: str) -> None:
    """Entry point of worker ``index`` of ``count``."""
    set_process_name(f"{MEDIA_WORKER}{index}")
    die_with_parent()
    if config.pin_workers and _pin(index, count) and config.enhance.shared_cpus < 0:
        # its executor's worker shares this one core with it alone (unpinned, the server finds its share)
        config = replace(config, enhance=replace(config.enhance, shared_cpus=1.0))
    logging.basicConfig(level=config.log_level,
                        format=f"%(asctime)s %(levelname)s [w{index}] %(name)s: %(message)s")
    from signaling.http_server import install_uvloop
    from signaling.telemetry_setup import configure_telemetry

    install_uvloop()
    avoid_huge_pages()
    telemetry: Any = None
    try:
        telemetry = configure_telemetry(service_version="worker")
    except ValueError as exc:
        log.error("worker %d: bad telemetry configuration: %s", index, exc)
    if index != 0:
        config = replace(config, sip_port=None)  # the SIP bridge runs on worker 0 only
    try:
        asyncio.run(_serve(config, index, socket_path, front_socket))
    finally:
        if telemetry is not None:
            telemetry.shutdown()
