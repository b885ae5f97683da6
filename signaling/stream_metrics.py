"""The per-stream families of ``GET /metrics``, rendered straight from the live streams.

``mediaserver/telemetry_instruments.py`` ``STREAM_METRICS`` lists ~23 values per published stream
(labels room, stream, participant, kind).  Through the OpenTelemetry SDK and its Prometheus
reader every one of those series costs ~25 us per scrape (an observation object, the attribute
hashing of the aggregation, an exemplar reservoir, a data point, a translated row, then
``prometheus_client``'s generic line formatting): 27 ms of CPU at 64 streams, held mostly under
the GIL on the collector thread, so the event loop that paces the audio runs at half speed for
the length of a scrape.  Here each family's header is built once and each stream's label set is
escaped once per scrape; a series is one getter call and one formatted line
(``bench/telemetry_overhead.py``: ``collect_ms`` against ``otel_collect_ms``).

The text is the one the SDK's exporter would give, family names, help, types, label order and
value format included (``tests/test_telemetry.py`` renders the same streams both ways and
compares); push exporters (OTLP, console) still get the per-stream instruments through the
SDK (``Instruments.export_streams_on``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry.exporter.prometheus._mapping import map_unit, sanitize_full_name
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.utils import floatToGoString

from mediaserver.telemetry_instruments import STREAM_METRICS, Getter

if TYPE_CHECKING:
    from mediaserver.telemetry import MediaTelemetry, StreamState

LABELS = ("kind", "participant", "room", "stream")  # StreamState.attrs, in the exposition's (sorted) order


@dataclass(frozen=True)
class StreamFamily:
    """One per-stream metric as exposed: its sample name, its two header lines, the getter of its value."""

    sample_name: str
    header: str
    getter: Getter


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def stream_families() -> tuple[StreamFamily, ...]:
    """The families of STREAM_METRICS, named as the SDK's Prometheus exporter names them.

    An OTel counter is a Prometheus counter (``_total``); an up-down counter, being
    non-monotonic, and a gauge are gauges; the unit becomes a suffix (``s`` -> ``_seconds``,
    annotations such as ``{chunk}`` are dropped).
    """
    families = []
    for name, kind, unit, description, getter in STREAM_METRICS:
        cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        family = cls(sanitize_full_name(name), description, labels=LABELS, unit=map_unit(unit))
        sample_name = family.name + "_total" if kind == "counter" else family.name
        header = (f"# HELP {sample_name} {_escape_help(description)}\n"
                  f"# TYPE {sample_name} {family.type}\n")
        families.append(StreamFamily(sample_name, header, getter))
    return tuple(families)


class StreamExposition:
    """Owns the per-stream families' headers; renders the live streams of some MediaTelemetry as text."""

    def __init__(self) -> None:
        self.families = stream_families()

    def render(self, telemetries: Iterable[MediaTelemetry]) -> str:
        """The Prometheus text (format 0.0.4) of every stream of ``telemetries``; a family without a
        value on any stream is left out, as the SDK leaves it out."""
        streams: list[tuple[str, StreamState]] = []
        for tel in telemetries:
            for st in list(tel.streams.values()):
                attrs = st.attrs
                labels = ",".join(f'{key}="{_escape_label_value(str(attrs[key]))}"' for key in LABELS)
                streams.append(("{" + labels + "} ", st))
        if not streams:
            return ""
        out: list[str] = []
        for family in self.families:
            getter, prefix = family.getter, family.sample_name
            lines = []
            for labels, st in streams:
                value = getter(st)
                if value is not None:
                    lines.append(f"{prefix}{labels}{floatToGoString(value)}\n")
            if lines:
                out.append(family.header)
                out.extend(lines)
        return "".join(out)
