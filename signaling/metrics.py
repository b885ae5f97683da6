"""``GET /metrics``: the Prometheus text exposition of the OpenTelemetry instruments.

The instruments live in ``mediaserver/telemetry_instruments.py`` (per stream, room, executor and
process, all ``mediaserver_``-prefixed); the Prometheus reader that turns them into text is part
of the SDK configured at the entry point (``signaling/telemetry_setup.py``).  Collection runs
the observable callbacks, which read the live counters of every running server.
"""

from __future__ import annotations

from mediaserver.server import MediaServer
from signaling.telemetry_setup import current_telemetry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render_metrics(server: MediaServer) -> bytes | None:
    """The exposition now, or None when no telemetry SDK was configured at the entry point.

    ``server`` is not read directly: the instruments observe every running MediaServer.
    """
    setup = current_telemetry()
    return setup.render_prometheus() if setup is not None else None
