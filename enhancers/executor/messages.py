"""What moves between the executor's parts: chunks, results, control operations, worker messages.

The loop side submits :class:`PendingChunk` objects and its :class:`ChunkSink` gets a
:class:`ProcessedChunk` back, in order; a tick becomes one :class:`Job` for the worker: control operations first
(streams declared, changed or closed, stages that finished loading), then one
or more *rounds*, each holding at most one chunk per stream, each answered by a
:class:`RoundResult`.

Between the server's process and the worker process (:mod:`enhancers.executor.process`,
:mod:`enhancers.executor.child`) the audio crosses in shared memory
(:mod:`enhancers.executor.shm`) and only the small typed messages at the end of
this module travel, pickled over a local pipe (:mod:`enhancers.executor.transport`):
:class:`AttachArea`, :class:`LoadStage`, :class:`RunJob`, :class:`CloseWorker`
from parent to child; :class:`WorkerReady`, :class:`StageLoadResult`,
:class:`JobDone`, :class:`WorkerClosed` back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from enhancers.stage import Stage


@dataclass(slots=True)
class ProcessedChunk:
    """One processed 10 ms chunk as a stream gets it back."""

    audio: np.ndarray  # [480] float32
    side: dict[str, float]  # per-stream side info of this chunk, e.g. {"vad": 0.93}
    bypassed: bool  # True when it passed through unprocessed (deadline or error)


class ChunkSink(Protocol):
    """Who gets a stream's chunks back, in submission order (:class:`~enhancers.executor.stream.ExecutorStream`)."""

    def _deliver(self, chunk: ProcessedChunk) -> None: ...


class PendingChunk:
    """A submitted chunk on its way through the executor (plain slots: 100s per tick).

    ``answered`` turns True once its result (or its unprocessed fallback, at the deadline)
    went to ``sink``; a result that comes back later is discarded."""

    __slots__ = ("answered", "audio", "bypass_audio", "deadline", "echo_gains", "reference", "sink", "stream_id")

    def __init__(
        self,
        stream_id: int,
        audio: np.ndarray,
        reference: np.ndarray | None,
        sink: ChunkSink,
        deadline: float,
        bypass_audio: np.ndarray,
    ) -> None:
        self.stream_id = stream_id
        self.audio = audio
        self.reference = reference
        self.sink = sink
        self.deadline = deadline
        self.bypass_audio = bypass_audio
        self.answered = False
        self.echo_gains: tuple[float, float] | None = None  # aec streams: the fallback's gains for this chunk


@dataclass(slots=True)
class RoundIn:
    """One round as the batch runner reads it: at most one chunk per stream, rows aligned.

    ``bypass`` is what a row passes through as when it cannot be processed (None: ``audio``
    itself); ``reference`` the far-end audio of aec streams (None: no row has one)."""

    stream_ids: list[int]
    audio: np.ndarray  # [n, 480] float32
    reference: np.ndarray | None = None  # [n, 480] float32
    bypass: np.ndarray | None = None  # [n, 480] float32

    @staticmethod
    def of(items: Sequence[PendingChunk]) -> "RoundIn":
        """The round of ``items`` (the thread worker's: stacked copies of the loop's chunks)."""
        audio = np.stack([it.audio for it in items])
        reference = None
        if any(it.reference is not None for it in items):
            reference = np.zeros_like(audio)
            for i, it in enumerate(items):
                if it.reference is not None:
                    reference[i] = it.reference
        bypass = np.stack([it.bypass_audio for it in items]) if any(
            it.bypass_audio is not it.audio for it in items) else None
        return RoundIn([it.stream_id for it in items], audio, reference, bypass)


@dataclass
class RoundResult:
    """One round's output, row-aligned with its chunks; turned into ProcessedChunks on the loop."""

    audio: np.ndarray  # [n, 480] float32, owned by nobody else
    side: list[dict[str, float]] | None  # per-row side info; None when no stage wrote any
    failed: set[int]  # rows where some stage raised
    passthrough: bool = False  # no stage ran: the rows are the chunks' bypass audio
    timings: list[tuple[str, int, float]] = field(default_factory=list)  # (spec, rows, seconds) per stage call


