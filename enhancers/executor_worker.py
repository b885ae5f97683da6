"""The worker side of the executor: stage instances, per-stream handles, batched runs.

Everything here runs on the executor's single worker thread, so stage state is
only ever touched by one thread.  The asyncio side (``enhancers.executor``)
hands over :class:`Job` objects: control operations first (streams opened,
changed or closed, stages that finished loading), then one or more *rounds*,
each holding at most one chunk per stream.  A round runs every stage once,
batched over the rows of the streams that enabled it, in canonical order.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from enhancers.executor_device import fall_back_to_cpu, is_device_error, move_to_cpu
from enhancers.executor_recovery import RecoveryPolicy
from enhancers.registry import CHAIN_ORDER
from enhancers.stage import CHUNK, BatchContext, Stage, StageStream

log = logging.getLogger("enhancers.executor")

COUNTER_KEYS = (
    "chunks",  # chunks submitted
    "batches",  # batched rounds run by the worker (one per tick, more when catching up)
    "stage_calls",  # Stage.process calls
    "bypass_deadline",  # chunks answered unprocessed because the deadline passed
    "bypass_error",  # stream-chunks that skipped a stage because it raised
    "stage_unavailable",  # stream-chunks that skipped a stage still loading, failed or disabled
    "late_discarded",  # results that came back after their chunk was already bypassed
    "dropped_backlog",  # late chunks never run: more than max_backlog_chunks were waiting
    "stuck_restarts",  # worker threads abandoned because a stage hung
    "worker_restarts",  # worker processes started again because the last one died
    "stage_faults",  # stages that hung or crashed the worker (each is disabled for a backoff)
    "stage_recoveries",  # stages loaded again after their backoff
    "device_fallbacks",  # the accelerator failed: every stage moved (or reloaded) to the CPU
)


@dataclass(slots=True)
class ProcessedChunk:
    """One processed 10 ms chunk as a stream gets it back."""

    audio: np.ndarray  # [480] float32
    side: dict[str, float]  # per-stream side info of this chunk, e.g. {"vad": 0.93}
    bypassed: bool  # True when it passed through unprocessed (deadline or error)


class PendingChunk:
    """A submitted chunk on its way through the executor (plain slots: 100s per tick)."""

    __slots__ = ("audio", "bypass_audio", "deadline", "echo_gains", "future", "reference", "stream_id")

    def __init__(
        self,
        stream_id: int,
        audio: np.ndarray,
        reference: np.ndarray | None,
        future: asyncio.Future[ProcessedChunk],
        deadline: float,
        bypass_audio: np.ndarray,
    ) -> None:
        self.stream_id = stream_id
        self.audio = audio
        self.reference = reference
        self.future = future
        self.deadline = deadline
        self.bypass_audio = bypass_audio
        self.echo_gains: tuple[float, float] | None = None  # aec streams: the fallback's gains for this chunk


class ChunkIn(Protocol):
    """What the batch runner reads of a chunk (a :class:`PendingChunk`, or its copy in a worker process)."""

    stream_id: int
    audio: np.ndarray
    reference: np.ndarray | None
    bypass_audio: np.ndarray


@dataclass(frozen=True)
class WorkerSettings:
    """What either worker backend (thread or process) needs to load and run stages."""

    device: torch.device
    stage_options: Mapping[str, Mapping[str, Any]]
    torch_threads: int
    freeze_gc: bool
    recovery: RecoveryPolicy = RecoveryPolicy()  # when a hung or crashed stage is tried again


@dataclass
class RoundResult:
    """One round's output, row-aligned with its chunks; turned into ProcessedChunks on the loop."""

    audio: np.ndarray  # [n, 480] float32, owned by nobody else
    side: list[dict[str, float]] | None  # per-row side info; None when no stage wrote any
    failed: set[int]  # rows where some stage raised
    passthrough: bool = False  # no stage ran: the rows are the chunks' bypass audio
    timings: list[tuple[str, int, float]] = field(default_factory=list)  # (spec, rows, seconds) per stage call


