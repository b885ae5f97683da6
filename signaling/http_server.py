"""Serving the HTTP side: the public port with its connection limits, and the event loop policy.

Shared by the single-process server (signaling/main.py) and the front and workers of a
multi-worker one (signaling/cluster/).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from mediaserver.config import LimitsConfig

BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
                 b"Retry-After: 5\r\nContent-Length: 83\r\n\r\n"
                 b'{"error": "server-busy", "message": "the server is at its connection limit; retry"}')
RATE_RESPONSE = BUSY_RESPONSE.replace(b"Retry-After: 5", b"Retry-After: 1")  # new connections come too fast
log = logging.getLogger(__name__)


def limit_connections(http: web.Server, limit: int, rate_per_s: float = 0.0, burst: int = 0) -> None:
    """Cap the TCP connections of an aiohttp server, and how fast new ones come: a connection beyond
    ``limit`` open, or beyond ``rate_per_s`` new ones a second (after a burst of ``burst``; 0: no rate
    limit), gets 503 and is closed.

    Counted when the connection is made, before any byte of a request, so
    half-open requests count too (they are closed by the keep-alive timer
    when their headers do not arrive in time, see ``start_http``), and a
    refused connection costs a write and a close, no parsing.  The rate
    bounds the signaling work a second on the event loop the media clock
    shares: a thousand WebSocket handshakes arriving at once would delay
    every participant's audio by tens of milliseconds.
    """
    made = http.connection_made
    refused = [0]
    bucket = [float(burst), time.monotonic()]  # tokens, when last refilled

    def connection_made(handler: Any, transport: asyncio.Transport) -> None:
        made(handler, transport)
        reason = "open" if len(http.connections) > limit else None
        if reason is None and rate_per_s > 0:
            now = time.monotonic()
            bucket[0] = min(float(burst), bucket[0] + (now - bucket[1]) * rate_per_s)
            bucket[1] = now
            if bucket[0] < 1.0:
                reason = "rate"
            else:
                bucket[0] -= 1.0
        if reason is None:
            return
        refused[0] += 1
        if refused[0] in (1, 10, 100, 1000) or refused[0] % 10000 == 0:
            log.warning("HTTP connection refused (%s): %d open (limit %d), new at most %g/s; %d refused", reason,
                        len(http.connections), limit, rate_per_s, refused[0])
        transport.write(RATE_RESPONSE if reason == "rate" else BUSY_RESPONSE)
        # closed on the next turn of the loop: aiohttp starts the connection's request task right after
        # this, and that task must see the connection open (it asserts so) before it sees it closed
        asyncio.get_running_loop().call_later(0.0, transport.close)

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
    limit_connections(runner.server, limits.max_http_connections, limits.new_connections_per_s,
                      limits.new_connection_burst)
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