# -- control operations (applied by the batch runner before a job's rounds) -----------------------
@dataclass
class SetStreamStages:
    """Control op: stream ``stream_id`` now wants ``wanted`` (spec -> per-stream options)."""

    stream_id: int
    wanted: dict[str, dict[str, Any]]


@dataclass
class CloseStream:
    """Control op: stream ``stream_id`` left; its stage states are closed."""

    stream_id: int


@dataclass
class StageLoaded:
    """Control op: the shared instance for ``spec`` is ready (or failed to load)."""

    spec: str
    stage: Stage | None


ControlOp = SetStreamStages | CloseStream | StageLoaded


@dataclass
class Job:
    """Work handed to the worker; filled with results there.

    On the loop's side ``items`` holds the chunks of each round (their sinks get the results);
    ``rounds`` is what the worker runs (built by the worker back end from ``items``)."""

    ops: list[ControlOp]
    rounds: list[RoundIn] = field(default_factory=list)
    items: list[list[PendingChunk]] = field(default_factory=list)
    results: list[RoundResult] = field(default_factory=list)
    abandoned: bool = False
    current_spec: str | None = None
    started: float = 0.0  # monotonic time the executor handed it to the worker
    running_since: float | None = None  # monotonic time a worker thread began running it
    wire_id: int = -1  # its id with a worker process (-1: not sent to one)
    done: asyncio.Future[None] | None = None


# -- messages between the server's process and the worker process ---------------------------------
@dataclass(frozen=True, slots=True)
class WireRound:
    """One round as it crosses the pipe: whose rows; their audio (and, for aec, far-end reference)
    lie in the job's slot of the shared :class:`~enhancers.executor.shm.JobArea`, from row ``offset``."""

    stream_ids: list[int]
    offset: int
    has_reference: bool


@dataclass(frozen=True, slots=True)
class WireResult:
    """One round's result as it crosses the pipe; the audio lies in the slot's output rows from ``offset``."""

    offset: int
    rows: int
    side: list[dict[str, float]] | None
    failed: set[int]
    passthrough: bool
    timings: list[tuple[str, int, float]]


@dataclass(frozen=True, slots=True)
class AttachArea:
    """Parent -> child: the job audio now crosses in shared memory ``name`` (``rows`` per slot and array)."""

    name: str
    rows: int
    slots: int


@dataclass(frozen=True, slots=True)
class LoadStage:
    """Parent -> child: construct stage ``target`` ("module:Class") for ``spec`` on the loader thread."""

    spec: str
    target: str
    kwargs: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RunJob:
    """Parent -> child: apply ``ops``, then run ``rounds`` (audio in slot ``slot``); answered by :class:`JobDone`."""

    job_id: int
    slot: int
    ops: list[ControlOp]
    rounds: list[WireRound]


@dataclass(frozen=True, slots=True)
class CloseWorker:
    """Parent -> child: apply the last ``ops``, close every stream's state, answer :class:`WorkerClosed`."""

    ops: list[ControlOp]


@dataclass(frozen=True, slots=True)
class WorkerReady:
    """Child -> parent, once: imports done, the child reads the pipe."""


@dataclass(frozen=True, slots=True)
class StageLoadResult:
    """Child -> parent: ``spec`` loaded (``latency_samples``) or failed (``error``)."""

    spec: str
    latency_samples: int | None
    error: str | None


@dataclass(frozen=True, slots=True)
class JobDone:
    """Child -> parent: the results of job ``job_id``, counters since the last one, stage stats (at most 2/s)."""

    job_id: int
    results: list[WireResult]
    counters: dict[str, int]
    stage_stats: dict[str, dict[str, Any]] | None


@dataclass(frozen=True, slots=True)
class WorkerClosed:
    """Child -> parent: answer to :class:`CloseWorker`; the child exits."""


ToChild = LoadStage | RunJob | CloseWorker | AttachArea
ToParent = WorkerReady | StageLoadResult | JobDone | WorkerClosed
