"""The per-stream enhancement hook between decoding and encoding.

``PipelineHub`` is what the SFU talks to: it opens one ``StreamPipeline`` per
published stream.  With no stages configured the chunk passes straight
through without leaving the event loop; with stages it goes through the
shared batched executor of ``enhancers`` (which fails open on its own).
The executor's admission control may give a stream lighter stages than it
asked for, or none (then its chunks pass straight through, as with no
stages): ``stages`` is what runs, ``requested_stages`` what was asked for,
``degraded_reason`` why they differ; ``on_change`` is called when the
executor changes them later (an upgrade once load drops).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    """One processed chunk and what the stages said about it."""

    audio: np.ndarray
    side: dict[str, float] = field(default_factory=dict)
    bypassed: bool = False


class StreamPipeline:
    """One published stream's chain of stages, changeable live."""

    def __init__(self, hub: "PipelineHub", label: str, stages: Sequence[str],
                 options: Optional[Mapping[str, Mapping[str, Any]]] = None) -> None:
        self._hub = hub
        self._label = label
        self._executor_stream: Any = None
        self._stages: list[str] = []
        self._requested: list[str] = []
        self._options = dict(options or {})
        self.on_change: Optional[Callable[["StreamPipeline"], None]] = None  # stages changed by the executor
        self.cancels_echo = False  # an echo canceller runs: the source must keep its delay steady
        # where submit()'s results go, in order (enhancers.executor.ProcessedChunk: audio, side, bypassed)
        self.on_result: Optional[Callable[[Any], None]] = None
        self.set_stages(stages, options)

    @property
    def stages(self) -> list[str]:
        return list(self._stages)

    @property
    def requested_stages(self) -> list[str]:
        """What was asked for (``stages`` may be lighter: admission control)."""
        return list(self._requested)

    @property
    def degraded_reason(self) -> str:
        """Why ``stages`` is not ``requested_stages``; "" when it is."""
        s = self._executor_stream
        return str(s.degraded_reason) if s is not None else ""

    @property
    def has_stages(self) -> bool:
        """Whether any stage changes this stream's audio (per chunk: no copy)."""
        return bool(self._stages)

    @property
    def latency_samples(self) -> int:
        s = self._executor_stream
        return int(s.latency_samples) if s is not None else 0

    def set_stages(self, stages: Sequence[str],
                   options: Optional[Mapping[str, Mapping[str, Any]]] = None) -> None:
        stages = [s for s in stages if s]
        if options is not None:
            self._options = dict(options)
        if not stages:
            if self._executor_stream is not None:
                self._executor_stream.close()
                self._executor_stream = None
            self._stages, self._requested = [], []
            self.cancels_echo = False
            return
        executor = self._hub.executor
        if executor is None:
            raise RuntimeError("enhancement executor is not running")
        if self._executor_stream is None:
            # its chunks come from the jitter buffer, whose timeline jumps (PublishedStream._on_tick tells them)
            self._executor_stream = executor.open_stream(stages, self._options, label=self._label,
                                                         timeline_jumps=True)
            self._executor_stream.on_change = self._changed
            self._executor_stream.on_result = self._result
        else:
            self._executor_stream.set_stages(stages, self._options)
        self._stages = list(self._executor_stream.stages)
        self._requested = list(getattr(self._executor_stream, "requested_stages", stages))
        self.cancels_echo = any(s.split(":", 1)[0] == "aec" for s in self._stages)

    @property
    def timeline_room(self) -> Optional[int]:
        """Samples the input's timeline may still skip ahead (a jitter buffer's trim): None for any; 0 when an
        echo canceller runs that cannot follow a jump, and what its delay line has left when one can a little."""
        if not self.cancels_echo:
            return None
        s = self._executor_stream
        if s is None or not s.aec_follows_shifts:
            return 0
        room: Optional[int] = s.aec_shift_room
        return room

    def note_input_shift(self, samples: int) -> None:
        """The input's timeline jumped ``samples`` ahead of real time (negative: behind) just before the
        chunk submitted next: the echo canceller moves its delay by as much before that chunk."""
        s = self._executor_stream
        if s is not None:
            s.shift_near(samples)

    def _changed(self, stream: Any) -> None:
        """The executor upgraded this stream's stages."""
        self._stages = list(stream.stages)
        self.cancels_echo = any(s.split(":", 1)[0] == "aec" for s in self._stages)
        if self.on_change is not None:
            self.on_change(self)

    def _result(self, chunk: Any) -> None:
        if self.on_result is not None:
            self.on_result(chunk)

    def submit(self, chunk: np.ndarray, reference: Optional[np.ndarray] = None) -> None:
        """Hand one chunk to the executor (only while ``has_stages``); the result goes to ``on_result``,
        in order, processed or (past the deadline) unprocessed."""
        self._executor_stream.submit(chunk, reference)

    def close(self) -> None:
        if self._executor_stream is not None:
            self._executor_stream.close()
            self._executor_stream = None


class PipelineHub:
    """Owns the shared enhancement executor and opens stream pipelines on it."""

    def __init__(self, executor: Any = None) -> None:
        self.executor = executor

    def open(self, label: str, stages: Sequence[str],
             options: Optional[Mapping[str, Mapping[str, Any]]] = None) -> StreamPipeline:
        return StreamPipeline(self, label, stages, options)

    def stats(self) -> dict[str, Any]:
        if self.executor is None:
            return {"running": False}
        return {"running": True, **self.executor.stats()}
