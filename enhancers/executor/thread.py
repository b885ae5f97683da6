"""The executor's in-process worker: stages run on one thread of the server's own process.

This is the light back end (no second process, stages shared with the
caller): the default for libraries, the CLI and tests.  Its cost is the GIL:
a stage whose time goes into many small torch calls holds the interpreter
lock for most of it, and the event loop (RTP, Opus, signaling) waits.  The
server therefore runs :mod:`enhancers.executor.process` by default.
"""

from __future__ import annotations

import asyncio
import gc
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from enhancers.compute_threads import limit_compute_threads
from enhancers.executor.batch import BatchRunner
from enhancers.executor.loading import StageLoader
from enhancers.executor.messages import CloseStream, ControlOp, Job, RoundIn, SetStreamStages, StageLoaded
from enhancers.executor.recovery import StageFaults
from enhancers.executor.worker import RateLimitedLog, WorkerSettings
from enhancers.stage import Stage


class ThreadWorker:
    """Owns the loader, the :class:`BatchRunner` and the worker thread that runs jobs on it (a ``Worker``)."""

    def __init__(self, settings: WorkerSettings, counters: dict[str, int], errors: RateLimitedLog) -> None:
        self.settings = settings
        self.errors = errors
        self.runner = BatchRunner(settings.device, counters, errors, self._reload_on_cpu)
        self.loader = StageLoader(settings.device, settings.stage_options, settings.torch_threads, self._loaded)
        self._loaded_ops: list[ControlOp] = []
        self._declared: list[ControlOp] = []  # stream changes for the next job
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finish: Callable[[Job], None] | None = None
        self._on_loaded: Callable[[str, bool], None] | None = None
        self.faults = StageFaults(settings.recovery)  # stages that hung: retried after a backoff
        self._timers: set[asyncio.TimerHandle] = set()

    @property
    def device(self) -> torch.device:
        """Where the stages run: the configured device, the CPU after the accelerator failed."""
        return self.runner.device

    @property
    def pid(self) -> int | None:
        return None

    def _reload_on_cpu(self, specs: list[str]) -> None:
        """Worker thread, accelerator lost: build fresh CPU instances of ``specs`` (their move failed)."""
        self.loader.device = torch.device("cpu")
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.loader.reload, specs, self._loop)

    # -- lifecycle ----------------------------------------------------------------
    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        finish: Callable[[Job], None],
        on_loaded: Callable[[str, bool], None],
    ) -> None:
        self._loop, self._finish, self._on_loaded = loop, finish, on_loaded
        self._start_thread()

    async def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._jobs.put(Job(ops=self._take_loaded() + self._take_declared(), rounds=[]))
            self._jobs.put(None)
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 5.0)
        self.loader.shutdown()

    # -- stages ---------------------------------------------------------------------
    def request_load(self, spec: str) -> None:
        assert self._loop is not None
        self.loader.request(spec, self._loop)

    async def wait_loaded(self, spec: str) -> None:
        await self.loader.wait(spec)

    def declared_latency(self, spec: str) -> int:
        return self.loader.declared_latency(spec)

    def _loaded(self, spec: str, stage: Stage | None) -> None:
        self._loaded_ops.append(StageLoaded(spec, stage))
        if stage is not None and self.settings.freeze_gc:
            gc.freeze()  # the stage's (long-lived) objects out of the full collections too
        if self._on_loaded is not None:
            self._on_loaded(spec, stage is not None)

    def _take_loaded(self) -> list[ControlOp]:
        ops, self._loaded_ops = self._loaded_ops, []
        return ops

    # -- streams ------------------------------------------------------------------------
    def declare_stream(self, stream_id: int, wanted: dict[str, dict[str, Any]]) -> None:
        self._declared.append(SetStreamStages(stream_id, wanted))

    def close_stream(self, stream_id: int) -> None:
        self._declared.append(CloseStream(stream_id))

    def _take_declared(self) -> list[ControlOp]:
        ops, self._declared = self._declared, []
        return ops

    def stage_stats(self) -> dict[str, dict[str, Any]]:
        stats = {spec: rt.stats() for spec, rt in list(self.runner.stages.items())}
        for spec in self.faults.specs():
            stats.setdefault(spec, {}).update(self.faults.describe(spec))
        return stats

    def stage_available(self, spec: str) -> bool:
        """``spec`` is loaded and runs (not disabled)."""
        runtime = self.runner.stages.get(spec)
        return runtime is not None and not runtime.disabled

    def worker_stats(self) -> dict[str, Any]:
        return {"state": "running" if self._thread is not None else "not started"}

    # -- jobs ---------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        job.ops[:0] = self._take_loaded() + self._take_declared()
        job.rounds = [RoundIn.of(items) for items in job.items]
        self._jobs.put(job)

    def busy_since(self, job: Job) -> float | None:
        """From when the thread began ``job`` (or it was submitted), and the last load ended; None while
        a load runs (it shares the interpreter with the worker thread)."""
        clock = self.loader.clock
        if clock.loading(time.monotonic(), self.settings.load_timeout_s):
            return None
        running = job.running_since
        return max(running if running is not None else job.started, clock.ended)

    def abandon(self, job: Job) -> str | None:
        """``job`` hung in a stage: disable that stage, leave the thread, start a fresh one; the stage is
        loaded fresh after its backoff (the hung instance stays with the thread it holds)."""
        spec = job.current_spec
        runtime = self.runner.stages.get(spec) if spec else None
        if runtime is not None and spec is not None:
            runtime.disabled = True
            self.runner.counters["stage_faults"] = self.runner.counters.get("stage_faults", 0) + 1
            delay = self.faults.fault(spec, "hung")
            if delay is not None and self._loop is not None:
                timer: asyncio.TimerHandle | None = None

                def reenable() -> None:
                    self._timers.discard(timer)  # type: ignore[arg-type]
                    if self.faults.enable(spec) and self._loop is not None:
                        self.runner.counters["stage_recoveries"] = self.runner.counters.get("stage_recoveries", 0) + 1
                        self.loader.reload([spec], self._loop)

                timer = self._loop.call_later(delay, reenable)
                self._timers.add(timer)
        self._start_thread()
        return spec

    def _start_thread(self) -> None:
        self._jobs = queue.Queue()
        self._thread = threading.Thread(
            target=self._main, args=(self._jobs,), name="executor-worker", daemon=True
        )
        self._thread.start()

    def _main(self, jobs: queue.Queue[Job | None]) -> None:
        limit_compute_threads(self.settings.torch_threads)
        loop, finish = self._loop, self._finish
        assert loop is not None and finish is not None
        while True:
            job = jobs.get()
            if job is None:
                self.runner.close_all()
                return
            job.running_since = time.monotonic()
            try:
                self.runner.run(job)
            except Exception as exc:  # noqa: BLE001 - the worker must never die; unanswered chunks bypass
                self.errors.error("worker", "executor worker failed on a job", exc)
            if job.abandoned:
                return  # this thread was replaced while a stage hung
            try:
                loop.call_soon_threadsafe(finish, job)
            except RuntimeError:
                return  # loop closed