@dataclass
class SetStreamStages:
    """Control op: stream ``stream_id`` now wants ``wanted`` (spec -> per-stream options)."""

    stream_id: int
    wanted: dict[str, dict[str, Any]]


@dataclass
class CloseStream:
    stream_id: int


@dataclass
class StageLoaded:
    """Control op: the shared instance for ``spec`` is ready (or failed to load)."""

    spec: str
    stage: Stage | None


ControlOp = SetStreamStages | CloseStream | StageLoaded


@dataclass
class Job:
    """Work handed to the worker thread; filled with results there."""

    ops: list[ControlOp]
    rounds: Sequence[Sequence[ChunkIn]]
    results: list[RoundResult] = field(default_factory=list)
    abandoned: bool = False
    current_spec: str | None = None
    started: float = 0.0
    done: asyncio.Future[None] | None = None


class StageRuntime:
    """Worker-side record of one shared stage instance and its timings."""

    def __init__(self, spec: str, stage: Stage) -> None:
        self.spec = spec
        self.stage = stage
        kind = spec.split(":", 1)[0]
        self.order = (CHAIN_ORDER.index(kind), spec)
        self.disabled = False
        self.calls = 0
        self.rows = 0
        self.errors = 0
        self.total_s = 0.0
        self.last_s = 0.0

    def stats(self) -> dict[str, Any]:
        avg = self.total_s / self.calls if self.calls else 0.0
        return {
            "calls": self.calls,
            "rows": self.rows,
            "errors": self.errors,
            "last_ms": round(self.last_s * 1e3, 4),
            "avg_ms": round(avg * 1e3, 4),
            "avg_batch": round(self.rows / self.calls, 2) if self.calls else 0.0,
            "disabled": self.disabled,
            "latency_samples": int(self.stage.latency_samples),
        }


@dataclass
class _Step:
    runtime: StageRuntime
    rows: list[int] | None  # None: every row of the round
    index: torch.Tensor | None
    handles: list[StageStream]


@dataclass
class _Plan:
    steps: list[_Step]
    unavailable_rows: int  # rows that want a stage with no handle (loading / failed / disabled)


