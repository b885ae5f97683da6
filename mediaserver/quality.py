"""Live quality SLIs per stream: a tap on the media path and a scorer thread off it.

``QualityTap`` is called by ``PublishedStream._drain`` for every chunk (``on_chunk``), with
the chunk as it entered the pipeline and as it left: it copies both into a 1 s block
(``[100, 480]``) and, once a second, hands the block to the monitor's bounded queue (full:
the block is dropped and counted, the media path never waits).  It also marks a block
*unclean* when its "after" audio is not what the block's stage set makes of it: chunks that
were bypassed (deadline missed, stage error: fail-open), a stage set that changed within the
block (results arrive in order, so chunks submitted before a switch come back after it), the
``settle_s`` after such a change (chunks still in flight, fresh stage states warming up), or a
stage that was not available in the executor (loading, disabled: its rows pass through).  No
other work happens on the event loop.

``QualityMonitor`` owns one thread (niced) that turns blocks into:

- continuous signals per stream (``enhancers.quality.SignalTracker``: speech level, SNR from a
  VAD-gated noise floor, clipping, VAD speech ratio), before and after enhancement;
- every ``period_s`` a ``window_s`` window of the stream, before and after, scored with DNSMOS
  P.835 (``enhancers.quality.DnsmosModel``), run in a niced process of its own
  (``enhancers.quality.scorer_process``: the model's few hundred MiB of activations and its
  0.4 s of CPU per window stay out of the media process); windows due together, of any
  streams, go through one call.  A window is made of clean blocks of one stage set only: an
  unclean block (or one with another stage set) ends the window being captured, which is
  discarded (counted), and the next window starts at the next clean block; when
  more than ``max_pending`` windows wait, the oldest are dropped (counted).  A stream without
  stages is scored once: its "after" is its "before".

Results are plain immutable objects swapped into dicts (read by ``stats``, telemetry).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from mediaserver.config import QualityConfig

log = logging.getLogger(__name__)

CHUNK = 480
BLOCK_CHUNKS = 100  # 1 s

# why a block is unclean (bit flags of _Block.unclean; names in UNCLEAN_REASONS)
BYPASSED = 1  # a chunk passed through unprocessed (deadline missed, stage error)
STAGES_CHANGED = 2  # the stage set changed within the block
SETTLING = 4  # within settle_s of a stage change
STAGE_UNAVAILABLE = 8  # a stage was loading or disabled in the executor (its rows passed through)
UNCLEAN_REASONS = {BYPASSED: "bypassed", STAGES_CHANGED: "stages_changed", SETTLING: "settling",
                   STAGE_UNAVAILABLE: "stage_unavailable"}


@dataclass(frozen=True)
class QualityReport:
    """The last DNSMOS window of one stream, before and after enhancement."""

    stream: str
    room: str
    stages: str  # the stage set that ran on the window ("none": no stages)
    before: Any  # enhancers.quality.MosScore
    after: Any
    windows: int  # windows scored so far on this stream
    at: float  # time.monotonic() when scored


@dataclass
class _Block:
    tap: "QualityTap"
    before: np.ndarray
    after: Optional[np.ndarray]  # None: the pipeline left every chunk as it was
    stages: str
    unclean: int = 0  # 0: every chunk ran ``stages``, settled; else UNCLEAN_REASONS flags


@dataclass
class _StreamState:
    tracker: Any  # enhancers.quality.SignalTracker
    room: str
    seen: int = 0  # blocks seen
    next_window: int = 0  # block index at which the next window starts
    capture: list[_Block] = field(default_factory=list)
    windows: int = 0


class QualityTap:
    """Owns one stream's block buffers on the event loop; ``on_chunk`` is ``PublishedStream``'s hook."""

    __slots__ = ("monitor", "stream_id", "room_id", "_before", "_after", "_n", "_same", "closed",
                 "_stage_list", "_label", "_unclean", "_settle", "_unavailable_mark")

    def __init__(self, monitor: "QualityMonitor", stream_id: str, room_id: str) -> None:
        self.monitor = monitor
        self.stream_id = stream_id
        self.room_id = room_id
        self._n = 0
        self._same = True
        self._before = np.empty((BLOCK_CHUNKS, CHUNK), dtype=np.float32)
        self._after = np.empty((BLOCK_CHUNKS, CHUNK), dtype=np.float32)
        self.closed = False
        self._stage_list: Optional[list[str]] = None  # the stage set of the last chunk (None: none seen yet)
        self._label = "none"
        self._unclean = 0
        self._settle = 0  # chunks still settling after a stage change
        self._unavailable_mark = monitor.unavailable_count()

    def on_chunk(self, stream: Any, before: np.ndarray, result: Any) -> None:
        after = result.audio
        if len(before) != CHUNK or len(after) != CHUNK or self.closed:
            return
        stages = stream.pipeline.stages
        if stages != self._stage_list:
            if self._stage_list is not None:  # a switch: chunks in flight ran the old set; new states warm up
                self._unclean |= STAGES_CHANGED
                self._settle = self.monitor.settle_chunks
            self._stage_list = stages
            self._label = ",".join(stages) or "none"
        elif self._settle:
            self._settle -= 1
            self._unclean |= SETTLING
        if result.bypassed:
            self._unclean |= BYPASSED
        n = self._n
        self._before[n] = before
        if after is not before:
            self._same = False
            self._after[n] = after
        else:
            self._after[n] = before
        self._n = n + 1
        if self._n == BLOCK_CHUNKS:
            mark = self.monitor.unavailable_count()
            if mark != self._unavailable_mark and stages:
                self._unclean |= STAGE_UNAVAILABLE
            self._unavailable_mark = mark
            self.monitor.submit(_Block(self, self._before, None if self._same else self._after, self._label,
                                       self._unclean))
            self._before = np.empty((BLOCK_CHUNKS, CHUNK), dtype=np.float32)
            self._after = np.empty((BLOCK_CHUNKS, CHUNK), dtype=np.float32)
            self._n, self._same, self._unclean = 0, True, 0


class QualityMonitor:
    """Owns the scorer thread, its bounded queue, the shared DNSMOS model and every stream's state."""

    def __init__(self, config: QualityConfig | None = None) -> None:
        self.config = config or QualityConfig()
        c = self.config
        self._period_blocks = max(1, int(round(c.period_s)))
        self._window_blocks = max(1, int(round(c.window_s)))
        self._first_block = max(0, int(round(c.first_window_s)))
        self._queue: queue.Queue[Optional[_Block]] = queue.Queue(maxsize=max(1, c.max_queued_blocks))
        self._states: dict[str, _StreamState] = {}  # scorer thread only
        self.reports: dict[str, QualityReport] = {}
        self.signals: dict[str, tuple[Any, Any]] = {}  # stream -> (before, after) SideSignals
        self._new: deque[QualityReport] = deque(maxlen=1024)  # for telemetry, oldest dropped
        self._pending: list[tuple[_StreamState, str, list[_Block]]] = []
        self.dropped_blocks = 0
        self.dropped_windows = 0
        self.discarded_windows = 0  # an unclean block or another stage set ended the window being captured
        self.unclean_blocks: dict[str, int] = dict.fromkeys(UNCLEAN_REASONS.values(), 0)
        self.settle_chunks = max(0, int(round(c.settle_s * 100)))
        # the executor's count of rows that wanted a stage it did not have (set by the server; a change
        # over a block marks the blocks of streams with stages unclean)
        self.unavailable_count: Callable[[], int] = lambda: 0
        self.windows_scored = 0
        self.score_cpu_s = 0.0  # CPU time of the scorer thread (thread_time), all work
        self._model: Any = None
        self._load_failed = False
        self._loading = False
        self._thread: Optional[threading.Thread] = None

    # -- event loop side --------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Nothing is being loaded: the scorer process is up, or not needed yet (it starts, in a process
        of its own, when the first window is due), or the SLIs are off, or it failed to start."""
        return not self._loading

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
        out: dict[str, Any] = {"mos": None, "signals": None, "arm": None}
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
                "unclean_blocks": dict(self.unclean_blocks),
                "queued_blocks": self._queue.qsize(), "scorer_cpu_s": round(self.score_cpu_s, 3)}

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
        while True:
            try:
                block = self._queue.get(timeout=0.5 if not self._pending else 0.0)
            except queue.Empty:
                if self._pending:
                    self._timed(self._score_pending)
                continue
            if block is None:
                return
            try:
                self._timed(lambda: self._on_block(block))
            except Exception:  # never let one stream stop the scorer
                log.exception("quality SLI failed on stream %s", block.tap.stream_id)

    def _load(self) -> None:
        from enhancers.quality.scorer_process import ScorerProcess, ScorerSettings

        self._loading = True
        try:
            model = ScorerProcess(ScorerSettings(threads=self.config.threads, nice=self.config.nice))
            model.start()  # loaded and warmed up: its memory is taken now, in its own process
            self._model = model
        except Exception:
            self._load_failed = True
            raise
        finally:
            self._loading = False

    def _timed(self, work: Any) -> None:
        t = time.thread_time()
        try:
            work()
        except Exception:
            log.exception("quality scoring failed")
        self.score_cpu_s += time.thread_time() - t

    def _state(self, tap: QualityTap) -> _StreamState:
        st = self._states.get(tap.stream_id)
        if st is None:
            from enhancers.quality import SignalTracker

            st = self._states[tap.stream_id] = _StreamState(SignalTracker(), tap.room_id,
                                                            next_window=self._first_block)
        return st

    def _on_block(self, block: _Block) -> None:
        tap = block.tap
        if tap.closed:
            self._states.pop(tap.stream_id, None)
            return
        st = self._state(tap)
        st.tracker.push(block.before, block.after)
        self.signals[tap.stream_id] = st.tracker.signals()
        for flag, reason in UNCLEAN_REASONS.items():
            if block.unclean & flag:
                self.unclean_blocks[reason] += 1
        if st.seen >= st.next_window:
            if st.capture and (block.unclean or st.capture[0].stages != block.stages):
                self.discarded_windows += 1  # not one settled stage set all through: start again
                st.capture = []
            if not block.unclean:
                st.capture.append(block)
            if len(st.capture) >= self._window_blocks:
                self._pending.append((st, tap.stream_id, st.capture))
                st.capture = []
                st.next_window = st.seen + 1 + max(0, self._period_blocks - self._window_blocks)
                excess = len(self._pending) - max(1, self.config.max_pending)
                if excess > 0:
                    self.dropped_windows += excess
                    del self._pending[:excess]
        st.seen += 1

    def _score_pending(self) -> None:
        pending, self._pending = self._pending, []
        if self._model is None:
            if self._load_failed:  # logged once when it failed; no retry storm of processes
                self.dropped_windows += len(pending)
                return
            self._load()
        clips: list[np.ndarray] = []
        index: list[tuple[int, int]] = []  # (before clip, after clip) per window
        for _, _, blocks in pending:
            before = np.concatenate([b.before.reshape(-1) for b in blocks])
            clips.append(before)
            if all(b.after is None for b in blocks):
                index.append((len(clips) - 1, len(clips) - 1))
            else:
                clips.append(np.concatenate([(b.before if b.after is None else b.after).reshape(-1)
                                             for b in blocks]))
                index.append((len(clips) - 2, len(clips) - 1))
        scores = self._model.score(clips)
        now = time.monotonic()
        for (st, stream_id, blocks), (i, j) in zip(pending, index):
            if blocks[0].tap.closed:
                continue
            st.windows += 1
            self.windows_scored += 1
            report = QualityReport(stream_id, st.room, blocks[0].stages, scores[i], scores[j], st.windows, now)
            self.reports[stream_id] = report
            self._new.append(report)
