"""Benchmark: what media telemetry costs per packet, and why histograms are fed by a sampler.

Measures, interleaved in rounds (median over rounds, process CPU time so that other load on a
shared machine does not inflate one side only):

* ``send_hook_us``: ``mediaserver.telemetry.SendLatency`` as a subscriber's sender calls it for
  every packet (the only per-packet telemetry work);
* ``otel_record_us``: one ``Histogram.record`` of the OpenTelemetry SDK with two attributes, the
  baseline: what recording every packet into a histogram would cost;
* ``collect_ms``: one Prometheus collection (``GET /metrics``) with ``--streams`` live streams
  observed by the real instruments, as the server renders it: the SDK's registry for the
  process-wide families, the per-stream families straight from the streams
  (``signaling/stream_metrics.py``);
* ``otel_collect_ms``: the same collection with the per-stream families through the SDK and its
  Prometheus reader (what the server did before), the baseline of ``collect_speedup``.

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
from signaling.stream_metrics import StreamExposition


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
                                                            skipped_ticks=0),
                                      join_gate=SimpleNamespace(refused=0),
                                      loop_load=SimpleNamespace(last_busy=0.3),
                                      encoder_complexity=SimpleNamespace(current=5, changes=0))
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

    fake = FakeTelemetry(args.streams)
    registry = CollectorRegistry()  # as served: per-stream families rendered directly
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry, scope_info_enabled=False)])
    instruments = Instruments(provider.get_meter("mediaserver"))
    instruments.observe(fake)  # type: ignore[arg-type]
    exposition = StreamExposition()
    otel_registry = CollectorRegistry()  # the baseline: every family through the SDK
    otel_provider = MeterProvider(
        metric_readers=[PrometheusMetricReader(registry=otel_registry, scope_info_enabled=False)])
    otel_instruments = Instruments(otel_provider.get_meter("mediaserver"))
    otel_instruments.export_streams_on(otel_provider.get_meter("mediaserver"))
    otel_instruments.observe(fake)  # type: ignore[arg-type]

    def collect() -> None:
        generate_latest(registry) + exposition.render(instruments.live()).encode()

    hook_us, record_us, collect_ms, otel_collect_ms = [], [], [], []
    for _ in range(rounds):
        hook_us.append(per_call_us(lambda: hook(packet), n))
        record_us.append(per_call_us(lambda: histogram.record(0.05, attrs), n // 10))
        collect_ms.append(per_call_us(collect, 5) / 1000.0)
        otel_collect_ms.append(per_call_us(lambda: generate_latest(otel_registry), 5) / 1000.0)
    hook_med, record_med = statistics.median(hook_us), statistics.median(record_us)
    collect_med, otel_med = statistics.median(collect_ms), statistics.median(otel_collect_ms)
    print(json.dumps({
        "send_hook_us": round(hook_med, 3),
        "otel_record_us": round(record_med, 3),
        "record_over_hook": round(record_med / hook_med, 1),
        "collect_ms": round(collect_med, 2),
        "otel_collect_ms": round(otel_med, 2),
        "collect_speedup": round(otel_med / collect_med, 1),
        "streams": args.streams,
        "rounds": rounds,
    }, indent=2))
    provider.shutdown()
    otel_provider.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
