"""The executor's remote back end: stages run in an executor service, with a local fallback.

``RemoteWorker`` is a :class:`~enhancers.executor.worker.Worker` whose jobs go
over :mod:`enhancers.executor.wire` to an :mod:`enhancers.executor.service`
(another process on this machine, or a GPU host shared by a cluster).  It
keeps what the service must know (requested stages, every stream's stages)
and tells it again after a reconnect.  While the service is unreachable
(refused, closed, or not answering a job within the executor's
``stuck_after_ms``) the executor's deadline answers chunks unprocessed at
first, and a local :class:`~enhancers.executor.process.ProcessWorker` is
started as a fallback and takes the jobs as soon as it is ready; the service
is retried with a backoff (0.5 s doubling to 10 s) and takes the jobs back
when it answers again.  Stage states start afresh on every switch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from enhancers.executor.messages import Job, RoundResult
from enhancers.executor.process import ProcessWorker
from enhancers.executor.wire import (
    CHALLENGE,
    CLOSE_STREAM,
    DECLARE,
    DONE,
    ERROR,
    HELLO,
    LOAD,
    LOADED,
    STATS,
    VERSION,
    WELCOME,
    WireError,
    WireJobRound,
    Writer,
    decode_done,
    encode_job,
    proof,
    read_frame,
)
from enhancers.executor.worker import RateLimitedLog, WorkerSettings
from enhancers.registry import load_stage_class

log = logging.getLogger("enhancers.executor")

RETRY_MIN_S, RETRY_MAX_S = 0.5, 10.0
CONNECT_TIMEOUT_S = 3.0


class RemoteWorker:
    """Owns the connection to an executor service, what it was told, and the local fallback (a ``Worker``)."""

    def __init__(self, settings: WorkerSettings, counters: dict[str, int], errors: RateLimitedLog, *,
                 address: str, token: bytes, name: str = "mediaserver", fallback: bool = True) -> None:
        self.settings = settings
        self.counters = counters
        self.errors = errors
        self.address = address
        self.token = token
        self.name = name
        self.use_fallback = fallback
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finish: Callable[[Job], None] | None = None
        self._on_loaded: Callable[[str, bool], None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._connected = False
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._loads: dict[str, asyncio.Future[int]] = {}
        self._latency: dict[str, int] = {}
        self._remote_loaded: set[str] = set()
        self._wanted: dict[int, dict[str, dict[str, Any]]] = {}
        self._jobs: dict[int, Job] = {}
        self._next_job = 0
        self._stats: dict[str, dict[str, Any]] = {}
        self._fallback: ProcessWorker | None = None
        self._fallback_jobs: set[int] = set()  # id() of jobs the fallback runs
        self.remote_device = ""
        self.service_stats: dict[str, Any] = {}  # the service's own figures (batches, clients per batch ...)
        self.connects = 0
        self.disconnects = 0
        self.fallback_starts = 0

    # -- Worker: lifecycle -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.settings.device

    @property
    def pid(self) -> int | None:
        return self._fallback.pid if self._fallback is not None else None

    def start(self, loop: asyncio.AbstractEventLoop, finish: Callable[[Job], None],
              on_loaded: Callable[[str, bool], None]) -> None:
        self._loop, self._finish, self._on_loaded = loop, finish, on_loaded
        self._task = loop.create_task(self._keep_connected(), name="executor-remote")

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._drop_connection()
        if self._fallback is not None:
            await self._fallback.close()
            self._fallback = None

    # -- the connection ------------------------------------------------------------------------------
    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.address.startswith("unix:"):
            return await asyncio.open_unix_connection(self.address[5:])
        host, _, port = self.address.rpartition(":")
        return await asyncio.open_connection(host, int(port))

    async def _keep_connected(self) -> None:
        delay = RETRY_MIN_S
        while not self._closed:
            try:
                reader, writer = await asyncio.wait_for(self._handshake(), CONNECT_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, WireError, PermissionError) as exc:
                self.errors.error("remote-connect", f"executor service {self.address} unreachable ({exc}); "
                                                    f"retrying in {delay:.1f} s")
                self._start_fallback()
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)
                continue
            delay = RETRY_MIN_S
            self._attached(writer)
            try:
                await self._read(reader)
            except (OSError, asyncio.IncompleteReadError, WireError) as exc:
                if not self._closed:
                    log.warning("executor service %s: connection lost (%s)", self.address, exc)
            self._lost()

    async def _handshake(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await self._open()
        try:
            kind, body = await read_frame(reader)
            if kind != CHALLENGE:
                raise WireError("expected CHALLENGE")
            version, nonce = body.u16(), body.raw(16)
            if version != VERSION:
                raise WireError(f"the service speaks version {version}, this client {VERSION}")
            writer.write(Writer(HELLO).u16(VERSION).text(self.name).raw(proof(self.token, nonce)).frame())
            kind, body = await read_frame(reader)
            if kind == ERROR:
                code, message = body.text(), body.text()
                raise PermissionError(f"{code}: {message}")
            if kind != WELCOME:
                raise WireError("expected WELCOME")
            self.remote_device = body.text()
            return reader, writer
        except BaseException:
            writer.close()
            raise

    def _attached(self, writer: asyncio.StreamWriter) -> None:
        """Connected: tell the service every stage asked for and every stream; jobs go there from now."""
        self._writer, self._connected = writer, True
        self.connects += 1
        self._remote_loaded = set()
        log.info("executor service %s connected (%s)", self.address, self.remote_device)
        for spec in self._loads:
            self._send(Writer(LOAD).text(spec).obj(_options(self.settings, spec)).frame())
        for sid, wanted in self._wanted.items():
            self._send(Writer(DECLARE).u32(sid).obj(wanted).frame())

    def _lost(self) -> None:
        self._drop_connection()
        self.disconnects += 1
        jobs, self._jobs = self._jobs, {}
        for job in jobs.values():
            job.results = []  # every chunk of it is answered unprocessed
            self._complete(job)
        self._start_fallback()

    def _drop_connection(self) -> None:
        self._connected = False
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _send(self, frame: bytes) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(frame)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            kind, body = await read_frame(reader)
            if kind == DONE:
                job_id, rounds = decode_done(body)
                job = self._jobs.pop(job_id, None)
                if job is not None:
                    job.results = [RoundResult(r.audio, r.side, set(r.failed), r.passthrough, r.timings)
                                   for r in rounds]
                    self._complete(job)
            elif kind == LOADED:
                spec, latency, error = body.text(), body.i32(), body.text()
                self._loaded(spec, None if error else latency, error)
            elif kind == STATS:
                stats = body.obj()
                if isinstance(stats, dict):
                    self._stats = dict(stats.get("stages") or {})
                    self.service_stats = dict(stats.get("service") or {})
            else:
                raise WireError(f"unexpected frame type {kind}")

    def _loaded(self, spec: str, latency: int | None, error: str) -> None:
        future = self._loads.get(spec)
        if latency is not None:
            self._remote_loaded.add(spec)
            self._latency[spec] = latency
            if future is not None and not future.done():
                future.set_result(latency)
        else:
            log.error("stage %r failed to load in the executor service: %s", spec, error)
            if future is not None and not future.done():
                future.set_exception(RuntimeError(f"stage {spec!r} failed to load: {error}"))
                future.exception()
        if self._on_loaded is not None:
            self._on_loaded(spec, latency is not None)

    def _complete(self, job: Job) -> None:
        if self._finish is not None:
            self._finish(job)

    # -- the local fallback ----------------------------------------------------------------------------
    def _start_fallback(self) -> None:
        if not self.use_fallback or self._fallback is not None or self._closed or self._loop is None:
            return
        self.fallback_starts += 1
        log.warning("executor service %s unavailable: stages run in a local worker process meanwhile", self.address)
        worker = ProcessWorker(self.settings, self.counters, self.errors)
        worker.start(self._loop, self._finish_fallback, self._fallback_loaded)
        for spec in self._loads:
            worker.request_load(spec)
        for sid, wanted in self._wanted.items():
            worker.declare_stream(sid, wanted)
        self._fallback = worker

    def _finish_fallback(self, job: Job) -> None:
        self._fallback_jobs.discard(id(job))
        self._complete(job)

    def _fallback_loaded(self, spec: str, ok: bool) -> None:
        future = self._loads.get(spec)
        if ok and self._fallback is not None:
            self._latency.setdefault(spec, self._fallback.declared_latency(spec))
            if future is not None and not future.done():
                future.set_result(self._latency[spec])
        if self._on_loaded is not None:
            self._on_loaded(spec, ok)

    def _retire_fallback(self) -> None:
        """The service is back and takes this job: the local worker process goes (no job of its is out)."""
        worker, self._fallback = self._fallback, None
        if worker is not None and self._loop is not None:
            log.info("executor service %s back: the local fallback worker stops", self.address)
            self._loop.create_task(worker.close())

    # -- Worker: stages and streams ------------------------------------------------------------------
    def request_load(self, spec: str) -> None:
        if spec in self._loads:
            return
        assert self._loop is not None
        self._loads[spec] = self._loop.create_future()
        if self._connected:
            self._send(Writer(LOAD).text(spec).obj(_options(self.settings, spec)).frame())
        if self._fallback is not None:
            self._fallback.request_load(spec)

    async def wait_loaded(self, spec: str) -> None:
        await asyncio.shield(self._loads[spec])

    def declared_latency(self, spec: str) -> int:
        if spec in self._latency:
            return self._latency[spec]
        try:
            return int(load_stage_class(spec).latency_samples)
        except Exception:  # noqa: BLE001 - unloadable: the load reports why
            return 0

    def declare_stream(self, stream_id: int, wanted: dict[str, dict[str, Any]]) -> None:
        self._wanted[stream_id] = wanted
        if self._connected:
            self._send(Writer(DECLARE).u32(stream_id).obj(wanted).frame())
        if self._fallback is not None:
            self._fallback.declare_stream(stream_id, wanted)

    def close_stream(self, stream_id: int) -> None:
        self._wanted.pop(stream_id, None)
        if self._connected:
            self._send(Writer(CLOSE_STREAM).u32(stream_id).frame())
        if self._fallback is not None:
            self._fallback.close_stream(stream_id)

    # -- Worker: jobs ----------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        if self._connected and self._writer is not None:
            if self._fallback is not None:
                self._retire_fallback()
            job_id = self._next_job
            self._next_job = (self._next_job + 1) & 0xFFFFFFFF
            rounds = []
            for items in job.items:
                audio = np.stack([it.audio for it in items])
                reference = None
                if any(it.reference is not None for it in items):
                    reference = np.stack([it.reference if it.reference is not None else np.zeros_like(it.audio)
                                          for it in items])
                rounds.append(WireJobRound([it.stream_id for it in items], audio, reference))
            job.wire_id = job_id
            self._jobs[job_id] = job
            self._send(encode_job(job_id, rounds))
            return
        if self._fallback is not None:
            self._fallback_jobs.add(id(job))
            self._fallback.submit(job)
            return
        job.results = [RoundResult(np.stack([it.bypass_audio for it in items]).astype(np.float32, copy=False),
                                   None, set(range(len(items))), passthrough=True) for items in job.items]
        self.counters["stage_unavailable"] = self.counters.get("stage_unavailable", 0) + sum(
            len(items) for items in job.items)
        assert self._loop is not None
        self._loop.call_soon(self._complete, job)

    def busy_since(self, job: Job) -> float | None:
        if id(job) in self._fallback_jobs and self._fallback is not None:
            return self._fallback.busy_since(job)
        return job.started

    def abandon(self, job: Job) -> str | None:
        """A job the service did not answer in time: the connection is dropped (the fallback takes over,
        the service is tried again); a fallback job: the fallback's own recovery."""
        if id(job) in self._fallback_jobs and self._fallback is not None:
            self._fallback_jobs.discard(id(job))
            return self._fallback.abandon(job)
        self._jobs.pop(job.wire_id, None)
        log.error("executor service %s did not answer a job in time; reconnecting", self.address)
        self._drop_connection()  # the reader ends, _lost runs, the loop reconnects
        return None

    # -- Worker: introspection -------------------------------------------------------------------------
    def stage_available(self, spec: str) -> bool:
        if self._connected:
            return spec in self._remote_loaded
        return self._fallback is not None and self._fallback.stage_available(spec)

    def stage_stats(self) -> dict[str, dict[str, Any]]:
        if not self._connected and self._fallback is not None:
            return self._fallback.stage_stats()
        return {spec: dict(s) for spec, s in self._stats.items()}

    def worker_stats(self) -> dict[str, Any]:
        state = "remote" if self._connected else "fallback" if self._fallback is not None else "connecting"
        return {"state": state, "address": self.address, "remote_device": self.remote_device,
                "service": self.service_stats,
                "connects": self.connects, "disconnects": self.disconnects, "fallback_starts": self.fallback_starts,
                "fallback": self._fallback.worker_stats() if self._fallback is not None else None}


def _options(settings: WorkerSettings, spec: str) -> dict[str, Any]:
    from enhancers.executor.loading import options_for

    return options_for(settings.stage_options, spec)

