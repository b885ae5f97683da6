"""The executor's worker in a process of its own: stages never hold the server's GIL.

Most of a stage's time at small batches goes into dispatching many small
torch operations, which holds the interpreter lock: on a thread of the
server's process that starves the event loop (RTP, Opus, signaling) and the
loop in turn delays the worker into missed deadlines.  ``ProcessWorker``
runs the same :class:`~enhancers.executor.batch.BatchRunner` in a child
process (:mod:`enhancers.executor.child`) and talks to it through
:mod:`enhancers.executor.transport` (a pipe of typed messages read by the
event loop, and a shared status block); this module owns the child's life.

The child is started on the first stage request, so a server with no
enhancement never starts it.  A child that hangs (a stage that never
returns, or the whole process stopped) is killed; a child that dies is
started again after a backoff (:class:`~enhancers.executor.recovery.RestartBackoff`:
1, 2, 4 ... s, at most 60 s).  The stage that was running at the time (the
parent reads it from the shared status) takes the fault: it is disabled for its
own backoff, then loaded fresh into the current child, and after too many
faults disabled for good (:class:`~enhancers.executor.recovery.StageFaults`).
A job counts as hung only from when the child began running it, and not
while the child loads a stage (``load_timeout_s`` at most): loading a model
on a busy core starves the child, which is then slow, not stuck.
Every live stream is re-declared to a new child with its stages, which
start from fresh state, and audio keeps flowing unprocessed meanwhile (the
executor's deadline).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from enhancers.executor.child import child_main
from enhancers.executor.loading import options_for
from enhancers.executor.messages import (
    AttachArea,
    CloseStream,
    CloseWorker,
    ControlOp,
    Job,
    JobDone,
    LoadStage,
    RoundResult,
    RunJob,
    SetStreamStages,
    StageLoadResult,
    ToParent,
    WireResult,
    WireRound,
    WorkerClosed,
    WorkerReady,
)
from enhancers.executor.recovery import RestartBackoff, StageFaults
from enhancers.executor.shm import JobArea
from enhancers.executor.transport import ParentChannel, WorkerStatus, open_pipe
from enhancers.executor.worker import RateLimitedLog, WorkerSettings
from enhancers.registry import STAGES, load_stage_class

log = logging.getLogger("enhancers.executor")

STOP_TIMEOUT_S = 5.0
AREA_ROWS = 256  # rows per job slot to start with (grown, doubling, when a job needs more)
AREA_SLOTS = 2  # one job is out at a time; a second slot so the next job never writes into one being read


class ProcessWorker:
    """Owns the worker process's life (spawn, restart backoff, kill), the loads asked of it and the streams
    declared to it (a ``Worker``)."""

    def __init__(self, settings: WorkerSettings, counters: dict[str, int], errors: RateLimitedLog) -> None:
        self.settings = settings
        self.device = settings.device
        self.counters = counters
        self.errors = errors
        self._ctx = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._conn: ParentChannel | None = None
        self._status: WorkerStatus | None = None  # shared with the child: what it is running since when
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finish: Callable[[Job], None] | None = None
        self._on_loaded: Callable[[str, bool], None] | None = None
        self._loads: dict[str, asyncio.Future[int]] = {}
        self._latency: dict[str, int] = {}
        self.faults = StageFaults(settings.recovery)  # stages disabled after hanging or crashing the child
        self._restarts = RestartBackoff(settings.recovery)
        self._restart_timer: asyncio.TimerHandle | None = None  # a child start waiting out its backoff
        self._timers: set[asyncio.TimerHandle] = set()  # stages waiting out their backoff
        self._sent_loads: set[str] = set()  # specs asked of the current child
        self._child_loaded: set[str] = set()  # specs the current child reported loaded
        self._last_exit: int | None = None
        self._wanted: dict[int, dict[str, dict[str, Any]]] = {}  # streams as declared to the child
        self._redeclare = False
        self._unsent: list[ControlOp] = []
        self._declared: list[ControlOp] = []  # stream changes for the next job
        self._jobs: dict[int, Job] = {}
        self._next_job = 0
        self._stats: dict[str, dict[str, Any]] = {}
        self._closing: asyncio.Future[None] | None = None
        self._ready = False  # the child has started (imports done) and reads the pipe
        self._area: JobArea | None = None  # the shared memory job audio crosses in

    # -- lifecycle ------------------------------------------------------------------
    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        finish: Callable[[Job], None],
        on_loaded: Callable[[str, bool], None],
    ) -> None:
        self._loop, self._finish, self._on_loaded = loop, finish, on_loaded

    def _spawn(self) -> None:
        assert self._loop is not None
        parent, child = open_pipe(self._ctx)
        self._status = WorkerStatus(self._ctx)
        if self._area is None:
            self._area = JobArea(AREA_ROWS, AREA_SLOTS)
        process = self._ctx.Process(
            target=child_main,
            args=(child, str(self.device), self.settings.torch_threads, self.settings.freeze_gc, self._status,
                  self.settings.priority_boost),
            name="enhancers-worker",
            daemon=True,
        )
        process.start()
        child.close()
        self._process, self._conn, self._ready = process, parent, False
        parent.attach(self._loop, self._handle, self._child_died)
        parent.send(AttachArea(self._area.name, self._area.rows, self._area.slots))
        log.info("executor worker process %d started on %s", process.pid, self.device)
        self._sent_loads, self._child_loaded = set(), set()
        for spec in self._loads:
            if not self.faults.disabled(spec):
                self._send_load(spec)
        self._redeclare = bool(self._wanted)
        self._unsent = []

    def _ensure_child(self) -> None:
        if self._process is None and self._closing is None and self._restart_timer is None:
            self._spawn()

    def _restart_later(self) -> None:
        """Start a new child after the backoff of this death (never at once: no restart storm)."""
        assert self._loop is not None
        if self._closing is not None or self._restart_timer is not None:
            return
        delay = self._restarts.next_delay()
        log.warning("executor worker process starts again in %.1f s (%d deaths or hangs in %.0f s)",
                    delay, self._restarts.recent, self.settings.recovery.fault_window_s)
        self._restart_timer = self._loop.call_later(delay, self._restart)

    def _restart(self) -> None:
        self._restart_timer = None
        if self._closing is None and self._process is None:
            self._spawn()

    def _stage_fault(self, spec: str, reason: str) -> None:
        """``spec`` hung or crashed the child: disabled for its backoff (or for good), then tried again."""
        assert self._loop is not None
        self.counters["stage_faults"] = self.counters.get("stage_faults", 0) + 1
        delay = self.faults.fault(spec, reason)
        if delay is None:
            log.error("stage %r %s; it stays disabled until the server restarts (%s)", spec, reason,
                      self.faults.describe(spec).get("disabled_reason"))
            return
        log.error("stage %r %s; disabled for %.1f s, then loaded again", spec, reason, delay)
        timer: asyncio.TimerHandle | None = None

        def reenable() -> None:
            self._timers.discard(timer)  # type: ignore[arg-type]
            self._reenable(spec)

        timer = self._loop.call_later(delay, reenable)
        self._timers.add(timer)

    def _reenable(self, spec: str) -> None:
        if self._closing is not None or not self.faults.enable(spec):
            return
        self.counters["stage_recoveries"] = self.counters.get("stage_recoveries", 0) + 1
        log.info("stage %r enabled again after its backoff", spec)
        if self._conn is not None and spec in self._loads and spec not in self._sent_loads:
            self._send_load(spec)  # a child that is down loads it when it starts (_spawn)

    def _stop_child(self, kill: bool) -> None:
        process, conn = self._process, self._conn
        self._process = self._conn = None
        self._ready, self._child_loaded = False, set()
        if conn is not None:
            conn.close()
        if process is not None:
            if kill:
                process.kill()
            process.join(0.5 if kill else STOP_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join(1.0)
            self._last_exit = process.exitcode

    async def close(self) -> None:
        if self._loop is None:
            return
        self._closing = self._loop.create_future()
        for timer in [self._restart_timer, *self._timers]:
            if timer is not None:
                timer.cancel()
        self._restart_timer, self._timers = None, set()
        if self._conn is None:
            return
        try:
            self._conn.send(CloseWorker(self._take_declared()))
            await asyncio.wait_for(asyncio.shield(self._closing), STOP_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("executor worker process did not close cleanly: %s", exc)
        await self._loop.run_in_executor(None, self._stop_child, False)
        if self._area is not None:
            self._area.close()
            self._area = None

    # -- stages -------------------------------------------------------------------------
    def request_load(self, spec: str) -> None:
        if spec in self._loads:
            return
        assert self._loop is not None
        self._loads[spec] = self._loop.create_future()
        self._ensure_child()
        if self._process is not None and not self.faults.disabled(spec):
            self._send_load(spec)

    def _send_load(self, spec: str) -> None:
        assert self._conn is not None
        self._sent_loads.add(spec)
        self._conn.send(LoadStage(spec, STAGES[spec], options_for(self.settings.stage_options, spec)))

    async def wait_loaded(self, spec: str) -> None:
        await asyncio.shield(self._loads[spec])

    def declared_latency(self, spec: str) -> int:
        if spec in self._latency:
            return self._latency[spec]
        try:
            return int(load_stage_class(spec).latency_samples)
        except Exception:  # noqa: BLE001 - unloadable: the load itself will report why
            return 0

    @property
    def pid(self) -> int | None:
        """The worker process's id (None before the first stage request)."""
        return int(self._process.pid) if self._process is not None else None

    def stage_stats(self) -> dict[str, dict[str, Any]]:
        stats = {spec: dict(s) for spec, s in self._stats.items()}
        for spec in self.faults.specs():
            stats.setdefault(spec, {}).update(self.faults.describe(spec))
        return stats

    def stage_available(self, spec: str) -> bool:
        """``spec`` runs in the current child: loaded there, and not disabled."""
        return self._ready and spec in self._child_loaded and not self.faults.disabled(spec)

    def worker_stats(self) -> dict[str, Any]:
        """The child's state for /healthz: running, waiting out a restart backoff, or not needed yet."""
        state = ("closed" if self._closing is not None else "restarting" if self._restart_timer is not None
                 else "not started" if self._process is None else "running" if self._ready else "starting")
        return {"state": state, "pid": self.pid, "recent_restarts": self._restarts.recent,
                "last_exit_code": self._last_exit, "priority_boost": self.priority_boost()}

    def priority_boost(self) -> int | None:
        """How many nice steps the running child is ahead of this process (None: no child, or not Linux)."""
        pid = self.pid
        if pid is None or self._closing is not None or not hasattr(os, "getpriority"):
            return None
        try:
            return os.getpriority(os.PRIO_PROCESS, 0) - os.getpriority(os.PRIO_PROCESS, pid)
        except OSError:
            return None

    # -- streams and jobs ---------------------------------------------------------------------
    def declare_stream(self, stream_id: int, wanted: dict[str, dict[str, Any]]) -> None:
        self._declared.append(SetStreamStages(stream_id, wanted))

    def close_stream(self, stream_id: int) -> None:
        self._declared.append(CloseStream(stream_id))

    def _take_declared(self) -> list[ControlOp]:
        ops, self._declared = self._declared, []
        return ops

    def submit(self, job: Job) -> None:
        self._ensure_child()
        job.ops[:0] = self._take_declared()
        for op in job.ops:
            if isinstance(op, SetStreamStages):
                self._wanted[op.stream_id] = op.wanted
            elif isinstance(op, CloseStream):
                self._wanted.pop(op.stream_id, None)
        ops: list[ControlOp] = self._unsent + list(job.ops)
        self._unsent = []
        if self._redeclare:  # a new child: every live stream again, before this job's changes
            self._redeclare = False
            ops[:0] = [SetStreamStages(sid, wanted) for sid, wanted in self._wanted.items()]
        if self._conn is None or not self._ready:
            # no worker (starting, restarting): the chunks pass through as on a missed deadline (delayed by
            # the declared latency, echo-gated for aec streams), counted as unavailable
            self._unsent = ops  # declared to the child once it is ready
            job.results = [RoundResult(np.stack([it.bypass_audio for it in items]).astype(np.float32, copy=False),
                                       None, set(range(len(items))), passthrough=True) for items in job.items]
            self.counters["stage_unavailable"] += sum(len(items) for items in job.items)
            self._loop.call_soon(self._complete, job)  # type: ignore[union-attr]
            return
        job_id = self._next_job
        self._next_job += 1
        try:
            rounds, slot = self._write_rows(job, job_id)
        except OSError as exc:  # no shared memory for a bigger area: this job passes through
            self.errors.error("worker", "executor job area could not grow", exc)
            self._unsent = ops
            job.results = []
            self._loop.call_soon(self._complete, job)  # type: ignore[union-attr]
            return
        self._jobs[job_id] = job
        job.wire_id = job_id
        try:
            self._conn.send(RunJob(job_id, slot, ops, rounds))
        except OSError as exc:
            self.errors.error("worker", "executor worker process unreachable", exc)
            self._child_died()

    def _write_rows(self, job: Job, job_id: int) -> tuple[list[WireRound], int]:
        """Copy ``job``'s chunks into its slot of the shared area (grown first when too small)."""
        total = sum(len(items) for items in job.items)
        area = self._area
        assert area is not None and self._conn is not None
        if total > area.rows:
            rows = area.rows
            while rows < total:
                rows *= 2
            bigger = JobArea(rows, area.slots)
            self._conn.send(AttachArea(bigger.name, bigger.rows, bigger.slots))  # ahead of the job, same pipe
            area.close()  # the child keeps its mapping until it has attached the new one
            self._area = area = bigger
        slot = job_id % area.slots
        inp, ref = area.input(slot), area.reference(slot)
        rounds = []
        offset = 0
        for items in job.items:
            n = len(items)
            has_reference = False
            for i, it in enumerate(items):
                inp[offset + i] = it.audio
                if it.reference is not None:
                    has_reference = True
            if has_reference:
                for i, it in enumerate(items):
                    if it.reference is not None:
                        ref[offset + i] = it.reference
                    else:
                        ref[offset + i] = 0.0
            rounds.append(WireRound([it.stream_id for it in items], offset, has_reference))
            offset += n
        return rounds, slot

    def _running_spec(self) -> str:
        return self._status.running_spec() if self._status is not None else ""

    def busy_since(self, job: Job) -> float | None:
        """From when the child began ``job`` (or it was sent: a child that never takes it is stuck too), and
        the last load ended; None while the child loads a stage (loading starves it; not stuck)."""
        status = self._status
        if status is None or job.wire_id < 0:
            return job.started
        if status.loading(time.monotonic(), self.settings.load_timeout_s):
            return None
        started = status.job_started(job.wire_id)
        return max(started if started is not None else job.started, status.load_ended)

    def abandon(self, job: Job) -> str | None:
        """``job`` hung (a stage never returned, or the child is stopped): kill the child, put the stage
        it was in (if any) on its backoff, start a fresh child after the restart backoff."""
        spec = self._running_spec()
        jobs, self._jobs = self._jobs, {}
        self._stop_child(kill=True)
        for other in jobs.values():
            if other is not job:
                other.results = []
                self._complete(other)
        if spec:
            self._stage_fault(spec, f"hung (no answer for {time.monotonic() - job.started:.1f} s)")
        self._restart_later()
        return spec or None

    # -- messages from the child -------------------------------------------------------------
    def _handle(self, message: ToParent) -> None:
        if isinstance(message, WorkerReady):
            self._ready = True
        elif isinstance(message, JobDone):
            for key, value in message.counters.items():
                self.counters[key] = self.counters.get(key, 0) + value
            if message.stage_stats is not None:
                self._stats = message.stage_stats
            job = self._jobs.pop(message.job_id, None)
            if job is not None:
                job.results = self._read_rows(message.job_id, message.results)
                self._complete(job)
        elif isinstance(message, StageLoadResult):
            spec, error = message.spec, message.error
            future = self._loads.get(spec)
            if error is not None:
                log.error("stage %r failed to load: %s", spec, error)
                if future is not None and not future.done():
                    future.set_exception(RuntimeError(f"stage {spec!r} failed to load: {error}"))
                    future.exception()  # retrieved: a failed load is also reported via on_loaded
            else:
                latency = int(message.latency_samples or 0)
                self._latency[spec] = latency
                self._child_loaded.add(spec)
                if future is not None and not future.done():
                    future.set_result(latency)
            if self._on_loaded is not None:
                self._on_loaded(spec, error is None)
        elif isinstance(message, WorkerClosed) and self._closing is not None and not self._closing.done():
            self._closing.set_result(None)

    def _read_rows(self, job_id: int, results: list[WireResult]) -> list[RoundResult]:
        """The rounds' results: side info from the message, audio from the slot's output rows (copied
        once: the slot is written again two jobs later)."""
        area = self._area
        if area is None or not results:
            return []
        end = max(r.offset + r.rows for r in results)
        out = area.output(job_id % area.slots)[:end].copy()
        return [RoundResult(out[r.offset:r.offset + r.rows], r.side, r.failed, r.passthrough, r.timings)
                for r in results]

    def _complete(self, job: Job) -> None:
        if self._finish is not None:
            self._finish(job)

    def _child_died(self) -> None:
        if self._closing is not None:
            if not self._closing.done():
                self._closing.set_result(None)
            return
        if self._process is None:
            return  # already handled (a send and the reader can both notice one death)
        spec = self._running_spec()
        jobs, self._jobs = self._jobs, {}
        self._stop_child(kill=True)
        code = self._last_exit
        log.error("executor worker process died (exit code %s) while running stage %r", code, spec or None)
        self.counters["worker_restarts"] = self.counters.get("worker_restarts", 0) + 1
        for job in jobs.values():
            job.results = []
            self._complete(job)  # no results: every chunk of it bypasses
        if spec:
            self._stage_fault(spec, f"crashed the worker process (exit code {code})")
        self._restart_later()
