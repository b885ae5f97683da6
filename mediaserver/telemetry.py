"""Media telemetry: OpenTelemetry metrics and spans of the SFU, read from its live counters.

Only the OpenTelemetry *API* is used here; the SDK (readers, exporters, the Prometheus
registry behind ``GET /metrics``) is configured once at the entry point by
``signaling/telemetry_setup.py``.  Without an SDK every instrument and span is a no-op.

Nothing is added to the per-chunk path.  Observable instruments read the plain counters the
media code keeps anyway (``StreamCounters``, ``JitterStats``, the executor's counters, the
clock) when a reader collects.  Per sent packet, a subscriber's sender calls ``SendLatency``
(a few float operations) for the end-to-end latency.  A sampler task wakes once a second to
turn counters into interval figures (loss ratio, e2e latency, subscriber drops, batch size,
tick time), to record one sample per stream and per stage into the histograms (one OTel
``record`` costs 30-50 us here: too much per packet), and to turn counter changes into span
events.  The instrument table lives in ``mediaserver/telemetry_instruments.py``.

Spans: one per participant session, one per published track (microphone, phone call, prompt
track) as its child, one per prompt as a child of its track.  Events mark renegotiations,
stage changes, subscriber changes and bypassed chunks.  Never a span per frame.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import Span

from mediaserver.jitter import JitterStats
from mediaserver.quality_telemetry import quality_instruments, record_new
from mediaserver.stream import PublishedStream, StreamCounters
from mediaserver.telemetry_instruments import Instruments, instruments

if TYPE_CHECKING:
    from mediaserver.room import Participant
    from mediaserver.server import MediaServer

log = logging.getLogger(__name__)

SAMPLE_RATE = 48_000


class SendLatency:
    """``SubscriberTrack.on_sent`` hook: RTP arrival to RTP send of each packet, as plain floats."""

    __slots__ = ("count", "last", "peak", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.peak = 0.0
        self.last: float | None = None

    def __call__(self, packet: Any) -> None:
        origin = packet.origin
        if origin is not None:
            latency = time.monotonic() - origin
            self.count += 1
            self.total += latency
            self.peak = max(self.peak, latency)
            self.last = latency

    def take(self) -> tuple[int, float, float]:
        """(count, sum, max) since the last call; resets them."""
        out = (self.count, self.total, self.peak)
        self.count, self.total, self.peak = 0, 0.0, 0.0
        return out


class StreamState:
    """Telemetry's view of one published stream: metric attributes, span, interval figures."""

    def __init__(self, stream: PublishedStream, room_id: str, span: Span) -> None:
        self.stream: PublishedStream = stream
        self.counters: StreamCounters = stream.counters
        self.attrs = {"room": room_id, "stream": stream.id, "participant": stream.owner_id, "kind": stream.kind}
        stats = getattr(stream.source, "stats", None)
        self.jitter: JitterStats | None = stats if isinstance(stats, JitterStats) else None
        self.span = span
        self.subscriber_dropped: int = 0
        self.e2e_mean: float | None = None  # seconds, over the last sampler interval
        self.e2e_max: float | None = None
        self.e2e_last: float | None = None  # one packet's latency: the histogram's sample
        self.loss_ratio: float = 0.0
        self._prev = self._snapshot()

    def _snapshot(self) -> tuple[int, int, int, int, int]:
        jb = self.jitter
        return (self.counters.chunks, self.counters.bypassed, jb.received if jb else 0, jb.lost if jb else 0,
                self.stream.fanout.subscriber_count)

    @property
    def has_vad(self) -> bool:
        return any(s.split(":")[0] == "vad" for s in self.stream.pipeline.stages)

    def histogram_attrs(self) -> dict[str, str]:
        return {"kind": self.stream.kind, "stages": ",".join(self.stream.pipeline.stages) or "none"}

    def advance(self) -> tuple[int, int, int]:
        """Update the interval figures; (new chunks, new bypassed chunks, subscriber change)."""
        prev, now = self._prev, self._snapshot()
        self._prev = now
        received, lost = now[2] - prev[2], now[3] - prev[3]
        self.loss_ratio = max(0.0, lost / (lost + received)) if lost + received > 0 else 0.0
        return now[0] - prev[0], now[1] - prev[1], now[4] - prev[4]

    def summary(self) -> dict[str, Any]:
        c = self.counters
        out: dict[str, Any] = {"mediaserver.chunks": c.chunks, "mediaserver.bypassed": c.bypassed,
                               "mediaserver.dropped.backlog": c.dropped_backlog,
                               "mediaserver.dropped.subscriber": self.subscriber_dropped}
        if self.jitter is not None:
            jb = self.jitter
            out.update({"mediaserver.rtp.received": jb.received, "mediaserver.rtp.lost": jb.lost,
                        "mediaserver.rtp.late": jb.late, "mediaserver.concealed": jb.concealed_chunks,
                        "mediaserver.rtp.jitter_ms": round(jb.jitter_ms, 2)})
        return out


@dataclass
class _PromptTrace:
    prompt: Any  # mediaserver.prompts.Prompt
    source: Any  # its track's PromptSource (sample clock)
    span: Span
    started: bool = False


@dataclass
class _TrackTap:
    latency: SendLatency
    dropped: int


def _ago_ns(samples: int) -> int:
    """Wall-clock time (ns) of an event ``samples`` samples ago on a 48 kHz media clock."""
    return time.time_ns() - int(samples * 1e9 / SAMPLE_RATE)


class MediaTelemetry:
    """Owns the spans and per-stream bookkeeping of one MediaServer, and the sampler task feeding them."""

    def __init__(self, server: MediaServer, interval_s: float = 1.0) -> None:
        self._server = server
        self.interval_s = interval_s
        self._tracer = trace.get_tracer("mediaserver")
        self._instruments: Instruments | None = None
        self.streams: dict[PublishedStream, StreamState] = {}
        self._sessions: dict[str, Span] = {}
        self._prompts: list[_PromptTrace] = []
        self._taps: dict[int, _TrackTap] = {}
        self._stage_prev: dict[str, tuple[int, float]] = {}
        self._exec_prev: tuple[int, int] = (0, 0)
        self.executor_stages: dict[str, dict[str, Any]] = {}
        self.executor_live_streams: int = 0
        self.batch_size: float = 0.0
        self.tick_s: float = 0.0
        self.prompts_requested: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def server(self) -> MediaServer:
        return self._server

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        self._instruments = instruments()
        self._instruments.observe(self)
        if getattr(self._server, "quality", None) is not None:
            quality_instruments().observe(self._server.quality)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="telemetry-sampler")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for p in self._prompts:
            p.span.set_attribute("mediaserver.prompt.outcome", "server shutdown")
            p.span.end()
        self._prompts.clear()
        for st in list(self.streams.values()):
            self._end_stream(st, "server shutdown")
        for span in self._sessions.values():
            span.set_attribute("mediaserver.leave_reason", "server shutdown")
            span.end()
        self._sessions.clear()
        if self._instruments is not None:
            self._instruments.forget(self)

    # -- hooks called by MediaServer ---------------------------------------------------
    def participant_joined(self, participant: Participant) -> None:
        self._sessions[participant.id] = self._tracer.start_span("participant.session", attributes={
            "mediaserver.room": participant.room.id, "mediaserver.participant": participant.id,
            "mediaserver.participant.kind": participant.kind})

    def participant_left(self, participant: Participant, reason: str) -> None:
        self._follow_prompts()
        self.sweep()
        span = self._sessions.pop(participant.id, None)
        if span is not None:
            span.set_attribute("mediaserver.leave_reason", reason)
            span.end()

    def renegotiated(self, participant: Participant) -> None:
        span = self._sessions.get(participant.id)
        if span is not None:
            span.add_event("renegotiation", {"mediaserver.renegotiations":
                                             int(getattr(participant.session, "renegotiations", 0))})

    def stream_started(self, stream: PublishedStream, room_id: str) -> StreamState:
        st = self.streams.get(stream)
        if st is None:
            parent = self._sessions.get(stream.owner_id)
            context = trace.set_span_in_context(parent) if parent is not None else None
            span = self._tracer.start_span("prompt.track" if stream.kind == "prompt" else "track", context=context,
                                           attributes={"mediaserver.room": room_id, "mediaserver.stream": stream.id,
                                                       "mediaserver.stream.kind": stream.kind,
                                                       "mediaserver.participant": stream.owner_id,
                                                       "mediaserver.stages": ",".join(stream.pipeline.stages)})
            st = self.streams[stream] = StreamState(stream, room_id, span)
        return st

    def stages_changed(self, stream: PublishedStream | None) -> None:
        st = self.streams.get(stream) if stream is not None else None
        if st is not None:
            st.span.add_event("stages.changed", {"mediaserver.stages": ",".join(st.stream.pipeline.stages)})

    def prompt_queued(self, room_id: str, prompt: Any, requested_ns: int) -> None:
        """A prompt was synthesized and queued: its span runs from the request to the end of playback."""
        player = getattr(getattr(self._server, "prompts", None), "players", {}).get((room_id, prompt.to))
        if player is None:
            return
        self.prompts_requested[room_id] = self.prompts_requested.get(room_id, 0) + 1
        track = self.stream_started(player.stream, room_id)
        span = self._tracer.start_span("prompt", context=trace.set_span_in_context(track.span),
                                       start_time=requested_ns, attributes={
                                           "mediaserver.room": room_id, "mediaserver.prompt": prompt.id,
                                           "mediaserver.prompt.voice": str(prompt.voice),
                                           "mediaserver.prompt.to": prompt.to or "",
                                           "mediaserver.prompt.chars": len(prompt.text),
                                           "mediaserver.prompt.duration_s": round(prompt.duration_s, 3),
                                           "mediaserver.prompt.cache_hit": bool(prompt.cache_hit)})
        span.add_event("synthesized")
        self._prompts.append(_PromptTrace(prompt, player.source, span))
        self._follow_prompts()

    def stream_extras(self, stream: PublishedStream) -> dict[str, Any]:
        """Figures for the ``stats`` message that only telemetry computes."""
        st = self.streams.get(stream)
        if st is None:
            return {}
        # media_dropped: bad datagrams at the owner's media ports (mediaserver/transport_guard.py)
        owner = getattr(self.server.rooms.rooms.get(st.attrs["room"]), "participants", {}).get(stream.owner_id)
        guard = getattr(getattr(owner, "session", None), "guard", None)
        return {"e2e_latency_ms": None if st.e2e_mean is None else round(st.e2e_mean * 1000.0, 1),
                "subscriber_dropped": st.subscriber_dropped, "dropped_backlog": st.counters.dropped_backlog,
                **({"media_dropped": {k: v for k, v in guard.dropped.items() if v}} if guard is not None else {})}

    # -- the sampler ----------------------------------------------------------------------
    async def _run(self) -> None:
        next_t = time.monotonic()
        while True:
            next_t += self.interval_s
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))
            lag = max(0.0, time.monotonic() - next_t)
            if lag > self.interval_s:
                next_t = time.monotonic()
            try:
                self.sample(lag)
            except Exception:  # telemetry must never take the server down
                log.exception("telemetry sampling failed")

    def sample(self, loop_lag_s: float = 0.0) -> None:
        """Interval figures, histogram samples and span events; runs once per interval."""
        inst = self._instruments
        self.sweep()
        for room in list(self._server.rooms.rooms.values()):
            for stream in list(room.streams.values()):
                if not getattr(stream, "remote", False):  # a stream of another host: reported there
                    self.stream_started(stream, room.id)
        self._collect_subscriber_taps()
        for st in self.streams.values():
            chunks, bypassed, subscribers = st.advance()
            if bypassed > 0:
                st.span.add_event("bypass", {"mediaserver.chunks": bypassed})
            if subscribers != 0:
                st.span.add_event("subscribers.changed",
                                  {"mediaserver.subscribers": st.stream.fanout.subscriber_count})
            if inst is not None and chunks > 0:
                attrs = st.histogram_attrs()
                inst.processing.record(st.counters.processing_ms / 1000.0, attrs)
                if st.e2e_last is not None:
                    inst.e2e.record(st.e2e_last, attrs)
        self._sample_executor()
        self._follow_prompts()
        if inst is not None:
            inst.loop_lag.record(loop_lag_s)
            if getattr(self._server, "quality", None) is not None:  # quality SLIs: histograms, span attributes
                record_new(self, self._server.quality)

    def sweep(self) -> None:
        """End the spans of streams that left their room."""
        live = {s for room in self._server.rooms.rooms.values() for s in room.streams.values()}
        for stream, st in list(self.streams.items()):
            if stream not in live or stream.closed:
                self._end_stream(st, "closed")

    def _end_stream(self, st: StreamState, reason: str) -> None:
        self.streams.pop(st.stream, None)
        st.span.set_attributes(st.summary())
        st.span.set_attribute("mediaserver.end_reason", reason)
        st.span.end()

    def _collect_subscriber_taps(self) -> None:
        """Per subscriber track: install the latency hook, move its figures to the stream it carries."""
        by_fanout = {st.stream.fanout: st for st in self.streams.values()}
        totals: dict[StreamState, list[float]] = {}
        seen: set[int] = set()
        for room in list(self._server.rooms.rooms.values()):
            for p in list(room.participants.values()):
                for track in list(getattr(p.session, "subscriber_tracks", ())):
                    key = id(track)
                    seen.add(key)
                    tap = self._taps.get(key)
                    if tap is None or track.on_sent is not tap.latency:
                        if track.on_sent is not None:
                            continue  # someone else's hook: leave it alone
                        tap = self._taps[key] = _TrackTap(SendLatency(), 0)
                        track.on_sent = tap.latency
                    count, total, peak = tap.latency.take()
                    dropped, tap.dropped = track.dropped - tap.dropped, track.dropped
                    st = by_fanout.get(track.source)
                    if st is None:
                        continue
                    st.subscriber_dropped += max(0, dropped)
                    acc = totals.setdefault(st, [0, 0.0, 0.0, -1.0])
                    acc[0] += count
                    acc[1] += total
                    acc[2] = max(acc[2], peak)
                    if tap.latency.last is not None and count:
                        acc[3] = tap.latency.last
        for key in [k for k in self._taps if k not in seen]:
            del self._taps[key]
        for st in self.streams.values():
            figures = totals.get(st)
            if figures is None or figures[0] == 0:
                st.e2e_mean = st.e2e_max = st.e2e_last = None
            else:
                st.e2e_mean, st.e2e_max = figures[1] / figures[0], figures[2]
                st.e2e_last = figures[3] if figures[3] >= 0 else None

    def _sample_executor(self) -> None:
        executor = self._server.hub.executor
        if executor is None:
            return
        stats = executor.stats()
        inst = self._instruments
        chunks, batches = int(stats.get("chunks", 0)), int(stats.get("batches", 0))
        d_chunks, d_batches = chunks - self._exec_prev[0], batches - self._exec_prev[1]
        self._exec_prev = (chunks, batches)
        stages: dict[str, dict[str, Any]] = dict(stats.get("stages") or {})
        self.executor_stages = stages
        self.executor_live_streams = int(stats.get("live_streams", 0))
        busy_s = 0.0
        for spec, s in stages.items():
            calls = int(s.get("calls", 0))
            total_s = float(s.get("avg_ms", 0.0)) * calls / 1000.0
            prev_calls, prev_total = self._stage_prev.get(spec, (0, 0.0))
            self._stage_prev[spec] = (calls, total_s)
            if calls > prev_calls:
                busy_s += max(0.0, total_s - prev_total)
                if inst is not None:
                    inst.stage_duration.record(float(s.get("last_ms", 0.0)) / 1000.0, {"stage": spec})
        if d_batches > 0:
            self.batch_size = d_chunks / d_batches
            self.tick_s = busy_s / d_batches
            if inst is not None:
                inst.tick_duration.record(self.tick_s, {"device": str(stats.get("device", ""))})

    def _follow_prompts(self) -> None:
        """Events and ends of prompt spans, timed from their track's sample clock."""
        still: list[_PromptTrace] = []
        for p in self._prompts:
            prompt, samples = p.prompt, int(p.source.samples)
            if not p.started and prompt.started_sample >= 0:
                p.started = True
                p.span.add_event("prompt.started", timestamp=_ago_ns(samples - prompt.started_sample))
            if prompt.ended_sample >= 0:
                p.span.set_attribute("mediaserver.prompt.interrupted", bool(prompt.interrupted))
                p.span.set_attribute("mediaserver.prompt.played_s", round(prompt.played / SAMPLE_RATE, 3))
                p.span.end(end_time=_ago_ns(samples - prompt.ended_sample))
            elif getattr(p.source, "closed", False):
                p.span.set_attribute("mediaserver.prompt.outcome", "track closed")
                p.span.end()
            else:
                still.append(p)
        self._prompts = still