class RateLimitedLog:
    """Logs an error at most once per ``every_s`` per key, counting what it held back."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def error(self, key: str, message: str, exc: BaseException | None = None) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -math.inf) < self.every_s:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        self._last[key] = now
        suffix = f" ({held} more since last report)" if held else ""
        log.error("%s%s", message, suffix, exc_info=exc)


class BatchRunner:
    """Owns the stage instances and every stream's stage handles (worker thread only).

    When a round fails with an accelerator error (``is_device_error``) the
    runner falls back to the CPU once: batches are built on the CPU from then
    on and every stage is moved there in place, keeping each stream's state;
    a stage whose move fails (the device no longer answers) is disabled and
    ``reload(specs)`` asks for fresh CPU instances, swapped in as they load.
    """

    def __init__(self, device: torch.device, counters: dict[str, int], errors: RateLimitedLog,
                 reload: Callable[[list[str]], None] | None = None,
                 on_stage: Callable[[str | None], None] | None = None) -> None:
        self.device = device
        self.on_stage = on_stage  # told which stage is about to run (None: between stages)
        self.counters = counters
        self.errors = errors
        self.reload = reload
        self.fell_back = False
        self.stages: dict[str, StageRuntime] = {}
        self.wanted: dict[int, dict[str, dict[str, Any]]] = {}
        self.handles: dict[int, dict[str, StageStream]] = {}
        self._plans: dict[tuple[int, ...], _Plan] = {}
        self._sync = device.type == "cuda"
        self._on_device = device.type != "cpu"

    def use_device(self, device: torch.device) -> None:
        """Build batches on ``device`` from the next round on."""
        self.device = device
        self._sync, self._on_device = device.type == "cuda", device.type != "cpu"
        self._plans.clear()  # their row indices live on the old device

    # -- control operations ------------------------------------------------
    def apply(self, op: ControlOp) -> None:
        self._plans.clear()
        if isinstance(op, SetStreamStages):
            self._set_stages(op.stream_id, op.wanted)
        elif isinstance(op, CloseStream):
            for spec, handle in self.handles.pop(op.stream_id, {}).items():
                self._close_handle(spec, handle)
            self.wanted.pop(op.stream_id, None)
        elif op.stage is not None:
            if self.fell_back and not move_to_cpu(self, op.spec, op.stage, []):
                return  # loaded on the lost device before the fallback: a CPU instance is on its way
            if op.spec in self.stages:  # a CPU instance replacing one lost with its device: fresh states
                for own in self.handles.values():
                    own.pop(op.spec, None)
            self.stages[op.spec] = StageRuntime(op.spec, op.stage)
            for sid, wanted in self.wanted.items():
                if op.spec in wanted and op.spec not in self.handles[sid]:
                    self._open_handle(sid, op.spec, wanted[op.spec])

    def _set_stages(self, sid: int, wanted: dict[str, dict[str, Any]]) -> None:
        current = self.handles.setdefault(sid, {})
        before = self.wanted.get(sid, {})
        for spec in list(current):
            if spec not in wanted or wanted[spec] != before.get(spec):
                self._close_handle(spec, current.pop(spec))
        self.wanted[sid] = wanted
        for spec, options in wanted.items():
            if spec not in current:
                self._open_handle(sid, spec, options)

    def _open_handle(self, sid: int, spec: str, options: dict[str, Any]) -> None:
        runtime = self.stages.get(spec)
        if runtime is None or runtime.disabled:
            return
        try:
            self.handles[sid][spec] = runtime.stage.stream(**options)
        except Exception as exc:  # noqa: BLE001 - fail open: the stream runs without this stage
            self.errors.error(f"open:{spec}", f"stage {spec!r} failed to open a stream", exc)

    def _close_handle(self, spec: str, handle: StageStream) -> None:
        runtime = self.stages.get(spec)
        if runtime is not None and runtime.disabled:
            return  # a hung stage: leave its state alone
        try:
            handle.close()
        except Exception as exc:  # noqa: BLE001 - a failing close must not stop the others
            self.errors.error(f"close:{spec}", f"stage {spec!r} failed to close a stream", exc)

    def close_all(self) -> None:
        for sid in list(self.handles):
            self.apply(CloseStream(sid))

    # -- processing ----------------------------------------------------------
    def run(self, job: Job) -> None:
        with torch.inference_mode():
            for op in job.ops:
                self.apply(op)
            for items in job.rounds:
                if job.abandoned:
                    return
                try:
                    results = self._run_round(job, items)
                except Exception as exc:
                    if self.fell_back or not is_device_error(exc):
                        raise
                    job.current_spec = None
                    fall_back_to_cpu(self, exc)
                    # this round's chunks pass through unprocessed; the next ones run on the CPU
                    self.counters["bypass_error"] += len(items)
                    audio = np.stack([it.bypass_audio for it in items]).astype(np.float32, copy=False)
                    results = RoundResult(audio, None, set(range(len(items))))
                if results is None:
                    return
                job.results.append(results)

    def _plan(self, sids: tuple[int, ...]) -> _Plan:
        plan = self._plans.get(sids)
        if plan is not None:
            return plan
        rows: dict[str, list[int]] = {}
        handles: dict[str, list[StageStream]] = {}
        unavailable = 0
        for i, sid in enumerate(sids):
            own = self.handles.get(sid, {})
            unavailable += len(self.wanted.get(sid, {})) - len(own)
            for spec, handle in own.items():
                rows.setdefault(spec, []).append(i)
                handles.setdefault(spec, []).append(handle)
        steps = []
        for spec in sorted(rows, key=lambda s: self.stages[s].order):
            spec_rows = rows[spec]
            if len(spec_rows) == len(sids):
                steps.append(_Step(self.stages[spec], None, None, handles[spec]))
            else:
                index = torch.tensor(spec_rows, dtype=torch.long, device=self.device)
                steps.append(_Step(self.stages[spec], spec_rows, index, handles[spec]))
        plan = _Plan(steps, unavailable)
        if len(self._plans) >= 32:
            self._plans.clear()
        self._plans[sids] = plan
        return plan

    def _run_round(self, job: Job, items: Sequence[ChunkIn]) -> RoundResult | None:
        n = len(items)
        plan = self._plan(tuple(it.stream_id for it in items))
        self.counters["batches"] += 1
        batch = np.concatenate([it.audio for it in items]).reshape(n, CHUNK)
        x = torch.from_numpy(batch)
        if self._on_device:
            x = x.to(self.device)
        refs = [it.reference for it in items]
        if any(ref is not None for ref in refs):
            ref_np = np.zeros((n, CHUNK), dtype=np.float32)
            for i, ref in enumerate(refs):
                if ref is not None:
                    ref_np[i] = ref
            reference = torch.from_numpy(ref_np)
            if self._on_device:
                reference = reference.to(self.device)
        else:
            reference = torch.zeros((n, CHUNK), dtype=torch.float32, device=self.device)
        failed: set[int] = set()
        sides: list[tuple[str, list[int] | None, torch.Tensor]] = []
        timings: list[tuple[str, int, float]] = []
        unavailable = plan.unavailable_rows
        for step in plan.steps:
            if job.abandoned:
                return None
            runtime = step.runtime
            if runtime.disabled:
                unavailable += len(step.handles)
                continue
            if step.index is None:
                sub, sub_ref = x, reference
            else:
                sub, sub_ref = x.index_select(0, step.index), reference.index_select(0, step.index)
            ctx = BatchContext(reference=sub_ref)
            job.current_spec = runtime.spec
            if self.on_stage is not None:
                self.on_stage(runtime.spec)
            start = time.perf_counter()
            try:
                y = runtime.stage.process(sub, step.handles, ctx)
                if y.shape != sub.shape:
                    raise ValueError(f"returned shape {tuple(y.shape)} for input {tuple(sub.shape)}")
                if self._sync:
                    torch.cuda.synchronize(self.device)
            except Exception as exc:  # noqa: BLE001 - fail open: these rows keep their input
                runtime.errors += 1
                if not self.fell_back and is_device_error(exc):
                    raise  # the device failed, not the stage: run() falls back to the cpu
                self.counters["bypass_error"] += len(step.handles)
                failed.update(step.rows if step.rows is not None else range(n))
                self.errors.error(f"process:{runtime.spec}", f"stage {runtime.spec!r} raised", exc)
                continue
            finally:
                elapsed = time.perf_counter() - start
                runtime.calls += 1
                runtime.rows += len(step.handles)
                runtime.total_s += elapsed
                runtime.last_s = elapsed
                timings.append((runtime.spec, len(step.handles), elapsed))
                self.counters["stage_calls"] += 1
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
            x = y if step.index is None else x.index_copy(0, step.index, y)
            for key, value in ctx.side.items():
                sides.append((key, step.rows, value))
        job.current_spec = None
        if self.on_stage is not None:
            self.on_stage(None)
        if unavailable:
            self.counters["stage_unavailable"] += unavailable
        if self._on_device or x.dtype != torch.float32:
            x = x.to("cpu", torch.float32)
        out = x.detach().numpy()
        if x.data_ptr() != batch.ctypes.data:  # a stage's tensor: it may alias the stage's state
            out = out.copy()
        return RoundResult(out, _side_rows(n, sides) if sides else None, failed, timings=timings)


def _side_rows(n: int, sides: list[tuple[str, list[int] | None, torch.Tensor]]) -> list[dict[str, float]]:
    """Turn per-stage ``[rows]`` side tensors into one ``{key: value}`` dict per row."""
    if not sides:
        return []
    per_row: list[dict[str, float]] = [{} for _ in range(n)]
    for key, rows, value in sides:
        values = value.detach().to("cpu", torch.float32).reshape(-1).tolist()
        targets = rows if rows is not None else range(n)
        for row, v in zip(targets, values):
            per_row[row][key] = v
    return per_row
