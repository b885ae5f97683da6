"""The OpenTelemetry SDK of the process, configured once at the entry point from the OTEL_* variables.

``configure_telemetry`` installs the global meter and tracer providers that the instruments and
spans of ``mediaserver/telemetry.py`` (API only) report to:

* metrics: a Prometheus reader whose registry ``GET /metrics`` serves, always, followed by the
  per-stream families rendered straight from the live streams (``signaling/stream_metrics.py``);
  plus push exporters from ``OTEL_METRICS_EXPORTER`` (``otlp`` by default, ``console``, ``none``;
  ``prometheus`` is accepted and is always on), which get the per-stream instruments through a
  provider of their own;
* traces: exporters from ``OTEL_TRACES_EXPORTER`` (``otlp`` by default, ``console``, ``none``).

OTLP uses ``OTEL_EXPORTER_OTLP_[METRICS_|TRACES_]PROTOCOL`` (``grpc`` or ``http/protobuf``,
the default) and is only set up when an endpoint is configured
(``OTEL_EXPORTER_OTLP_ENDPOINT`` or the per-signal ``..._METRICS_ENDPOINT`` /
``..._TRACES_ENDPOINT``): without one the process makes no network calls.  Headers, timeouts,
compression, certificates and temporality are read by the OTLP exporters themselves from the
standard variables; ``OTEL_METRIC_EXPORT_INTERVAL``, ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES`` are honoured; ``OTEL_SDK_DISABLED=true`` installs nothing.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from prometheus_client import CollectorRegistry, generate_latest

from mediaserver.telemetry_instruments import instruments
from signaling.stream_metrics import StreamExposition

log = logging.getLogger(__name__)

PROTOCOLS = ("grpc", "http/protobuf")
_HTTP_PATHS = {"METRICS": "v1/metrics", "TRACES": "v1/traces"}
_STREAM_EXPOSITION = StreamExposition()


@dataclass
class TelemetrySetup:
    """Owns the process's meter and tracer providers and the Prometheus registry behind ``GET /metrics``."""

    meter_provider: MeterProvider | None = None
    # The per-stream instruments, for push exporters only (GET /metrics renders them directly)
    stream_meter_provider: MeterProvider | None = None
    tracer_provider: TracerProvider | None = None
    prometheus_registry: CollectorRegistry | None = None
    metric_exporters: list[str] = field(default_factory=list)  # e.g. ["prometheus", "otlp/grpc http://c:4317"]
    span_exporters: list[str] = field(default_factory=list)

    def render_prometheus(self) -> bytes | None:
        """The Prometheus text exposition of every instrument, collected now."""
        if self.prometheus_registry is None:
            return None
        streams = _STREAM_EXPOSITION.render(instruments().live())
        return generate_latest(self.prometheus_registry) + streams.encode()

    def force_flush(self, timeout_ms: int = 5000) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush(timeout_ms)
        for provider in (self.meter_provider, self.stream_meter_provider):
            if provider is not None:
                provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        """Flush and stop the exporters (at process exit)."""
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        for provider in (self.meter_provider, self.stream_meter_provider):
            if provider is not None:
                provider.shutdown()


def _choices(env: Mapping[str, str], name: str, default: str = "otlp") -> list[str]:
    raw = env.get(name, default)
    return [c.strip().lower() for c in raw.split(",") if c.strip()]


