"""A media worker process: one whole ``MediaServer`` behind the front, on a private Unix socket.

Started by :class:`signaling.cluster.pool.WorkerPool` (``spawn``); dies with
the front (``PR_SET_PDEATHSIG``).  It serves the same application as a
single-process server (WebSocket signaling, HTTP API, metrics), reached only
through the front, which passes the client's address in ``X-Forwarded-For``,
plus ``GET /internal/state`` (its rooms and load, polled by the front).
Before it creates a room it asks the front for it (``POST /internal/claim``
on the front's Unix socket): rooms joined through the front were placed here
already; a phone call (worker 0 runs the SIP bridge) into a room that lives
on another worker is refused, never split.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import replace
from typing import Any

import aiohttp
from aiohttp import web

from enhancers.process_name import MEDIA_WORKER, die_with_parent, set_process_name
from mediaserver.config import ServerConfig
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


class FrontClaims:
    """Asks the front whether this worker may create a room (owns the HTTP client to the front's socket)."""

    def __init__(self, index: int, front_socket: str) -> None:
        self.index = index
        self.front_socket = front_socket
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, room: str) -> bool:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self.front_socket),
                                                  timeout=aiohttp.ClientTimeout(total=5))
        try:
            async with self._session.post("http://front/internal/claim",
                                          json={"room": room, "worker": self.index}) as resp:
                body = await resp.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            log.error("worker %d: the front did not answer a claim for room %s: %s", self.index, room, exc)
            return False
        return bool(body.get("worker") == self.index)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


async def _serve(config: ServerConfig, index: int, socket_path: str, front_socket: str) -> None:
    server = MediaServer(config)
    claims = FrontClaims(index, front_socket)
    server.room_claim = claims
    app = create_app(server, forwarded=True)
    app.router.add_get("/internal/state", worker_state)
    runner = web.AppRunner(app, keepalive_timeout=75.0)
    await runner.setup()
    site = web.UnixSite(runner, socket_path)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()  # on_shutdown: participants drained, executor stopped
        await claims.close()


def run_worker(config: ServerConfig, index: int, count: int, socket_path: str, front_socket: str) -> None:
    """Entry point of worker ``index`` of ``count``."""
    set_process_name(f"{MEDIA_WORKER}{index}")
    die_with_parent()
    logging.basicConfig(level=config.log_level,
                        format=f"%(asctime)s %(levelname)s [w{index}] %(name)s: %(message)s")
    from signaling.main import _install_uvloop
    from signaling.telemetry_setup import configure_telemetry

    _install_uvloop()
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
