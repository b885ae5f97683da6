"""Benchmark: what media telemetry costs per packet, and why histograms are fed by a sampler.

Measures, interleaved in rounds (median over rounds, process CPU time so that other load on a
shared machine does not inflate one side only):

* ``send_hook_us``: ``mediaserver.telemetry.SendLatency`` as a subscriber's sender calls it for
  every packet (the only per-packet telemetry work);
* ``otel_record_us``: one ``Histogram.record`` of the OpenTelemetry SDK with two attributes, the
  baseline: what recording every packet into a histogram would cost;
* ``collect_ms``: one Prometheus collection (``GET /metrics``) with ``--streams`` live streams
  observed by the real instruments.

    .venv/bin/python bench/telemetry_overhead.py [--quick] [--streams N]

Prints JSON; ``record_over_hook`` is how many times dearer per-packet OTel recording would be.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest

from mediaserver.fanout import EncodedPacket, Fanout
from mediaserver.jitter import JitterStats
from mediaserver.stream import StreamCounters
from mediaserver.telemetry import SendLatency, StreamState
from mediaserver.telemetry_instruments import Instruments


def per_call_us(fn: Callable[[], Any], n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n * 1e6


class FakeTelemetry:
    """Stands in for a MediaTelemetry: ``streams`` microphone streams with live-looking counters."""

    def __init__(self, streams: int) -> None:
        self.executor_stages: dict[str, Any] = {}
        self.executor_live_streams = 0
        self.batch_size = 0.0
        self.prompts_requested: dict[str, int] = {}
        self.server = SimpleNamespace(rooms=SimpleNamespace(rooms={}), hub=SimpleNamespace(executor=None),
                                      clock=SimpleNamespace(last_lag_ms=0.4, max_lag_ms=3.0, ticks=1000,
                                                            skipped_ticks=0))
        span = SimpleNamespace(add_event=lambda *a, **k: None)
        self.streams: dict[int, StreamState] = {}
        for i in range(streams):
            source = SimpleNamespace(stats=JitterStats(received=5000, lost=12, jitter_ms=3.2))
            stream = SimpleNamespace(id=f"p-{i:04d}-mic", owner_id=f"p-{i:04d}", kind="microphone", source=source,
                                     counters=StreamCounters(chunks=10000), fanout=Fanout(),
                                     pipeline=SimpleNamespace(stages=["vad"]))
            self.streams[i] = StreamState(stream, "room", span)  # type: ignore[arg-type]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and rounds")
    parser.add_argument("--streams", type=int, default=100, help="streams observed in the collection run")
    args = parser.parse_args()
    n, rounds = (20_000, 3) if args.quick else (100_000, 7)

    hook = SendLatency()
    packet = EncodedPacket(data=b"x", pts=0, origin=time.monotonic())
    histogram = MeterProvider().get_meter("bench").create_histogram("mediaserver.latency.e2e", unit="s")
    attrs = {"kind": "microphone", "stages": "vad"}

    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry, scope_info_enabled=False)])
    instruments = Instruments(provider.get_meter("mediaserver"))
    fake = FakeTelemetry(args.streams)
    instruments.observe(fake)  # type: ignore[arg-type]

    hook_us, record_us, collect_ms = [], [], []
    for _ in range(rounds):
        hook_us.append(per_call_us(lambda: hook(packet), n))
        record_us.append(per_call_us(lambda: histogram.record(0.05, attrs), n // 10))
        collect_ms.append(per_call_us(lambda: generate_latest(registry), 5) / 1000.0)
    hook_med, record_med = statistics.median(hook_us), statistics.median(record_us)
    print(json.dumps({
        "send_hook_us": round(hook_med, 3),
        "otel_record_us": round(record_med, 3),
        "record_over_hook": round(record_med / hook_med, 1),
        "collect_ms": round(statistics.median(collect_ms), 2),
        "streams": args.streams,
        "rounds": rounds,
    }, indent=2))
    provider.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
