"""The executor's worker process: loads the stages and runs every batched job it is sent.

Started by :class:`enhancers.executor.process.ProcessWorker` with the
``spawn`` method, so it shares nothing with the server but the pipe
(:class:`~enhancers.executor.transport.Channel`, the typed messages of
:mod:`enhancers.executor.messages`) and the shared
:class:`~enhancers.executor.transport.WorkerStatus` it keeps up to date: the
job and the stage it is running since when (the parent disables a stage that
hangs) and the stage load in progress (a child busy loading is not stuck).
"""

from __future__ import annotations

import concurrent.futures
import gc
import importlib
import logging
import queue
import time
from multiprocessing.connection import Connection
from typing import Any

import torch

from enhancers.compute_threads import limit_compute_threads
from enhancers.executor.batch import BatchRunner
from enhancers.executor.messages import (
    AttachArea,
    CloseWorker,
    Job,
    JobDone,
    LoadStage,
    RoundIn,
    RunJob,
    StageLoaded,
    StageLoadResult,
    WireResult,
    WorkerClosed,
    WorkerReady,
)
from enhancers.executor.shm import JobArea
from enhancers.executor.transport import Channel, WorkerStatus
from enhancers.executor.worker import COUNTER_KEYS, RateLimitedLog
from enhancers.process_name import (
    EXECUTOR_WORKER,
    die_with_parent,
    lower_priority,
    raise_priority,
    set_process_name,
)
from enhancers.stage import Stage

log = logging.getLogger("enhancers.executor")

STATS_EVERY_S = 0.5  # stage timing statistics ride on a "done" message at most this often


def _construct(target: str, device: str, kwargs: dict[str, Any], threads: int) -> Stage:
    limit_compute_threads(threads)
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    stage: Stage = cls(device=device, **kwargs)
    return stage


class ChildWorker:
    """Owns, in the worker process, the stages, the batch runner and the pipe's child end."""

    def __init__(
        self, conn: Connection, device: str, torch_threads: int, freeze_gc: bool, status: WorkerStatus,
        boosted: int = 0,
    ) -> None:
        self.channel = Channel(conn)
        self.device = torch.device(device)
        self.torch_threads = torch_threads
        self.freeze_gc = freeze_gc
        self.status = status
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_KEYS, 0)
        self.runner = BatchRunner(self.device, self.counters, RateLimitedLog(),
                                  reload=self._reload_on_cpu, on_stage=status.set_stage)
        self._targets: dict[str, tuple[str, dict[str, Any]]] = {}
        self._loaded: queue.SimpleQueue[StageLoaded] = queue.SimpleQueue()
        # loading a model is seconds of CPU, not a round with a deadline: at the media process's priority
        self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stage-loader",
                                                             initializer=lower_priority, initargs=(boosted,))
        self._stats_at = 0.0
        self._stats_specs: set[str] = set()
        self.area: JobArea | None = None  # the parent's shared job audio

    def serve(self) -> None:
        limit_compute_threads(self.torch_threads)
        if self.freeze_gc:
            gc.freeze()
        self.channel.send(WorkerReady())
        while True:
            try:
                message = self.channel.recv()
            except (EOFError, OSError):
                return  # the parent went away
            if isinstance(message, AttachArea):
                if self.area is not None:
                    self.area.close()
                self.area = JobArea(message.rows, message.slots, name=message.name)
            elif isinstance(message, LoadStage):
                self._targets[message.spec] = (message.target, message.kwargs)
                self._loader.submit(self._load, message.spec, message.target, message.kwargs, str(self.device))
            elif isinstance(message, RunJob):
                self._job(message)
            elif isinstance(message, CloseWorker):
                self._apply_loaded()
                with torch.inference_mode():
                    for op in message.ops:
                        self.runner.apply(op)
                self.runner.close_all()
                self.channel.send(WorkerClosed())
                return

    def _reload_on_cpu(self, specs: list[str]) -> None:
        """The accelerator was lost: fresh CPU instances of ``specs`` (the runner swaps them in)."""
        for spec in specs:
            if spec in self._targets:
                target, kwargs = self._targets[spec]
                self._loader.submit(self._load, spec, target, kwargs, "cpu", False)

    def _load(self, spec: str, target: str, kwargs: dict[str, Any], device: str, report: bool = True) -> None:
        self.status.begin_load()  # until end_load the parent does not count a slow job as stuck
        try:
            stage = _construct(target, device, kwargs, self.torch_threads)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which logs and raises it
            self.status.end_load()
            self.channel.send(StageLoadResult(spec, None, f"{type(exc).__name__}: {exc}"))
            return
        if self.freeze_gc:
            gc.freeze()
        self.status.end_load()
        self._loaded.put(StageLoaded(spec, stage))
        if report:
            self.channel.send(StageLoadResult(spec, int(stage.latency_samples), None))

    def _apply_loaded(self) -> None:
        while True:
            try:
                op = self._loaded.get_nowait()
            except queue.Empty:
                return
            self.runner.apply(op)

    def _job(self, message: RunJob) -> None:
        self.status.begin_job(message.job_id)  # the parent's stuck clock starts here
        self._apply_loaded()
        area = self.area
        assert area is not None, "the parent attaches the job area before any job"
        inp, ref, out = area.input(message.slot), area.reference(message.slot), area.output(message.slot)
        rounds = []
        for wire in message.rounds:
            rows = slice(wire.offset, wire.offset + len(wire.stream_ids))
            rounds.append(RoundIn(wire.stream_ids, inp[rows], ref[rows] if wire.has_reference else None))
        job = Job(ops=message.ops, rounds=rounds)
        try:
            self.runner.run(job)
        except Exception:  # noqa: BLE001 - never die on a job: unanswered rounds bypass in the parent
            log.exception("executor worker process failed on a job")
        self.status.end_job()
        results = []
        for wire, result in zip(message.rounds, job.results):
            n = len(wire.stream_ids)
            target = out[wire.offset:wire.offset + n]
            if result.audio is not target:
                target[:] = result.audio
            results.append(WireResult(wire.offset, n, result.side, result.failed, result.passthrough,
                                      result.timings))
        counters = {k: v for k, v in self.counters.items() if v}
        for key in counters:
            self.counters[key] = 0
        now = time.monotonic()
        stats = None
        # every STATS_EVERY_S, and at once when a stage was loaded or dropped (the parent's view of what
        # runs here must not lag a restart by a period)
        if now - self._stats_at >= STATS_EVERY_S or set(self.runner.stages) != self._stats_specs:
            self._stats_at = now
            self._stats_specs = set(self.runner.stages)
            stats = {spec: rt.stats() for spec, rt in self.runner.stages.items()}
        self.channel.send(JobDone(message.job_id, results, counters, stats))


def child_main(conn: Connection, device: str, torch_threads: int, freeze_gc: bool, status: WorkerStatus,
               priority_boost: int = 0) -> None:
    """Entry point of the worker process."""
    set_process_name(EXECUTOR_WORKER)
    die_with_parent()  # spawned from the event loop's thread, which lives as long as the media process
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gained = raise_priority(priority_boost)  # before the stages start their threads (they inherit it)
    if gained < priority_boost:
        log.warning("executor worker: nice raised by %d of the %d steps asked (needs CAP_SYS_NICE); a burst of "
                    "the media process's work on a shared core can make rounds miss their deadline",
                    gained, priority_boost)
    ChildWorker(conn, device, torch_threads, freeze_gc, status, gained).serve()
