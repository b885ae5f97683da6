"""The process's OpenTelemetry instruments for the media server: created once, observing every server.

Instruments are process-wide (the OTel SDK keeps one instrument per name); each running
``MediaTelemetry`` (one per ``MediaServer``) registers itself and the observable callbacks walk
all of them.  Callbacks may run on an exporter thread: they only read plain counters and copy
dicts before iterating.

The per-stream table (``STREAM_METRICS``) becomes instruments only on the meter of push exporters
(``Instruments.export_streams_on``): ``GET /metrics`` renders those families straight from the
live streams (``signaling/stream_metrics.py``), the same text at a twentieth of the cost.

Names follow OpenTelemetry conventions (dots, base units); the Prometheus reader turns them into
``mediaserver_stream_rtp_jitter_seconds``, ``mediaserver_stream_rtp_lost``,
``mediaserver_stream_concealed_total``, ``mediaserver_latency_e2e_seconds_bucket`` ...
(docs/TELEMETRY.md lists them all).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from mediaserver.transport_guard import PROCESS_DROPS

if TYPE_CHECKING:
    from mediaserver.telemetry import MediaTelemetry, StreamState

# Histogram buckets, seconds
LATENCY_BUCKETS_S = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 1.0)
PROCESSING_BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.06, 0.1)
STAGE_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.04, 0.08)
LAG_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

Getter = Callable[["StreamState"], float | None]


def _jb(field: str, scale: float = 1.0) -> Getter:
    def get(st: StreamState) -> float | None:
        jb = st.jitter
        return None if jb is None else float(getattr(jb, field)) * scale

    return get


# Per published stream, attributes {room, stream, participant, kind}: (name, kind, unit, description, getter)
STREAM_METRICS: tuple[tuple[str, str, str, str, Getter], ...] = (
    ("mediaserver.stream.chunks", "counter", "{chunk}", "10 ms chunks forwarded (processed, encoded, fanned out).",
     lambda st: st.counters.chunks),
    ("mediaserver.stream.bypassed", "counter", "{chunk}",
     "Chunks that passed enhancement unprocessed: executor deadline missed or a stage failed.",
     lambda st: st.counters.bypassed),
    ("mediaserver.stream.backlog.dropped", "counter", "{chunk}",
     "Chunks dropped because 160 ms of chunks were already waiting for the executor.",
     lambda st: st.counters.dropped_backlog),
    ("mediaserver.stream.subscriber.dropped", "counter", "{packet}",
     "Opus packets dropped from full subscriber queues (slow subscribers), summed over subscribers.",
     lambda st: st.subscriber_dropped),
    ("mediaserver.stream.subscribers", "updown", "{subscriber}", "Subscribers receiving the stream.",
     lambda st: st.stream.fanout.subscriber_count),
    ("mediaserver.stream.audio.level", "gauge", "dBFS", "Smoothed level of the processed audio.",
     lambda st: st.counters.level_dbfs),
    ("mediaserver.stream.voice_activity", "gauge", "1",
     "Speech probability of the last chunk (streams running a vad stage).",
     lambda st: st.counters.vad if st.has_vad else None),
    ("mediaserver.stream.echo.delay", "gauge", "s",
     "Echo path delay (sent reference to microphone) the aec stage estimated (streams running aec).",
     lambda st: st.counters.echo_delay_ms / 1000.0 if st.counters.echo_delay_ms >= 0 else None),
    ("mediaserver.stream.latency.processing", "gauge", "s", "Enhancement time of the last chunk (submission to result).",
     lambda st: st.counters.processing_ms / 1000.0),
    ("mediaserver.stream.latency.server", "gauge", "s", "RTP arrival to encoded packet, last packet.",
     lambda st: st.counters.server_latency_ms / 1000.0),
    ("mediaserver.stream.latency.e2e", "gauge", "s",
     "RTP arrival to RTP send of the same audio, mean over the last second and all subscribers.",
     lambda st: st.e2e_mean),
    ("mediaserver.stream.latency.e2e_max", "gauge", "s",
     "RTP arrival to RTP send of the same audio, maximum over the last second.", lambda st: st.e2e_max),
    ("mediaserver.stream.rtp.received", "counter", "{packet}", "RTP packets received.", _jb("received")),
    ("mediaserver.stream.rtp.lost", "updown", "{packet}",
     "Cumulative RTP packets lost (RFC 3550: expected minus received; a reordered packet lowers it again).",
     _jb("lost")),
    ("mediaserver.stream.rtp.loss_ratio", "gauge", "1", "Fraction of the RTP packets lost over the last second.",
     lambda st: st.loss_ratio if st.jitter is not None else None),
    ("mediaserver.stream.rtp.late", "counter", "{packet}", "RTP packets that arrived after their playout time.",
     _jb("late")),
    ("mediaserver.stream.rtp.jitter", "gauge", "s", "RFC 3550 interarrival jitter of the inbound RTP.",
     _jb("jitter_ms", 1e-3)),
    ("mediaserver.stream.rtp.fec_recovered", "counter", "{packet}",
     "Lost packets rebuilt from the next packet's in-band FEC.", _jb("fec_recovered")),
    ("mediaserver.stream.concealed", "counter", "{chunk}",
     "10 ms chunks concealed (Opus PLC or FEC) for lost or late packets.", _jb("concealed_chunks")),
    ("mediaserver.stream.jitter_buffer.delay", "gauge", "s", "Audio waiting in the jitter buffer.",
     _jb("buffer_ms", 1e-3)),
    ("mediaserver.stream.jitter_buffer.target", "gauge", "s", "Adaptive target delay of the jitter buffer.",
     _jb("target_ms", 1e-3)),
    ("mediaserver.stream.jitter_buffer.discarded", "counter", "{packet}",
     "Packets the jitter buffer dropped to bound latency (bursts, overflow).", _jb("discarded")),
    ("mediaserver.stream.jitter_buffer.underruns", "counter", "{underrun}", "Times the jitter buffer ran dry.",
     _jb("underruns")),
)

# Executor counters (enhancers.executor.worker.COUNTER_KEYS) -> instrument names; "stage_calls" is
# the sum of mediaserver.executor.stage.calls over the stages
EXECUTOR_COUNTERS = {
    "chunks": ("mediaserver.executor.chunks", "{chunk}"), "batches": ("mediaserver.executor.batches", "{round}"),
    "bypass_deadline": ("mediaserver.executor.bypass.deadline", "{chunk}"),
    "bypass_error": ("mediaserver.executor.bypass.error", "{chunk}"),
    "stage_unavailable": ("mediaserver.executor.stage_unavailable", "{chunk}"),
    "late_discarded": ("mediaserver.executor.late_discarded", "{chunk}"),
    "dropped_backlog": ("mediaserver.executor.dropped_backlog", "{chunk}"),
    "stuck_restarts": ("mediaserver.executor.stuck_restarts", "{restart}"),
    "worker_restarts": ("mediaserver.executor.worker_restarts", "{restart}"),
    "device_fallbacks": ("mediaserver.executor.device_fallbacks", "{fallback}"),
    "stage_faults": ("mediaserver.executor.stage_faults", "{fault}"),
    "stage_recoveries": ("mediaserver.executor.stage_recoveries", "{recovery}"),
}

ObservationSource = Callable[["MediaTelemetry"], Iterable[tuple[float, dict[str, Any]]]]


def _rooms(tel: MediaTelemetry) -> Iterator[Any]:
    return iter(list(tel.server.rooms.rooms.values()))


def _room_prompts(tel: MediaTelemetry) -> Iterator[tuple[float, dict[str, Any]]]:
    players = list(getattr(getattr(tel.server, "prompts", None), "players", {}).values())
    active: dict[str, int] = {}
    for player in players:
        source = player.source
        active[player.room.id] = active.get(player.room.id, 0) + int(source.current is not None) + source.queued
    for room in _rooms(tel):
        yield float(active.get(room.id, 0)), {"room": room.id}


def _executor_counters(key: str) -> ObservationSource:
    def source(tel: MediaTelemetry) -> Iterator[tuple[float, dict[str, Any]]]:
        executor = tel.server.hub.executor
        counters = getattr(executor, "counters", None)
        if isinstance(counters, dict) and key in counters:
            yield float(counters[key]), {"device": str(getattr(executor, "device", ""))}

    return source


def _stage_field(field: str) -> ObservationSource:
    def source(tel: MediaTelemetry) -> Iterator[tuple[float, dict[str, Any]]]:
        for spec, stats in list(tel.executor_stages.items()):
            yield float(stats.get(field, 0)), {"stage": spec}

    return source


def _executor_value(get: Callable[[MediaTelemetry], float]) -> ObservationSource:
    def source(tel: MediaTelemetry) -> Iterator[tuple[float, dict[str, Any]]]:
        executor = tel.server.hub.executor
        if executor is not None:
            yield get(tel), {"device": str(getattr(executor, "device", ""))}

    return source


def _admissions(tel: MediaTelemetry) -> Iterator[tuple[float, dict[str, Any]]]:
    """Stage requests by what admission control gave them (``admitted``, ``degraded``, ``refused``)."""
    admission = getattr(tel.server.hub.executor, "admission", None)
    counts = getattr(admission, "counts", None)
    if isinstance(counts, dict):
        for result, n in list(counts.items()):
            yield float(n), {"result": result}


def _executor_load(tel: MediaTelemetry) -> Iterator[tuple[float, dict[str, Any]]]:
    executor = tel.server.hub.executor
    admission = getattr(executor, "admission", None)
    if admission is not None:
        yield float(admission.load()), {"device": str(getattr(executor, "device", ""))}


def _media_drops(tel: MediaTelemetry) -> list[tuple[float, dict[str, Any]]]:
    """The process's dropped media datagrams by reason (every guard of every server of the process)."""
    return [(float(n), {"reason": reason}) for reason, n in list(PROCESS_DROPS.items())]


