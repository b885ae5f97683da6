"""The executor's worker back end, named: what the loop side asks of it, and what it needs.

:class:`Worker` is the interface the executor (:mod:`enhancers.executor.core`)
drives; :class:`~enhancers.executor.thread.ThreadWorker` (stages on a thread of
this process) and :class:`~enhancers.executor.process.ProcessWorker` (stages in
a worker process of their own) implement it.  Streams are declared to the
worker and closed through it; their changes reach the stages ahead of the next
job's rounds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from enhancers.executor.messages import Job
from enhancers.executor.recovery import RecoveryPolicy

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


@dataclass(frozen=True)
class WorkerSettings:
    """What either worker backend (thread or process) needs to load and run stages."""

    device: torch.device
    stage_options: Mapping[str, Mapping[str, Any]]
    torch_threads: int
    freeze_gc: bool
    recovery: RecoveryPolicy = RecoveryPolicy()  # when a hung or crashed stage is tried again
    # while a stage loads, a job that does not finish is not stuck (loading starves the worker) for this long
    load_timeout_s: float = 120.0
    # a worker process runs this many nice steps ahead of the process that feeds it (ExecutorConfig)
    priority_boost: int = 0


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


class Worker(Protocol):
    """A worker back end: owns the stage instances and runs the executor's jobs on them.

    Loop thread only.  ``start`` wires it to the loop: ``finish(job)`` is called
    on the loop when a submitted job has its results (none: every chunk of it
    passes through), ``on_loaded(spec, ok)`` when a requested load finished.
    """

    @property
    def device(self) -> torch.device:
        """Where the stages run (the CPU after the accelerator failed)."""

    @property
    def pid(self) -> int | None:
        """The worker process's id (None for a thread, or before a process is started)."""

    def start(self, loop: asyncio.AbstractEventLoop, finish: Callable[[Job], None],
              on_loaded: Callable[[str, bool], None]) -> None:
        """Attach to the running loop (a worker process starts on the first stage request)."""

    async def close(self) -> None:
        """Apply the last stream changes, close every stage state, stop."""

    def request_load(self, spec: str) -> None:
        """Load the shared instance of ``spec`` unless it is loading or loaded (off the loop)."""

    async def wait_loaded(self, spec: str) -> None:
        """Until ``spec`` (requested) is loaded; raises if its load failed."""

    def declared_latency(self, spec: str) -> int:
        """``latency_samples`` of ``spec``: of the loaded instance, else of its class."""

    def declare_stream(self, stream_id: int, wanted: dict[str, dict[str, Any]]) -> None:
        """Stream ``stream_id`` now runs ``wanted`` (spec -> options), from the next job on."""

    def close_stream(self, stream_id: int) -> None:
        """Stream ``stream_id`` left: its stage states are closed with the next job."""

    def submit(self, job: Job) -> None:
        """Run ``job`` (with the stream changes declared since the last one); ``finish`` gets it back."""

    def busy_since(self, job: Job) -> float | None:
        """Monotonic time from which ``job`` counts as running (stuck after ``stuck_after_ms``);
        None while the worker is loading a stage (at most ``load_timeout_s``): not stuck yet."""

    def abandon(self, job: Job) -> str | None:
        """``job`` hung: replace the worker, put the stage it hung in (returned) on its backoff."""

    def stage_available(self, spec: str) -> bool:
        """``spec`` runs now: loaded, and not disabled."""

    def stage_stats(self) -> dict[str, dict[str, Any]]:
        """Per-stage timings and fault state, for ``Executor.stats()``."""

    def worker_stats(self) -> dict[str, Any]:
        """The worker's own state (running, restarting ...), for /healthz."""
