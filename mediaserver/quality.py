"""Live quality SLIs per stream: a tap on the media path (``mediaserver/quality_tap.py``) and a scorer thread off it.

``QualityTap`` (one per stream, on the event loop) copies each chunk before and after the stages into
1 s blocks, marks the blocks whose "after" audio is not what their stage set makes of them
(*unclean*: bypassed chunks, a stage switch and the settling after it, a stage the executor did not
have) and hands them to the monitor's bounded queue.

``QualityMonitor`` owns one thread (niced) that turns blocks into:

- continuous signals per stream (``enhancers.quality.SignalTracker``: speech level, SNR from an
  energy-gated noise floor, clipping, speech ratio), before and after enhancement, vectorised
  per block (~0.15 ms of CPU per stream per second, in short GIL holds);
- ``window_s`` windows of the streams, before and after, scored with DNSMOS P.835
  (``enhancers.quality.DnsmosModel``) in a niced process of its own
  (``enhancers.quality.scorer_process``: the model's few hundred MiB of activations and its
  ~0.45 s of CPU per clip stay out of the media process; the thread hands a batch over and
  goes on with blocks while it is scored).  How many windows is bounded for the whole server,
  not per stream: ``mediaserver.quality_budget.ScoringBudget`` gives the scorer ``cpu_share``
  of one core and the streams their windows in a fair order (priority, for a rollout's arms,
  then longest without a window), no stream more often than every ``period_s``.  A window is
  made of clean blocks of one stage set only: an unclean block (or one with another stage set)
  ends the window being captured, which is discarded (counted), and the next window starts at
  the next clean block; a granted window not captured within ``3 * window_s + 5`` s gives its
  grant back; when more than ``max_pending`` windows wait, the oldest are dropped (counted).  A
  stream without stages is scored once: its "after" is its "before";
- optionally (``wer_every`` > 0, off by default), every ``wer_every``-th window of a stream whose
  stages change its audio is also an intelligibility pair: the WER of Whisper tiny.en's transcript
  of the "after" audio against that of the "before" audio, latency-aligned, computed in the same
  scorer process and charged to the same budget (``mediaserver/quality_wer.py``).

Results are plain immutable objects swapped into dicts (read by ``stats``, telemetry).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Optional

from mediaserver.config import QualityConfig
from mediaserver.quality_budget import ScoringBudget
from mediaserver.quality_tap import BLOCK_CHUNKS, CHUNK, UNCLEAN_REASONS, QualityTap, _Block  # noqa: F401
from mediaserver.quality_wer import WerCounters, WerReport, intelligibility_config, wants_pair
from mediaserver.quality_windows import QualityReport, _StreamState, _Window, batch_answers, batch_inputs

log = logging.getLogger(__name__)


class QualityMonitor:
    """Owns the scorer thread, its bounded queue, the DNSMOS scorer process, the budget and every stream's state."""

    def __init__(self, config: QualityConfig | None = None) -> None:
        self.config = config or QualityConfig()
        c = self.config
        self._period_blocks = max(1, int(round(c.period_s)))
        self._window_blocks = max(1, int(round(c.window_s)))
        self._first_block = max(0, int(round(c.first_window_s)))
        self._grant_blocks = 3 * self._window_blocks + 5  # a granted window not captured by then gives it back
        self._queue: queue.Queue[Optional[_Block]] = queue.Queue(maxsize=max(1, c.max_queued_blocks))
        self._states: dict[str, _StreamState] = {}  # scorer thread only
        self.budget = ScoringBudget(c.cpu_share, c.burst_s)
        self._wer_config = intelligibility_config(c)  # None: no intelligibility pairs
        if self._wer_config is not None:
            self.budget.max_wer_pairs, self.budget.wer_share = 1, 1.0 / c.wer_every
        self.wer_reports: dict[str, WerReport] = {}
        self.wer = WerCounters()
        self.reports: dict[str, QualityReport] = {}
        self.signals: dict[str, tuple[Any, Any]] = {}  # stream -> (before, after) SideSignals
        self._new: deque[QualityReport] = deque(maxlen=1024)  # for telemetry, oldest dropped
        self._listeners: list[deque[QualityReport]] = []  # other readers of new reports (rollouts)
        self._pending: list[_Window] = []
        self._inflight: Optional[tuple[Future[Any], list[_Window], float]] = None  # batch being scored
        self.dropped_blocks = 0
        self.dropped_windows = 0
        self.discarded_windows = 0  # an unclean block or another stage set ended the window being captured
        self.expired_grants = 0  # granted windows that found no clean run of blocks in time
        self.unclean_blocks: dict[str, int] = dict.fromkeys(UNCLEAN_REASONS.values(), 0)
        self.settle_chunks = max(0, int(round(c.settle_s * 100)))
        # the executor's count of rows that wanted a stage it did not have (set by the server; a change
        # over a block marks the blocks of streams with stages unclean)
        self.unavailable_count: Callable[[], int] = lambda: 0
        self.windows_scored = 0
        self.thread_cpu_s = 0.0  # CPU time of the scorer thread in this process (thread_time): signals, batching
        self.scorer_cpu_s = 0.0  # CPU time the scorer process spent on windows (its own measure)
        self._model: Any = None
        self._starting: Optional[Future[Any]] = None
        self._load_failed = False
        self._thread: Optional[threading.Thread] = None

    # -- event loop side --------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Nothing is being loaded: the scorer process is up, or not needed yet (it starts, in a process
        of its own, when the first window is due), or the SLIs are off, or it failed to start."""
        return self._starting is None

    def open(self, stream_id: str, room_id: str) -> Optional[QualityTap]:
        """A tap for a new stream, or None when the SLIs are off."""
        if not self.config.enabled:
            return None
        self._ensure_thread()
        return QualityTap(self, stream_id, room_id)

    def close_stream(self, tap: Optional[QualityTap]) -> None:
        if tap is None:
            return
        tap.closed = True
        self.reports.pop(tap.stream_id, None)
        self.signals.pop(tap.stream_id, None)
        self.wer_reports.pop(tap.stream_id, None)

    def set_priority(self, stream_id: str, priority: int) -> None:
        """Streams with a higher priority get their windows first (a rollout's arms); 0: the default."""
        self.budget.set_priority(stream_id, priority)

    def set_budget_boost(self, cpu_share: Optional[float]) -> None:
        """A larger scorer CPU share for a while (a rollout that wants samples sooner); None: the configured one."""
        self.budget.set_boost(cpu_share)

    def listen(self) -> deque[QualityReport]:
        """A queue that gets every report scored from now on (bounded: the oldest are dropped)."""
        q: deque[QualityReport] = deque(maxlen=1024)
        self._listeners.append(q)
        return q

    def unlisten(self, q: deque[QualityReport]) -> None:
        if q in self._listeners:
            self._listeners.remove(q)

    def submit(self, block: _Block) -> None:
        try:
            self._queue.put_nowait(block)
        except queue.Full:
            self.dropped_blocks += 1

    def take_new(self) -> list[QualityReport]:
        """Reports scored since the last call (telemetry records them)."""
        out = []
        while self._new:
            out.append(self._new.popleft())
        return out

    def stream_stats(self, stream_id: str) -> dict[str, Any]:
        """The ``quality`` object of a stream in ``stats`` (docs/PROTOCOL.md)."""
        out: dict[str, Any] = {"mos": None, "signals": None, "wer": None, "arm": None}
        w = self.wer_reports.get(stream_id)
        if w is not None:
            out["wer"] = w.as_dict()
        r = self.reports.get(stream_id)
        if r is not None:
            out["mos"] = {"before": r.before.as_dict(), "after": r.after.as_dict(), "stages": r.stages,
                          "windows": r.windows, "age_s": round(time.monotonic() - r.at, 1)}
        sig = self.signals.get(stream_id)
        if sig is not None:
            out["signals"] = {"before": sig[0].as_dict(), "after": sig[1].as_dict(),
                              "echo_return_loss_db": None}
        return out

    def stats(self) -> dict[str, Any]:
        return {"enabled": self.config.enabled, "period_s": self.config.period_s, "window_s": self.config.window_s,
                "windows_scored": self.windows_scored, "dropped_windows": self.dropped_windows,
                "dropped_blocks": self.dropped_blocks, "discarded_windows": self.discarded_windows,
                "expired_grants": self.expired_grants, "unclean_blocks": dict(self.unclean_blocks),
                "queued_blocks": self._queue.qsize(), "pending_windows": len(self._pending),
                "budget": self.budget.stats(), "thread_cpu_s": round(self.thread_cpu_s, 3),
                "scorer_cpu_s": round(self.scorer_cpu_s, 3),
                "wer": self.wer.stats(self.config.wer_every) if self._wer_config is not None else None}

    def close(self) -> None:
        if self._thread is not None:
            try:
                self._queue.put(None, timeout=1.0)
            except queue.Full:
                pass
            self._thread.join(timeout=5.0)
            self._thread = None
        if self._model is not None:
            self._model.close()
            self._model = None

    # -- scorer thread ----------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="quality-scorer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        if self.config.nice > 0 and hasattr(os, "setpriority"):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.config.nice)
            except OSError:
                pass
        swept = time.monotonic()
        while True:
            busy = self._pending or self._inflight is not None or self._starting is not None
            try:
                block = self._queue.get(timeout=0.05 if busy else 0.5)
            except queue.Empty:
                block = None
            else:
                if block is None:
                    return
            t = time.thread_time()
            try:
                if block is not None:
                    self._on_block(block)
                self._pump()
                if time.monotonic() - swept > 5.0:
                    swept = time.monotonic()
                    self._sweep()
            except Exception:  # never let one stream stop the scorer
                log.exception("quality SLI failed")
            self.thread_cpu_s += time.thread_time() - t

    def _state(self, tap: QualityTap) -> _StreamState:
        st = self._states.get(tap.stream_id)
        if st is None:
            from enhancers.quality import SignalTracker

            st = self._states[tap.stream_id] = _StreamState(tap, SignalTracker(), tap.room_id,
                                                            next_window=self._first_block)
        return st

    def _sweep(self) -> None:
        """Forget the streams that closed (their taps send nothing more)."""
        for stream_id, st in list(self._states.items()):
            if st.tap.closed:
                del self._states[stream_id]
                if st.reserved is not None:
                    self.budget.refund(st.reserved)
                self.budget.forget(stream_id)

    def _on_block(self, block: _Block) -> None:
        tap = block.tap
        if tap.closed:
            return
        st = self._state(tap)
        st.tracker.push(block.before, block.after)
        self.signals[tap.stream_id] = st.tracker.signals()
        for flag, reason in UNCLEAN_REASONS.items():
            if block.unclean & flag:
                self.unclean_blocks[reason] += 1
        if st.seen >= st.next_window:
            self._window_block(st, tap.stream_id, block)
        st.seen += 1

    def _window_block(self, st: _StreamState, stream_id: str, block: _Block) -> None:
        """``block`` of a stream that is due a window: ask the budget, capture, hand a full window over."""
        if st.reserved is None:
            if block.unclean:
                return  # nothing to capture yet: ask when there is
            wer = int(self._wer_config is not None and block.stages != "none"
                      and st.stage_windows % self.config.wer_every == 0)
            st.reserved = self.budget.request(stream_id, 1 if block.stages == "none" else 2, wer)
            if st.reserved is None:
                return
            st.granted_at = st.seen
        if st.capture and (block.unclean or st.capture[0].stages != block.stages):
            self.discarded_windows += 1  # not one settled stage set all through: start again
            st.capture = []
        if not block.unclean:
            st.capture.append(block)
        if len(st.capture) >= self._window_blocks:
            self._pending.append(_Window(st, stream_id, st.capture, st.reserved, self._wer_due(st, st.capture)))
            st.capture, st.reserved = [], None
            st.next_window = st.seen + 1 + max(0, self._period_blocks - self._window_blocks)
            excess = len(self._pending) - max(1, self.config.max_pending)
            if excess > 0:
                self.dropped_windows += excess
                for w in self._pending[:excess]:
                    self.budget.refund(w.reserved)
                del self._pending[:excess]
        elif st.seen - st.granted_at >= self._grant_blocks:
            self.expired_grants += 1  # no clean run of blocks: the grant goes to someone else
            self.budget.refund(st.reserved)
            st.capture, st.reserved = [], None

    def _wer_due(self, st: _StreamState, blocks: list[_Block]) -> bool:
        """Whether this captured window is also an intelligibility pair (every ``wer_every``-th with stages)."""
        if self._wer_config is None or not wants_pair(blocks):
            return False
        st.stage_windows += 1
        return (st.stage_windows - 1) % self.config.wer_every == 0

    def _pump(self) -> None:
        """Start the scorer process when a window first waits, hand it the waiting windows, take its answers."""
        if self._starting is not None:
            if not self._starting.done():
                return
            try:
                self._starting.result()
            except Exception:
                log.exception("the quality scorer process failed to start; DNSMOS windows are dropped")
                self._load_failed = True
            self._starting = None
        if self._inflight is not None:
            future, windows, sent = self._inflight
            if future.done():
                self._inflight = None
                self._collect(future, windows)
            elif time.monotonic() - sent > self.config.score_timeout_s:
                self._inflight = None
                future.cancel()
                self._model.abandon()
                self.dropped_windows += len(windows)
                for w in windows:
                    self.budget.refund(w.reserved)
            else:
                return
        if not self._pending:
            return
        if self._model is None:
            if self._load_failed:  # logged once when it failed; no retry storm of processes
                self.dropped_windows += len(self._pending)
                for w in self._pending:
                    self.budget.refund(w.reserved)
                self._pending = []
                return
            from enhancers.quality.scorer_process import ScorerProcess, ScorerSettings

            self._model = ScorerProcess(ScorerSettings(threads=self.config.threads, nice=self.config.nice,
                                                       idle=self.config.scorer_idle,
                                                       wer=self._wer_config))
            self._starting = self._model.start_async()  # loaded and warmed up in its own process
            return
        windows, self._pending = self._pending, []
        clips, pairs = batch_inputs(windows)
        self._inflight = (self._model.submit(clips, pairs=pairs), windows, time.monotonic())

    def _collect(self, future: Future[Any], windows: list[_Window]) -> None:
        try:
            scores, cpu_s, wers = self._model.collect(future)
        except Exception:
            log.exception("quality scoring failed")
            self.dropped_windows += len(windows)
            for w in windows:
                self.budget.refund(w.reserved)
            return
        self.scorer_cpu_s += cpu_s + sum(a.cpu_s for a in wers)
        now = time.monotonic()
        per_clip = cpu_s / max(1, len(scores))
        for w, before, after, answer in batch_answers(windows, scores, wers):
            self.budget.charge(w.reserved, per_clip * w.clips, w.clips,
                               1 if answer is not None else 0, answer.cpu_s if answer is not None else 0.0)
            wer = self.wer.record(answer, w.blocks[0].stages, w.state.wer_pairs, now) if answer is not None else None
            if w.blocks[0].tap.closed:
                continue
            w.state.windows += 1
            self.windows_scored += 1
            report = QualityReport(w.stream, w.state.room, w.blocks[0].stages, before, after, w.state.windows, now,
                                   wer)
            self.reports[w.stream] = report
            if wer is not None:
                self.wer_reports[w.stream] = wer
                w.state.wer_pairs = wer.pairs
            self._new.append(report)
            for q in list(self._listeners):
                q.append(report)