def _clock(get: Callable[[Any], float]) -> ObservationSource:
    return lambda tel: [(get(tel.server.clock), {})]


# Per room, executor, stage and process: (name, kind, unit, description, source)
OTHER_METRICS: tuple[tuple[str, str, str, str, ObservationSource], ...] = (
    ("mediaserver.rooms", "updown", "{room}", "Rooms open.", lambda tel: [(float(len(list(_rooms(tel)))), {})]),
    ("mediaserver.room.participants", "updown", "{participant}", "Participants per room.",
     lambda tel: [(len(r.participants), {"room": r.id}) for r in _rooms(tel)]),
    ("mediaserver.room.streams", "updown", "{stream}", "Published streams per room (microphones, prompt tracks).",
     lambda tel: [(len(r.streams), {"room": r.id}) for r in _rooms(tel)]),
    ("mediaserver.room.prompts.active", "updown", "{prompt}", "Prompts playing or queued per room.", _room_prompts),
    ("mediaserver.room.prompts", "counter", "{prompt}", "Prompts synthesized and queued per room.",
     lambda tel: [(tel.prompts_requested.get(r.id, 0), {"room": r.id}) for r in _rooms(tel)]),
    *((name, "counter", unit, f"Executor counter '{key}' (enhancers/executor/worker.py COUNTER_KEYS).",
       _executor_counters(key)) for key, (name, unit) in EXECUTOR_COUNTERS.items()),
    ("mediaserver.executor.batch_size", "gauge", "{stream}",
     "Chunks per batched round of the executor, mean over the last second.", _executor_value(lambda t: t.batch_size)),
    ("mediaserver.executor.streams", "updown", "{stream}", "Streams open on the executor.",
     _executor_value(lambda t: float(t.executor_live_streams))),
    ("mediaserver.executor.admissions", "counter", "{stream}",
     "Stage requests of streams by what admission control gave them: result admitted (as asked), degraded "
     "(lighter stages), refused (no stages: audio forwarded as it came); enhancers/executor/admission.py.",
     _admissions),
    ("mediaserver.executor.load", "gauge", "1",
     "Predicted stage time per 10 ms tick of the streams as admitted, as a share of the tick.", _executor_load),
    ("mediaserver.executor.stage.calls", "counter", "{call}", "Batched calls of each stage.", _stage_field("calls")),
    ("mediaserver.executor.stage.errors", "counter", "{error}", "Failed calls of each stage.", _stage_field("errors")),
    ("mediaserver.executor.stage.batch_size", "gauge", "{stream}", "Streams per call of each stage, mean.",
     _stage_field("avg_batch")),
    ("mediaserver.executor.stage.disabled", "updown", "1", "1 when the stage was disabled after hanging.",
     _stage_field("disabled")),
    ("mediaserver.media.packets.dropped", "counter", "{packet}",
     "Datagrams at the WebRTC media ports dropped before or while aiortc handled them, by reason "
     "(mediaserver/transport_guard.py REASONS); counted for the whole process.", _media_drops),
    ("mediaserver.opus.complexity", "gauge", "1",
     "Opus complexity the encoders of re-encoded streams use now: the full one, or the lighter one while the "
     "event loop's core is busy (mediaserver/encoder_load.py).",
     lambda tel: [(float(tel.server.encoder_complexity.current), {})]),
    ("mediaserver.opus.complexity_changes", "counter", "{change}",
     "Switches of the Opus complexity between full and light.",
     lambda tel: [(float(tel.server.encoder_complexity.changes), {})]),
    ("mediaserver.joins.refused", "counter", "{join}",
     "Joins refused with server-busy: one more would fill the media loop's core, or its clock skipped ticks ("
     "mediaserver/loop_load.py JoinGate).", lambda tel: [(float(tel.server.join_gate.refused), {})]),
    ("mediaserver.event_loop.busy", "gauge", "1",
     "Share of the last second the event loop's thread ran or waited to run (mediaserver/loop_load.py).",
     lambda tel: [] if tel.server.loop_load.last_busy is None else [(tel.server.loop_load.last_busy, {})]),
    ("mediaserver.clock.lag", "gauge", "s", "How late the media clock's last 10 ms tick ran.",
     _clock(lambda c: c.last_lag_ms / 1000.0)),
    ("mediaserver.clock.lag_max", "gauge", "s", "Largest media clock lag since start.",
     _clock(lambda c: c.max_lag_ms / 1000.0)),
    ("mediaserver.clock.ticks", "counter", "{tick}", "Media clock ticks.", _clock(lambda c: float(c.ticks))),
    ("mediaserver.clock.skipped_ticks", "counter", "{tick}", "Ticks skipped after event loop stalls.",
     _clock(lambda c: float(c.skipped_ticks))),
)


