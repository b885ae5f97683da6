"""Serving the HTTP side: the public port with its connection limits, and the event loop policy.

Shared by the single-process server (signaling/main.py) and the front and workers of a
multi-worker one (signaling/cluster/).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from mediaserver.config import LimitsConfig

BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
                 b"Retry-After: 5\r\nContent-Length: 83\r\n\r\n"
                 b'{"error": "server-busy", "message": "the server is at its connection limit; retry"}')
log = logging.getLogger(__name__)


def limit_connections(http: web.Server, limit: int) -> None:
    """Cap the TCP connections of an aiohttp server: the one beyond ``limit`` gets 503 and is closed.

    Counted when the connection is made, before any byte of a request, so
    half-open requests count too (they are closed by the keep-alive timer
    when their headers do not arrive in time, see ``start_http``).
    """
    made = http.connection_made
    refused = [0]

    def connection_made(handler: Any, transport: asyncio.Transport) -> None:
        made(handler, transport)
        if len(http.connections) > limit:
            refused[0] += 1
            if refused[0] in (1, 10, 100, 1000) or refused[0] % 10000 == 0:
                log.warning("HTTP connection refused: %d open (limit %d), %d refused", len(http.connections),
                            limit, refused[0])
            transport.write(BUSY_RESPONSE)
            transport.close()

    http.connection_made = connection_made  # type: ignore[method-assign]


async def start_http(app: web.Application, host: str, port: int, limits: LimitsConfig) -> tuple[web.AppRunner, int]:
    """Serve ``app`` with the HTTP-level limits: connection cap, header deadline; returns (runner, port).

    aiohttp's keep-alive timer also runs from the moment a connection is
    made, and closes it while no complete request head has arrived: with
    ``keepalive_timeout = http_header_timeout_s`` a request line and headers
    must arrive within that time (slowloris), and idle keep-alive
    connections go after it.  Bodies have their own deadline (``read_json``).
    """
    runner = web.AppRunner(app, keepalive_timeout=limits.http_header_timeout_s)
    await runner.setup()
    assert runner.server is not None
    limit_connections(runner.server, limits.max_http_connections)
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server  # the asyncio server: the bound port (port 0: chosen by the OS)
    sockets = getattr(server, "sockets", None) or []
    return runner, int(sockets[0].getsockname()[1]) if sockets else port



def install_uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass


