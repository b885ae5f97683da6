"""The executor as a service: one process runs the batched stages for many media processes.

``enhancers serve-executor --listen HOST:PORT|unix:PATH`` runs an
``ExecutorService``: media processes (the workers of one server, or the nodes
of a cluster) connect with :class:`~enhancers.executor.remote.RemoteWorker`
over the protocol of :mod:`enhancers.executor.wire` and send each tick's job;
the service gathers the jobs of all its clients that arrive within
``max_wait_ms`` of each other into one batch, so that the streams of every
node share one batched call per stage, runs it on its runner thread
(:class:`~enhancers.executor.batch.BatchRunner`), and answers each client its
rows.  Stage instances are shared by all clients; each client's streams are
its own (a client's stream id ``s`` is ``(client << 32) | s`` here), closed when
it disconnects.  A connection must prove the shared token first; a frame that
breaks the protocol closes that connection only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from enhancers.executor.batch import BatchRunner
from enhancers.executor.loading import StageLoader
from enhancers.executor.messages import CloseStream, ControlOp, Job, RoundIn, SetStreamStages, StageLoaded
from enhancers.executor.wire import (
    CHALLENGE,
    CLOSE_STREAM,
    DECLARE,
    ERROR,
    HELLO,
    JOB,
    LOAD,
    LOADED,
    STATS,
    VERSION,
    WELCOME,
    WireDoneRound,
    WireError,
    Writer,
    decode_job,
    encode_done,
    read_frame,
    verify,
)
from enhancers.executor.worker import COUNTER_KEYS, RateLimitedLog
from enhancers.stage import Stage

log = logging.getLogger("enhancers.executor.service")

STATS_EVERY_S = 0.5


@dataclass
class _Client:
    index: int
    name: str
    writer: asyncio.StreamWriter
    streams: set[int] = field(default_factory=set)
    jobs: int = 0
    rows: int = 0


@dataclass
class _Pending:
    client: _Client
    job_id: int
    rounds: list[Any]
    arrived: float


class ExecutorService:
    """Owns the listening socket, the connected clients, the shared stages and the runner thread."""

    def __init__(self, token: bytes, *, device: str = "cpu", max_wait_ms: float = 2.0, torch_threads: int = 1,
                 stage_options: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        if not token:
            raise ValueError("the executor service needs a token")
        self.token = token
        self.device = torch.device(device)
        self.max_wait_s = max_wait_ms / 1e3
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_KEYS, 0)
        self.runner = BatchRunner(self.device, self.counters, RateLimitedLog())
        self._options: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (stage_options or {}).items()}
        self.loader = StageLoader(self.device, self._options, torch_threads, self._loaded)
        self._clients: dict[int, _Client] = {}
        self._next_client = 1
        self._ops: list[ControlOp] = []
        self._pending: list[_Pending] = []
        self._timer: asyncio.TimerHandle | None = None
        self._running = False
        self._waiting_loads: dict[str, set[int]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: queue.SimpleQueue[tuple[Job, list[_Pending]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._stats_at = 0.0
        self.batches = 0
        self.batched_clients = 0  # sum over batches of the clients whose jobs it held
        self.batched_rows = 0

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self, listen: str) -> str:
        """Listen on ``HOST:PORT`` (port 0: any) or ``unix:PATH``; the address actually bound."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run_jobs, name="executor-service-runner", daemon=True)
        self._thread.start()
        if listen.startswith("unix:"):
            path = listen[5:]
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            self._server = await asyncio.start_unix_server(self._serve, path)
            return listen
        host, _, port = listen.rpartition(":")
        self._server = await asyncio.start_server(self._serve, host or "127.0.0.1", int(port))
        sock = self._server.sockets[0].getsockname()
        return f"{sock[0]}:{sock[1]}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for client in list(self._clients.values()):
            client.writer.close()
        self._jobs.put(None)
        self.loader.shutdown()

    def stats(self) -> dict[str, Any]:
        return {"clients": len(self._clients), "batches": self.batches,
                "avg_clients_per_batch": round(self.batched_clients / self.batches, 3) if self.batches else 0.0,
                "avg_rows_per_batch": round(self.batched_rows / self.batches, 2) if self.batches else 0.0,
                "stages": {spec: rt.stats() for spec, rt in list(self.runner.stages.items())}, **self.counters}

    # -- connections -------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client: _Client | None = None
        try:
            nonce = os.urandom(16)
            writer.write(Writer(CHALLENGE).u16(VERSION).raw(nonce).frame())
            kind, body = await asyncio.wait_for(read_frame(reader), 10.0)
            if kind != HELLO:
                raise WireError("the first frame must be HELLO")
            version, name, mac = body.u16(), body.text(), body.raw(32)
            if version != VERSION:
                writer.write(Writer(ERROR).text("version").text(f"this service speaks version {VERSION}").frame())
                return
            if not verify(self.token, nonce, mac):
                log.warning("executor client %r refused: bad token", name[:64])
                writer.write(Writer(ERROR).text("auth").text("bad token").frame())
                return
            client = _Client(self._next_client, name[:64], writer)
            self._next_client += 1
            self._clients[client.index] = client
            writer.write(Writer(WELCOME).text(str(self.device)).frame())
            log.info("executor client %d (%s) connected", client.index, client.name)
            while True:
                kind, body = await read_frame(reader)
                self._on_frame(client, kind, body)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass
        except WireError as exc:
            log.warning("executor client %s broke the protocol: %s", client.name if client else "?", exc)
        finally:
            if client is not None:
                self._clients.pop(client.index, None)
                for sid in client.streams:
                    self._ops.append(CloseStream(sid))
                log.info("executor client %d (%s) left", client.index, client.name)
            writer.close()

    def _gid(self, client: _Client, sid: int) -> int:
        return (client.index << 32) | (sid & 0xFFFFFFFF)

    def _on_frame(self, client: _Client, kind: int, body: Any) -> None:
        if kind == LOAD:
            spec, options = body.text(), body.obj()
            body.done()
            self._options.setdefault(spec, dict(options or {}))
            stage = self.loader.loaded.get(spec)
            if stage is not None:
                self._send(client, Writer(LOADED).text(spec).i32(int(stage.latency_samples)).text("").frame())
                return
            self._waiting_loads.setdefault(spec, set()).add(client.index)
            assert self._loop is not None
            try:
                self.loader.request(spec, self._loop)
            except Exception as exc:  # noqa: BLE001 - an unknown spec: the client hears why
                self._send(client, Writer(LOADED).text(spec).i32(-1).text(str(exc)[:500]).frame())
        elif kind == DECLARE:
            sid, wanted = body.u32(), body.obj()
            body.done()
            gid = self._gid(client, sid)
            client.streams.add(gid)
            self._ops.append(SetStreamStages(gid, {str(k): dict(v) for k, v in dict(wanted).items()}))
        elif kind == CLOSE_STREAM:
            sid = body.u32()
            body.done()
            gid = self._gid(client, sid)
            client.streams.discard(gid)
            self._ops.append(CloseStream(gid))
        elif kind == JOB:
            job_id, rounds = decode_job(body)
            for r in rounds:
                r.stream_ids = [self._gid(client, s) for s in r.stream_ids]
            self._pending.append(_Pending(client, job_id, rounds, time.monotonic()))
            self._schedule()
        else:
            raise WireError(f"unexpected frame type {kind}")

    def _send(self, client: _Client, frame: bytes) -> None:
        if not client.writer.is_closing():
            client.writer.write(frame)

    def _loaded(self, spec: str, stage: Stage | None) -> None:
        self._ops.append(StageLoaded(spec, stage))
        latency = int(stage.latency_samples) if stage is not None else -1
        error = "" if stage is not None else "the stage failed to load (see the service's log)"
        for index in self._waiting_loads.pop(spec, set()):
            client = self._clients.get(index)
            if client is not None:
                self._send(client, Writer(LOADED).text(spec).i32(latency).text(error).frame())

    # -- batching ------------------------------------------------------------------------------
    def _schedule(self) -> None:
        """Run a batch once every connected client with streams has a job waiting, or ``max_wait_ms`` after
        the first one arrived; one batch at a time."""
        if self._running or not self._pending:
            return
        waiting = {p.client.index for p in self._pending}
        active = {c.index for c in self._clients.values() if c.streams}
        if active <= waiting:
            self._dispatch()
        elif self._timer is None:
            assert self._loop is not None
            self._timer = self._loop.call_later(self.max_wait_s, self._dispatch)

    def _dispatch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._running or not self._pending:
            return
        pending, self._pending = self._pending, []
        merged: list[list[Any]] = []  # round depth -> the wire rounds of every job at that depth
        for p in pending:
            for depth, r in enumerate(p.rounds):
                if depth == len(merged):
                    merged.append([])
                merged[depth].append(r)
        rounds = []
        for parts in merged:
            sids = [s for r in parts for s in r.stream_ids]
            audio = np.concatenate([r.audio for r in parts])
            reference = None
            if any(r.reference is not None for r in parts):
                reference = np.concatenate([r.reference if r.reference is not None else np.zeros_like(r.audio)
                                            for r in parts])
            rounds.append(RoundIn(sids, audio, reference))
        ops, self._ops = self._ops, []
        self._running = True
        self.batches += 1
        self.batched_clients += len({p.client.index for p in pending})
        self.batched_rows += sum(len(r.stream_ids) for r in rounds)
        self._jobs.put((Job(ops=ops, rounds=rounds), pending))

    def _run_jobs(self) -> None:
        """Runner thread: one batch at a time; the results go back to the loop."""
        while True:
            item = self._jobs.get()
            if item is None:
                self.runner.close_all()
                return
            job, pending = item
            try:
                self.runner.run(job)
            except Exception:  # noqa: BLE001 - never die on a batch: its clients' chunks bypass
                log.exception("executor service failed on a batch")
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._finish, job, pending)
            except RuntimeError:
                return

    def _finish(self, job: Job, pending: list[_Pending]) -> None:
        """Split the batch's results back into each client's rows and answer them."""
        self._running = False
        offsets: list[int] = [0] * len(job.rounds)
        for p in pending:
            out: list[WireDoneRound] = []
            for depth, r in enumerate(p.rounds):
                if depth >= len(job.results):
                    break  # a failed batch: the client bypasses what is missing
                res = job.results[depth]
                lo, n = offsets[depth], len(r.stream_ids)
                offsets[depth] = lo + n
                failed = [i - lo for i in res.failed if lo <= i < lo + n]
                side = res.side[lo:lo + n] if res.side else None
                out.append(WireDoneRound(res.audio[lo:lo + n], failed, res.passthrough, side,
                                         [(s, rows, t) for s, rows, t in res.timings]))
            p.client.jobs += 1
            p.client.rows += sum(len(r.stream_ids) for r in p.rounds)
            self._send(p.client, encode_done(p.job_id, out))
        now = time.monotonic()
        if now - self._stats_at >= STATS_EVERY_S:
            self._stats_at = now
            stats = self.stats()
            frame = Writer(STATS).obj({"stages": stats.pop("stages"), "service": stats}).frame()
            for client in self._clients.values():
                self._send(client, frame)
        self._schedule()


async def serve_executor(listen: str, token: bytes, device: str = "cpu", max_wait_ms: float = 2.0,
                         preload: list[str] | None = None) -> None:
    """Run a service until cancelled (the ``enhancers serve-executor`` command)."""
    service = ExecutorService(token, device=device, max_wait_ms=max_wait_ms)
    address = await service.start(listen)
    loop = asyncio.get_running_loop()
    for spec in preload or []:
        service.loader.request(spec, loop)
    print(f"enhancers: executor service on {address} ({service.device})", flush=True)
    try:
        while True:
            await asyncio.sleep(10.0)
            log.info("executor service: %s", {k: v for k, v in service.stats().items() if k != "stages"})
    finally:
        await service.close()