class Instruments:
    """Owns the meter's instruments and the set of MediaTelemetry objects their callbacks read."""

    def __init__(self, meter: metrics.Meter | None = None) -> None:
        self._sources: weakref.WeakSet[MediaTelemetry] = weakref.WeakSet()
        self._lock = threading.Lock()  # callbacks run on exporter / collector threads
        self._stream_meters: list[metrics.Meter] = []
        meter = meter or metrics.get_meter("mediaserver")
        create = _creators(meter)
        for name, kind, unit, description, source in OTHER_METRICS:
            create[kind](name, callbacks=[self._per_server(source)], unit=unit, description=description)
        self.e2e = meter.create_histogram(
            "mediaserver.latency.e2e", unit="s", explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
            description="RTP arrival to RTP send of the same audio; one packet per stream sampled each second.")
        self.processing = meter.create_histogram(
            "mediaserver.latency.processing", unit="s", explicit_bucket_boundaries_advisory=PROCESSING_BUCKETS_S,
            description="Enhancement time of one chunk (submission to result); one chunk per stream each second.")
        self.stage_duration = meter.create_histogram(
            "mediaserver.executor.stage.duration", unit="s", explicit_bucket_boundaries_advisory=STAGE_BUCKETS_S,
            description="Time of one batched call of a stage; the last call sampled each second.")
        self.tick_duration = meter.create_histogram(
            "mediaserver.executor.tick.duration", unit="s", explicit_bucket_boundaries_advisory=STAGE_BUCKETS_S,
            description="Worker time of one batched round (all stages), mean over each second.")
        self.loop_lag = meter.create_histogram(
            "mediaserver.event_loop.lag", unit="s", explicit_bucket_boundaries_advisory=LAG_BUCKETS_S,
            description="How late a once-a-second probe on the event loop woke up.")

    def export_streams_on(self, meter: metrics.Meter) -> None:
        """Report the per-stream metrics (STREAM_METRICS) through ``meter`` too.

        They are not on the main meter: ``GET /metrics`` renders them straight from the live
        streams (``signaling/stream_metrics.py``), 20x cheaper than the SDK's per-series
        aggregation at tens of streams.  A meter of a provider with push exporters (OTLP,
        console) gets them here, so that those exporters still carry every stream.
        """
        if any(m is meter for m in self._stream_meters):
            return
        self._stream_meters.append(meter)
        create = _creators(meter)
        for name, kind, unit, description, getter in STREAM_METRICS:
            create[kind](name, callbacks=[self._per_stream(getter)], unit=unit, description=description)

    def observe(self, tel: MediaTelemetry) -> None:
        with self._lock:
            self._sources.add(tel)

    def forget(self, tel: MediaTelemetry) -> None:
        with self._lock:
            self._sources.discard(tel)

    def live(self) -> list[MediaTelemetry]:
        """The MediaTelemetry objects observed now (a copy: safe on any thread)."""
        with self._lock:
            return list(self._sources)

    def _per_stream(self, getter: Getter) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            out = []
            for tel in self.live():
                for st in list(tel.streams.values()):
                    value = getter(st)
                    if value is not None:
                        out.append(Observation(value, st.attrs))
            return out

        return callback

    def _per_server(self, source: ObservationSource) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, attrs) for tel in self.live() for value, attrs in source(tel)]

        return callback


def _creators(meter: metrics.Meter) -> dict[str, Callable[..., Any]]:
    return {"counter": meter.create_observable_counter, "updown": meter.create_observable_up_down_counter,
            "gauge": meter.create_observable_gauge}


_INSTRUMENTS: Instruments | None = None


def instruments() -> Instruments:
    """The process's instruments, created on first use (through the global meter provider's proxy)."""
    global _INSTRUMENTS
    if _INSTRUMENTS is None:
        _INSTRUMENTS = Instruments()
    return _INSTRUMENTS
