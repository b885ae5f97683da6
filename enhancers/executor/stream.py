"""A stream's handle on the executor, and the watch that answers late chunks unprocessed."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from enhancers.aec.fallback import EchoGate
from enhancers.executor.loading import options_for
from enhancers.executor.messages import PendingChunk, ProcessedChunk
from enhancers.registry import load_stage_class
from enhancers.stage import CHUNK, NEAR_SHIFT, follow_shift


class StreamOwner(Protocol):
    """What a stream asks of the executor that opened it (:class:`enhancers.executor.core.Executor`)."""

    def _submit(self, stream: ExecutorStream, chunk: np.ndarray, reference: np.ndarray | None) -> None: ...

    def _set_stream_stages(
        self, stream: ExecutorStream, stages: Sequence[str] | str, options: Mapping[str, Mapping[str, Any]] | None
    ) -> None: ...

    def _close_stream(self, stream: ExecutorStream) -> None: ...

    def _retune_stream(self, stream: ExecutorStream, options: Mapping[str, Mapping[str, Any]]) -> None: ...

    async def preload(self, stages: Sequence[str] | str) -> None: ...


class ExecutorStream:
    """One audio stream's view of the executor: its stage list, its pending chunks, where results go.

    Either set ``on_result`` and :meth:`submit` chunks (the media path: each result is handed to
    ``on_result`` on the loop, in submission order, processed or, past the deadline, unprocessed),
    or ``await`` :meth:`process` per chunk (libraries, the CLI); not both on one stream.
    """

    def __init__(self, executor: StreamOwner, stream_id: int, label: str, *, timeline_jumps: bool = False) -> None:
        self._executor = executor
        self.timeline_jumps = timeline_jumps  # its chunks come from a jitter buffer (Executor.open_stream)
        self.stream_id = stream_id
        self.label = label
        self.stages: list[str] = []  # what runs (admission may give less than was asked for)
        self.requested_stages: list[str] = []
        self.degraded_reason = ""  # why ``stages`` is not ``requested_stages`` ("" when it is)
        self.options: Mapping[str, Mapping[str, Any]] | None = None
        self.changed_at = 0.0  # monotonic time ``stages`` last changed (upgrade hysteresis)
        self.on_change: Callable[[ExecutorStream], None] | None = None  # told when an upgrade changes stages
        self.on_result: Callable[[ProcessedChunk], None] | None = None  # results of submit(), in order
        self._waiters: collections.deque[asyncio.Future[ProcessedChunk]] = collections.deque()  # of process()
        self.latency_samples = 0
        self.pending: collections.deque[PendingChunk] = collections.deque()
        self.closed = False
        self._tail = np.zeros(0, dtype=np.float32)  # input delay line for bypassed chunks
        self.echo_gate: EchoGate | None = None  # streams with an aec stage: half-duplex when bypassed
        self.aec_spec: str | None = None
        # the aec stage can be told that the microphone's timeline jumped (option ``near_shift_samples``)
        self.aec_follows_shifts = False
        self.near_shift = 0  # the sum of shift_near(): the aec stage gets it as ``near_shift_samples``
        self._shift_room: tuple[int, int] | None = None  # the aec stage's delay line: (room now, limit)

    def submit(self, chunk: np.ndarray, reference: np.ndarray | None = None) -> None:
        """Hand in one [480] float32 chunk at 48 kHz (``reference``: far-end audio for AEC); its result
        goes to ``on_result`` later.  The arrays are read later by the worker: do not modify them."""
        self._executor._submit(self, chunk, reference)

    async def process(self, chunk: np.ndarray, reference: np.ndarray | None = None) -> ProcessedChunk:
        """Process one [480] float32 chunk at 48 kHz; ``reference``: far-end audio for AEC.

        The arrays are read later by the worker: do not modify them until this returns.
        """
        future: asyncio.Future[ProcessedChunk] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            self._executor._submit(self, chunk, reference)
        except BaseException:
            self._waiters.pop()
            raise
        return await future

    def _deliver(self, chunk: ProcessedChunk) -> None:
        """The executor's answer to the oldest chunk still out (loop thread)."""
        if self.on_result is not None:
            self.on_result(chunk)
        elif self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(chunk)

    def set_stages(
        self, stages: Sequence[str] | str, options: Mapping[str, Mapping[str, Any]] | None = None
    ) -> None:
        """Change the stage list live: removed stages' states close, new ones open fresh.

        Admitted like a new stream (the stream's own current stages do not count against it)."""
        if self.closed:
            raise RuntimeError("stream is closed")
        self._executor._set_stream_stages(self, stages, options)

    def shift_near(self, samples: int) -> None:
        """The microphone's timeline jumped ``samples`` ahead of real time (negative: behind) between the
        chunk submitted last and the next (a jitter buffer skipped or stretched): an aec stage that can
        follow it moves its delay by as much before the chunks submitted from now on (one opened later
        starts from the sum so far: only the jumps after it count).  A no-op for other stages."""
        self.near_shift += int(samples)
        if self.aec_follows_shifts:
            if self._shift_room is not None:
                room, limit = self._shift_room
                self._shift_room = (follow_shift(room, samples, limit), limit)
            self.retune({})

    @property
    def aec_shift_room(self) -> int | None:
        """Samples the microphone's timeline may still jump ahead with the aec stage following it (its
        delay line's room, tracked here as the stage tracks it); None: any jump (or no such stage)."""
        return None if self._shift_room is None else self._shift_room[0]

    def retune(self, options: Mapping[str, Mapping[str, Any]]) -> None:
        """Change live options of running stages (keyed by spec or kind, e.g. ``{"aec": {...}}``),
        their state kept: applied before the chunks submitted from now on.  No admission: the stage
        list stays; an option a stage cannot change live reopens that stage's state."""
        if self.closed:
            raise RuntimeError("stream is closed")
        self._executor._retune_stream(self, options)

    async def wait_ready(self) -> None:
        """Wait until every stage of this stream is loaded; raises if one failed to load."""
        await self._executor.preload(self.stages)

    def bypass_audio(self, chunk: np.ndarray) -> np.ndarray:
        """``chunk`` delayed by the declared latency, so a bypassed chunk stays time-aligned."""
        delay = self.latency_samples
        if delay == 0:
            return chunk
        tail = self._tail
        if len(tail) != delay:
            tail = tail[-delay:] if len(tail) > delay else np.pad(tail, (delay - len(tail), 0))
        full = np.concatenate((tail, chunk))
        self._tail = full[CHUNK:]
        return full[:CHUNK]

    def track_aec(self, specs: Sequence[str]) -> None:
        """The stage list changed: an echo gate for streams with an aec stage (unprocessed chunks of theirs
        must not carry raw echo, :mod:`enhancers.aec.fallback`)."""
        aec = [s for s in specs if s.split(":", 1)[0] == "aec"]
        spec = aec[0] if aec else None
        if spec != self.aec_spec:  # a new aec stage opens with its delay line's full room
            self._shift_room = _delay_line_room(spec) if spec is not None else None
        self.aec_spec = spec
        # a canceller that follows only within a delay line gets one where jumps come (it costs it echoes
        # shorter than the line)
        self.aec_follows_shifts = spec is not None and _follows_shifts(spec) and (
            self.timeline_jumps or self._shift_room is None)
        if not aec:
            self.echo_gate = None
        elif self.echo_gate is None:
            self.echo_gate = EchoGate()

    def stage_options(self, options: Mapping[str, Mapping[str, Any]] | None, spec: str) -> dict[str, Any]:
        """What stage ``spec`` of this stream is opened (or retuned) with: ``options`` for it, and for an
        aec stage that follows timeline jumps, the shift so far (its baseline when it opens)."""
        own = options_for(options, spec)
        if spec == self.aec_spec and self.aec_follows_shifts:
            own[NEAR_SHIFT] = self.near_shift
        return own

    def fallback_audio(
        self, chunk: np.ndarray, reference: np.ndarray | None
    ) -> tuple[np.ndarray, tuple[float, float] | None]:
        """What goes out if ``chunk`` is not processed: delayed by the declared latency, and echo-gated
        for aec streams (with the gate's gains for this chunk; None when it lets it through)."""
        bypass = self.bypass_audio(chunk) if self.latency_samples else chunk
        gate = self.echo_gate
        if gate is None:
            return bypass, None
        bypass = gate.apply(bypass, reference)
        return bypass, (gate.last_gains if gate.last_gains != (1.0, 1.0) else None)

    def without_aec(
        self, audio: np.ndarray, gains: tuple[float, float], available: Callable[[str], bool]
    ) -> np.ndarray:
        """A processed chunk, echo-gated when the aec stage did not run in the worker (loading, failed,
        waiting out a fault backoff)."""
        if self.aec_spec is None or self.echo_gate is None or available(self.aec_spec):
            return audio
        return self.echo_gate.scale(audio, *gains)

    def close(self) -> None:
        """Leave the executor; chunks still pending come back unprocessed.  Idempotent."""
        if not self.closed:
            self.closed = True
            self._executor._close_stream(self)


