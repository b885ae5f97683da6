"""``GET /metrics``: the Prometheus text exposition of the OpenTelemetry instruments.

The instruments live in ``mediaserver/telemetry_instruments.py`` (per stream, room, executor and
process, all ``mediaserver_``-prefixed); the Prometheus reader that turns them into text is part
of the SDK configured at the entry point (``signaling/telemetry_setup.py``).  Collection runs
the observable callbacks, which read the live counters of every running server.

The per-stream families are rendered straight from the live streams (``signaling/stream_metrics.py``:
~1 us per series, the SDK path cost ~25); a collection is still a few milliseconds of Python at
many streams (``bench/telemetry_overhead.py``), so it runs on one dedicated thread, never on the
event loop that paces the audio.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from mediaserver.server import MediaServer
from signaling.telemetry_setup import configure_telemetry, current_telemetry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_COLLECTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-collect")  # one scrape at a time


def collect_metrics() -> bytes | None:
    """The exposition now (blocking), or None when the SDK is disabled (``OTEL_SDK_DISABLED=true``).

    ``mediaserver serve`` configures the SDK at start; an application built with ``create_app``
    alone (tests, embedding) gets it configured from the environment on its first scrape, once
    per process.
    """
    setup = current_telemetry() or configure_telemetry()
    return setup.render_prometheus()


async def render_metrics(server: MediaServer) -> bytes | None:
    """``collect_metrics`` on the collector thread.  ``server`` is not read directly: the
    instruments observe every running MediaServer of the process."""
    return await asyncio.get_running_loop().run_in_executor(_COLLECTOR, collect_metrics)