def otlp_settings(env: Mapping[str, str], signal: str) -> tuple[str, str] | None:
    """(protocol, endpoint) of OTLP for ``signal`` ("METRICS" or "TRACES"), or None without an endpoint."""
    protocol = (env.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    if protocol not in PROTOCOLS:
        raise ValueError(f"unsupported OTLP protocol {protocol!r} (use one of {', '.join(PROTOCOLS)})")
    specific = env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT", "").strip()
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if specific:
        return protocol, specific
    if not base:
        return None
    if protocol == "grpc":
        return protocol, base
    return protocol, base.rstrip("/") + "/" + _HTTP_PATHS[signal]  # the spec's rule for the generic endpoint


def _otlp_metric_exporter(protocol: str, endpoint: str) -> Any:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetrics

        return GrpcMetrics(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetrics

    return HttpMetrics(endpoint=endpoint)


def _otlp_span_exporter(protocol: str, endpoint: str) -> SpanExporter:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpans

        return GrpcSpans(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpans

    return HttpSpans(endpoint=endpoint)


def _periodic(exporter: Callable[..., Any], *args: Any, interval_ms: float) -> MetricReader:
    return PeriodicExportingMetricReader(exporter(*args), export_interval_millis=interval_ms)


def _resource(env: Mapping[str, str], service_version: str) -> Resource:
    attrs: dict[str, Any] = {}
    for item in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attrs[key.strip()] = value.strip()
    attrs["service.name"] = env.get("OTEL_SERVICE_NAME") or attrs.get("service.name") or "mediaserver"
    attrs.setdefault("service.version", service_version)
    return Resource.create(attrs)


def build_telemetry(env: Mapping[str, str] | None = None, *, service_version: str = "0.1.0",
                    span_processors: Sequence[SpanProcessor] = ()) -> TelemetrySetup:
    """Providers, readers and exporters as the OTEL_* variables in ``env`` ask; installs nothing globally."""
    env = os.environ if env is None else env
    setup = TelemetrySetup()
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return setup
    resource = _resource(env, service_version)

    registry = CollectorRegistry(auto_describe=True)
    setup.prometheus_registry = registry
    setup.metric_exporters.append("prometheus")
    interval_ms = float(env.get("OTEL_METRIC_EXPORT_INTERVAL", "60000"))
    push: list[Callable[[], MetricReader]] = []
    for choice in _choices(env, "OTEL_METRICS_EXPORTER"):
        if choice == "otlp":
            otlp = otlp_settings(env, "METRICS")
            if otlp is None:
                log.info("telemetry: no OTLP endpoint configured, metrics are served at /metrics only")
                continue
            push.append(functools.partial(_periodic, _otlp_metric_exporter, *otlp, interval_ms=interval_ms))
            setup.metric_exporters.append(f"otlp/{otlp[0]} {otlp[1]}")
        elif choice == "console":
            push.append(functools.partial(_periodic, ConsoleMetricExporter, interval_ms=interval_ms))
            setup.metric_exporters.append("console")
        elif choice not in ("none", "prometheus"):
            log.warning("telemetry: unknown OTEL_METRICS_EXPORTER value %r ignored", choice)
    readers: list[MetricReader] = [PrometheusMetricReader(registry=registry, scope_info_enabled=False)]
    setup.meter_provider = MeterProvider(resource=resource, metric_readers=readers + [make() for make in push])
    if push:  # a reader belongs to one provider: the per-stream instruments' provider has its own
        setup.stream_meter_provider = MeterProvider(resource=resource, metric_readers=[make() for make in push])

    processors: list[SpanProcessor] = list(span_processors)
    for choice in _choices(env, "OTEL_TRACES_EXPORTER"):
        if choice == "otlp":
            otlp = otlp_settings(env, "TRACES")
            if otlp is None:
                continue
            processors.append(BatchSpanProcessor(_otlp_span_exporter(*otlp)))
            setup.span_exporters.append(f"otlp/{otlp[0]} {otlp[1]}")
        elif choice == "console":
            processors.append(BatchSpanProcessor(ConsoleSpanExporter()))
            setup.span_exporters.append("console")
        elif choice != "none":
            log.warning("telemetry: unknown OTEL_TRACES_EXPORTER value %r ignored", choice)
    # Installed even without exporters (spans are then dropped at their end: a few per participant,
    # never per frame), so that an embedding application can add its own span processor later.
    setup.tracer_provider = TracerProvider(resource=resource)
    for processor in processors:
        setup.tracer_provider.add_span_processor(processor)
    return setup


_CURRENT: TelemetrySetup | None = None


def configure_telemetry(env: Mapping[str, str] | None = None, **kwargs: Any) -> TelemetrySetup:
    """Build the SDK from ``env`` (default: os.environ) and install it globally; once per process.

    Later calls return the first set-up unchanged (OpenTelemetry's global providers can be set
    only once).
    """
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    setup = build_telemetry(env, **kwargs)
    if setup.meter_provider is not None:
        metrics.set_meter_provider(setup.meter_provider)
    if setup.stream_meter_provider is not None:
        instruments().export_streams_on(setup.stream_meter_provider.get_meter("mediaserver"))
    if setup.tracer_provider is not None:
        trace.set_tracer_provider(setup.tracer_provider)
    _CURRENT = setup
    log.info("telemetry: metrics -> %s; traces -> %s", ", ".join(setup.metric_exporters) or "off",
             ", ".join(setup.span_exporters) or "off")
    return setup


def current_telemetry() -> TelemetrySetup | None:
    """The set-up installed by ``configure_telemetry``, or None when the entry point did not configure one."""
    return _CURRENT