def _follows_shifts(spec: str) -> bool:
    """Whether stage ``spec`` takes ``near_shift_samples`` live (False when its class cannot be loaded:
    the worker reports that load's failure)."""
    try:
        return NEAR_SHIFT in load_stage_class(spec).live_options
    except Exception:  # noqa: BLE001 - any import error of the stage's module
        return False


def _delay_line_room(spec: str) -> tuple[int, int] | None:
    """The room stage ``spec`` has for jumps of the microphone's timeline ahead (None: any, or it cannot load)."""
    try:
        return load_stage_class(spec).shift_room
    except Exception:  # noqa: BLE001 - any import error of the stage's module
        return None


class DeadlineWatch:
    """Owns the chunks not yet answered, in submission order, and one timer for all of them.

    Every chunk gets the same deadline after submission, so deadlines are FIFO:
    the timer only ever waits for the oldest one; answered chunks are dropped
    lazily when they reach the front.  ``on_expired`` runs for each chunk whose
    deadline passed unanswered.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_expired: Callable[[PendingChunk], None]) -> None:
        self._loop = loop
        self._on_expired = on_expired
        self._items: collections.deque[PendingChunk] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, item: PendingChunk) -> None:
        self._items.append(item)
        if self._timer is None:
            self._timer = self._loop.call_at(item.deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self._loop.time()
        items = self._items
        while items:
            item = items[0]
            if item.answered:
                items.popleft()
            elif item.deadline <= now:
                items.popleft()
                self._on_expired(item)
            else:
                self._timer = self._loop.call_at(item.deadline, self._expire)
                break

    def close(self) -> Iterator[PendingChunk]:
        """Stop the timer; yield every chunk still unanswered."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items, self._items = self._items, collections.deque()
        return (item for item in items if not item.answered)
