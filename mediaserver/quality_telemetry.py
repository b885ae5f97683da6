"""The live quality SLIs (mediaserver/quality.py) as OpenTelemetry metrics and span attributes.

Label cardinality is bounded: the histograms carry ``room`` (at most ``max_rooms``), ``stages``
(the stage set that ran on the window: a handful), ``position`` (``before``/``after``
enhancement) and ``score`` (``sig``/``bak``/``ovrl``).  Per-stream gauges exist only when
``QualityConfig.per_stream_metrics`` is set; per stream figures are otherwise in ``stats`` and
``GET /api/rooms/{id}``.  One window per stream per period is recorded (``record_new``, called
by the telemetry sampler once a second), never anything per chunk.  Span attributes
``mediaserver.quality.*`` on the stream's ``track`` span hold the last window, and each window
is a ``quality`` span event.  The optional intelligibility SLI (``QualityConfig.wer_every``) adds
the ``mediaserver.quality.wer`` histogram (``room``, ``stages``: its mean and pair count per room
and stage set), the ``mediaserver.quality.wer.pairs`` counter by ``result`` and the
``mediaserver.quality.wer*`` span attributes of the last pair.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

if TYPE_CHECKING:
    from mediaserver.quality import QualityMonitor, QualityReport
    from mediaserver.telemetry import MediaTelemetry

MOS_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0, 3.25, 3.5, 3.75, 4.0, 4.25, 4.5, 5.0)
SNR_BUCKETS_DB = (-5.0, 0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 60.0)
WER_BUCKETS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5)


class QualityInstruments:
    """Owns the quality instruments of the process and the monitors their callbacks read."""

    def __init__(self, meter: metrics.Meter | None = None) -> None:
        meter = meter or metrics.get_meter("mediaserver")
        self._monitors: weakref.WeakSet[QualityMonitor] = weakref.WeakSet()
        self._lock = threading.Lock()
        self.mos = meter.create_histogram(
            "mediaserver.quality.mos", unit="1", explicit_bucket_boundaries_advisory=MOS_BUCKETS,
            description="DNSMOS P.835 of one sampled window per stream and period; attributes room, stages, "
                        "position (before/after enhancement), score (sig/bak/ovrl).")
        self.snr = meter.create_histogram(
            "mediaserver.quality.snr", unit="dB", explicit_bucket_boundaries_advisory=SNR_BUCKETS_DB,
            description="Estimated SNR (VAD-gated noise floor, last 5 s) at each scored window; room, stages, "
                        "position.")
        meter.create_observable_counter(
            "mediaserver.quality.windows", callbacks=[self._windows], unit="{window}",
            description="Quality windows by result: scored, dropped (scorer busy), discarded (an unclean block or "
                        "another stage set ended the window).")
        meter.create_observable_counter(
            "mediaserver.quality.blocks.dropped", callbacks=[self._blocks], unit="{block}",
            description="1 s blocks of audio the scorer thread's full queue refused.")
        meter.create_observable_counter(
            "mediaserver.quality.blocks.unclean", callbacks=[self._unclean], unit="{block}",
            description="1 s blocks whose processed audio no window may use, by reason: bypassed (chunks passed "
                        "through unprocessed), stages_changed, settling (just after a change), stage_unavailable.")
        self.wer = meter.create_histogram(
            "mediaserver.quality.wer", unit="1", explicit_bucket_boundaries_advisory=WER_BUCKETS,
            description="Word error rate of Whisper tiny.en on a sampled window after the stages against the same "
                        "window before them (0: every word kept; only with wer_every); attributes room, stages.")
        meter.create_observable_counter(
            "mediaserver.quality.wer.pairs", callbacks=[self._wer_pairs], unit="{pair}",
            description="Intelligibility pairs by result: scored, few_words (the input held fewer than "
                        "wer_min_words words), failed.")
        meter.create_observable_gauge(
            "mediaserver.stream.quality.wer", callbacks=[self._per_stream_wer], unit="1",
            description="Last intelligibility WER per stream (only with per_stream_metrics and wer_every); room, "
                        "stream.")
        meter.create_observable_gauge(
            "mediaserver.stream.quality.ovrl", callbacks=[self._per_stream], unit="1",
            description="Last DNSMOS OVRL per stream (only with per_stream_metrics); room, stream, position.")

    def observe(self, monitor: QualityMonitor) -> None:
        with self._lock:
            self._monitors.add(monitor)

    def _live(self) -> list[QualityMonitor]:
        with self._lock:
            return list(self._monitors)

    def _windows(self, options: CallbackOptions) -> Iterable[Observation]:
        for m in self._live():
            yield Observation(m.windows_scored, {"result": "scored"})
            yield Observation(m.dropped_windows, {"result": "dropped"})
            yield Observation(m.discarded_windows, {"result": "discarded"})

    def _blocks(self, options: CallbackOptions) -> Iterable[Observation]:
        for m in self._live():
            yield Observation(m.dropped_blocks, {})

    def _unclean(self, options: CallbackOptions) -> Iterable[Observation]:
        for m in self._live():
            for reason, n in list(m.unclean_blocks.items()):
                yield Observation(n, {"reason": reason})

    def _wer_pairs(self, options: CallbackOptions) -> Iterable[Observation]:
        for m in self._live():
            if m.config.wer_every > 0:
                for result, n in list(m.wer.results.items()):
                    yield Observation(n, {"result": result})

    def _per_stream_wer(self, options: CallbackOptions) -> Iterable[Observation]:
        for m in self._live():
            if m.config.per_stream_metrics:
                rooms = {r.stream: r.room for r in list(m.reports.values())}
                for stream, w in list(m.wer_reports.items()):
                    yield Observation(w.wer, {"room": rooms.get(stream, ""), "stream": stream})

    def _per_stream(self, options: CallbackOptions) -> Iterable[Observation]:
        for m in self._live():
            if not m.config.per_stream_metrics:
                continue
            for r in list(m.reports.values()):
                yield Observation(r.before.ovrl, {"room": r.room, "stream": r.stream, "position": "before"})
                yield Observation(r.after.ovrl, {"room": r.room, "stream": r.stream, "position": "after"})


_instruments: QualityInstruments | None = None
_lock = threading.Lock()


def quality_instruments() -> QualityInstruments:
    global _instruments
    with _lock:
        if _instruments is None:
            _instruments = QualityInstruments()
        return _instruments


def span_attributes(r: QualityReport, signals: Any) -> dict[str, Any]:
    attrs: dict[str, Any] = {"mediaserver.quality.stages": r.stages, "mediaserver.quality.windows": r.windows}
    for position, score in (("before", r.before), ("after", r.after)):
        for name in ("sig", "bak", "ovrl"):
            attrs[f"mediaserver.quality.{name}.{position}"] = round(float(getattr(score, name)), 3)
    if signals is not None:
        for position, side in zip(("before", "after"), signals):
            attrs[f"mediaserver.quality.snr_db.{position}"] = round(side.snr_db, 1)
            attrs[f"mediaserver.quality.level_dbfs.{position}"] = round(side.level_dbfs, 1)
        attrs["mediaserver.quality.clipping"] = round(signals[0].clipping, 5)
        attrs["mediaserver.quality.speech_ratio"] = round(signals[0].speech_ratio, 3)
    if r.wer is not None:  # the window was an intelligibility pair
        attrs["mediaserver.quality.wer"] = round(r.wer.wer, 3)
        attrs["mediaserver.quality.wer.words"] = r.wer.words
        attrs["mediaserver.quality.wer.pairs"] = r.wer.pairs
    return attrs


def record_new(tel: MediaTelemetry, monitor: QualityMonitor) -> None:
    """Histogram samples and span attributes/events of the windows scored since the last call."""
    reports = monitor.take_new()
    if not reports:
        return
    inst = quality_instruments()
    inst.observe(monitor)
    spans = {st.stream.id: st.span for st in list(tel.streams.values())}
    for r in reports:
        signals = monitor.signals.get(r.stream)
        for position, score in (("before", r.before), ("after", r.after)):
            base = {"room": r.room, "stages": r.stages, "position": position}
            for name in ("sig", "bak", "ovrl"):
                inst.mos.record(float(getattr(score, name)), {**base, "score": name})
        if signals is not None:
            for position, side in zip(("before", "after"), signals):
                inst.snr.record(float(side.snr_db), {"room": r.room, "stages": r.stages, "position": position})
        if r.wer is not None:
            inst.wer.record(float(r.wer.wer), {"room": r.room, "stages": r.stages})
        span = spans.get(r.stream)
        if span is not None:
            attrs = span_attributes(r, signals)
            span.set_attributes(attrs)
            span.add_event("quality", attrs)
