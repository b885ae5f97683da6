"""The event-loop side of the live quality SLIs: one stream's 1 s blocks of audio, before and after its stages.

``QualityTap`` is called by ``PublishedStream._drain`` for every chunk (``on_chunk``), with the chunk
as it entered the pipeline and as it left: it copies both into a 1 s block (``[100, 480]``) and,
once a second, hands the block to the monitor's bounded queue (``QualityMonitor.submit``; full: the
block is dropped and counted, the media path never waits).  It also marks a block *unclean* when its
"after" audio is not what the block's stage set makes of it: chunks that were bypassed (deadline
missed, stage error: fail-open), a stage set that changed within the block (results arrive in
order, so chunks submitted before a switch come back after it), the ``settle_s`` after such a
change (chunks still in flight, fresh stage states warming up), or a stage that was not available in
the executor (loading, disabled: its rows pass through).  Each block carries the pipeline's declared
latency (``latency_samples``: a stage with look-ahead returns the audio of an earlier input), which
the intelligibility pairs (``mediaserver/quality_wer.py``) align on.  No other work happens here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import numpy as np

CHUNK = 480
BLOCK_CHUNKS = 100  # 1 s

# why a block is unclean (bit flags of _Block.unclean; names in UNCLEAN_REASONS)
BYPASSED = 1  # a chunk passed through unprocessed (deadline missed, stage error)
STAGES_CHANGED = 2  # the stage set changed within the block
SETTLING = 4  # within settle_s of a stage change
STAGE_UNAVAILABLE = 8  # a stage was loading or disabled in the executor (its rows passed through)
UNCLEAN_REASONS = {BYPASSED: "bypassed", STAGES_CHANGED: "stages_changed", SETTLING: "settling",
                   STAGE_UNAVAILABLE: "stage_unavailable"}


@dataclass
class _Block:
    tap: "QualityTap"
    before: np.ndarray
    after: Optional[np.ndarray]  # None: the pipeline left every chunk as it was
    stages: str
    unclean: int = 0  # 0: every chunk ran ``stages``, settled; else UNCLEAN_REASONS flags
    latency: int = 0  # samples by which "after" lags "before" (the stages' declared look-ahead)


class BlockSink(Protocol):
    """What a tap hands its blocks to (``mediaserver.quality.QualityMonitor``)."""

    settle_chunks: int  # chunks of settling after a stage change
    unavailable_count: Callable[[], int]  # the executor's count of rows a stage was not available for

    def submit(self, block: "_Block") -> None: ...


class QualityTap:
    """Owns one stream's block buffers on the event loop; ``on_chunk`` is ``PublishedStream``'s hook."""

    __slots__ = ("monitor", "stream_id", "room_id", "_before", "_after", "_n", "_same", "closed",
                 "_stage_list", "_label", "_unclean", "_settle", "_unavailable_mark")

    def __init__(self, monitor: BlockSink, stream_id: str, room_id: str) -> None:
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
            if self._same:  # the first changed chunk of the block: the ones before it came out as they went in
                self._same = False
                self._after[:n] = self._before[:n]
            self._after[n] = after
        elif not self._same:
            self._after[n] = before
        self._n = n + 1
        if self._n == BLOCK_CHUNKS:
            self._flush(stream, stages)

    def _flush(self, stream: Any, stages: list[str]) -> None:
        """The block is full (once a second): label it and hand it to the monitor."""
        mark = self.monitor.unavailable_count()
        if mark != self._unavailable_mark and stages:
            self._unclean |= STAGE_UNAVAILABLE
        self._unavailable_mark = mark
        if self._same:
            self.monitor.submit(_Block(self, self._before, None, self._label, self._unclean))
        else:
            latency = int(getattr(stream.pipeline, "latency_samples", 0) or 0)
            self.monitor.submit(_Block(self, self._before, self._after, self._label, self._unclean, latency))
            self._after = np.empty((BLOCK_CHUNKS, CHUNK), dtype=np.float32)
        self._before = np.empty((BLOCK_CHUNKS, CHUNK), dtype=np.float32)
        self._n, self._same, self._unclean = 0, True, 0
