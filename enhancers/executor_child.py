"""The executor's worker process: loads the stages and runs every batched job it is sent.

Started by :class:`enhancers.executor_process.ProcessWorker` with the
``spawn`` method, so it shares nothing with the server but the pipe and a
small shared buffer naming the stage it is running (read by the parent to
disable a stage that hangs).  Messages, all pickled tuples:

parent -> child
    ``("load", spec, target, kwargs)``: construct stage ``target``
    ("module:Class") for ``spec`` on a loader thread; ``("job", job_id, ops,
    rounds)`` with ``rounds`` a list of ``(stream_ids, audio [n, 480],
    reference [n, 480] | None)``; ``("close", ops)``.
child -> parent
    ``("ready",)`` once, when it reads the pipe; ``("loaded", spec, latency_samples | None, error | None)``;
    ``("done", job_id, results, counters, stage_stats | None)``;
    ``("closed",)``.
"""

from __future__ import annotations

import concurrent.futures
import gc
import importlib
import logging
import queue
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from enhancers.executor_worker import COUNTER_KEYS, BatchRunner, Job, RateLimitedLog, StageLoaded
from enhancers.stage import Stage

log = logging.getLogger("enhancers.executor")

SPEC_BYTES = 64  # size of the shared buffer naming the running stage
STATS_EVERY_S = 0.5  # stage timing statistics ride on a "done" message at most this often


class ChildChunk:
    """A chunk as the worker process sees it: no future, only the audio and whose it is."""

    __slots__ = ("audio", "bypass_audio", "reference", "stream_id")

    def __init__(self, stream_id: int, audio: np.ndarray, reference: np.ndarray | None) -> None:
        self.stream_id = stream_id
        self.audio = audio
        self.reference = reference
        self.bypass_audio = audio


def _construct(target: str, device: str, kwargs: dict[str, Any], threads: int) -> Stage:
    torch.set_num_threads(threads)
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    stage: Stage = cls(device=device, **kwargs)
    return stage


class ChildWorker:
    """Owns, in the worker process, the stages, the batch runner and the pipe's child end."""

    def __init__(
        self, conn: Connection, device: str, torch_threads: int, freeze_gc: bool, running: Any
    ) -> None:
        self.conn = conn
        self.device = torch.device(device)
        self.torch_threads = torch_threads
        self.freeze_gc = freeze_gc
        self.running = running  # multiprocessing.Array('c', SPEC_BYTES), lock-free
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_KEYS, 0)
        self.runner = BatchRunner(self.device, self.counters, RateLimitedLog(),
                                  reload=self._reload_on_cpu, on_stage=self._on_stage)
        self._targets: dict[str, tuple[str, dict[str, Any]]] = {}
        self._loaded: queue.SimpleQueue[StageLoaded] = queue.SimpleQueue()
        self._send_lock = threading.Lock()
        self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stage-loader")
        self._stats_at = 0.0

    def send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self.conn.send(message)

    def _on_stage(self, spec: str | None) -> None:
        self.running.raw = (spec or "").encode()[: SPEC_BYTES - 1].ljust(SPEC_BYTES, b"\0")

    def serve(self) -> None:
        torch.set_num_threads(self.torch_threads)
        if self.freeze_gc:
            gc.freeze()
        self.send(("ready",))
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                return  # the parent went away
            kind = message[0]
            if kind == "load":
                spec, target, kwargs = message[1:]
                self._targets[spec] = (target, kwargs)
                self._loader.submit(self._load, spec, target, kwargs, str(self.device))
            elif kind == "job":
                self._job(message[1], message[2], message[3])
            elif kind == "close":
                self._apply_loaded()
                with torch.inference_mode():
                    for op in message[1]:
                        self.runner.apply(op)
                self.runner.close_all()
                self.send(("closed",))
                return

    def _reload_on_cpu(self, specs: list[str]) -> None:
        """The accelerator was lost: fresh CPU instances of ``specs`` (the runner swaps them in)."""
        for spec in specs:
            if spec in self._targets:
                target, kwargs = self._targets[spec]
                self._loader.submit(self._load, spec, target, kwargs, "cpu", False)

    def _load(self, spec: str, target: str, kwargs: dict[str, Any], device: str, report: bool = True) -> None:
        try:
            stage = _construct(target, device, kwargs, self.torch_threads)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which logs and raises it
            self.send(("loaded", spec, None, f"{type(exc).__name__}: {exc}"))
            return
        if self.freeze_gc:
            gc.freeze()
        self._loaded.put(StageLoaded(spec, stage))
        if report:
            self.send(("loaded", spec, int(stage.latency_samples), None))

    def _apply_loaded(self) -> None:
        while True:
            try:
                op = self._loaded.get_nowait()
            except queue.Empty:
                return
            self.runner.apply(op)

    def _job(self, job_id: int, ops: list[Any], rounds: Sequence[tuple[Any, ...]]) -> None:
        self._apply_loaded()
        chunks: list[list[Any]] = []
        for sids, audio, reference in rounds:
            chunks.append([
                ChildChunk(sid, audio[i], None if reference is None else reference[i])
                for i, sid in enumerate(sids)
            ])
        job = Job(ops=ops, rounds=chunks)
        try:
            self.runner.run(job)
        except Exception:  # noqa: BLE001 - never die on a job: unanswered rounds bypass in the parent
            log.exception("executor worker process failed on a job")
        self._on_stage(None)  # between jobs no stage runs: a hang or a death now is not a stage's fault
        counters = {k: v for k, v in self.counters.items() if v}
        for key in counters:
            self.counters[key] = 0
        now = time.monotonic()
        stats = None
        if now - self._stats_at >= STATS_EVERY_S:
            self._stats_at = now
            stats = {spec: rt.stats() for spec, rt in self.runner.stages.items()}
        self.send(("done", job_id, job.results, counters, stats))


def child_main(conn: Connection, device: str, torch_threads: int, freeze_gc: bool, running: Any) -> None:
    """Entry point of the worker process."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ChildWorker(conn, device, torch_threads, freeze_gc, running).serve()
