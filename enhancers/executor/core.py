"""The batched enhancement executor: one engine that runs every stage for all streams.

Streams submit 10 ms chunks with :meth:`ExecutorStream.submit` (results go to the stream's
``on_result``, in order, on the loop: no future or task per chunk) or await :meth:`ExecutorStream.process`.  A tick task on the asyncio loop
gathers the chunks ready from all live streams (after the first one arrives it waits up to
``max_wait_ms`` for the others, or until every live stream has submitted) and hands them to one
worker (the :class:`~enhancers.executor.worker.Worker` interface), which runs each stage once per
tick, batched over the streams that enabled it (:mod:`enhancers.executor.batch`): a thread of this
process (``isolation="thread"``, :mod:`enhancers.executor.thread`) or a process of its own
(``"process"``, :mod:`enhancers.executor.process`, what the server uses).
Audio never stalls: a chunk not back ``deadline_ms`` after submission is answered with its input
(``bypassed=True``) and still runs later for the stages' state (at most ``max_backlog_chunks`` late
per stream); a stage that raises is skipped for that tick; a job that runs longer than
``stuck_after_ms`` (a stage that hangs, a worker process that stops answering; counted from when
the worker begins the job, not while it loads a stage) or a worker process that dies gets the
worker replaced and the stage disabled for a backoff, after which it is loaded again; one that
keeps failing stays disabled (:mod:`enhancers.executor.recovery`).
With ``admission`` on, a stream asking for stages gets them only if the predicted tick time stays
within ``target_load`` of the 10 ms tick; else a lighter variant, else none, and is upgraded when
load drops (:mod:`enhancers.executor.admission`).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from enhancers.executor.admission import AdmissionControl
from enhancers.executor.config import ExecutorConfig
from enhancers.executor.loading import options_for, resolve_device
from enhancers.executor.messages import Job, PendingChunk, ProcessedChunk
from enhancers.executor.process import ProcessWorker
from enhancers.executor.stream import DeadlineWatch, ExecutorStream
from enhancers.executor.thread import ThreadWorker
from enhancers.executor.worker import COUNTER_KEYS, RateLimitedLog, Worker, WorkerSettings
from enhancers.registry import parse_spec, parse_stage_list
from enhancers.stage import CHUNK

STUCK_POLL_S = 0.25  # while the worker loads a stage, how often a running job is looked at again
_NO_SIDE: dict[str, float] = {}  # the side info of a chunk no stage said anything about (read only)

log = logging.getLogger("enhancers.executor")


class Executor:
    """Owns the tick task, the worker (thread or process) and all live streams."""

    def __init__(self, config: ExecutorConfig = ExecutorConfig()) -> None:
        self.config = config
        device = resolve_device(config.device)
        self._deadline_s = config.deadline_ms / 1e3
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_KEYS, 0)
        self._errors = RateLimitedLog()
        if config.isolation not in ("thread", "process", "remote"):
            raise ValueError(f"isolation must be 'thread', 'process' or 'remote', not {config.isolation!r}")
        settings = WorkerSettings(device, config.stage_options, config.torch_threads, config.freeze_gc,
                                  config.recovery, config.load_timeout_ms / 1e3, config.priority_boost)
        self._worker: Worker
        if config.isolation == "remote":
            from enhancers.executor.remote import RemoteWorker

            if not config.remote_address or not config.remote_token:
                raise ValueError("isolation 'remote' needs remote_address and remote_token")
            self._worker = RemoteWorker(settings, self.counters, self._errors, address=config.remote_address,
                                        token=config.remote_token, name=config.remote_name)
        else:
            worker_cls = ProcessWorker if config.isolation == "process" else ThreadWorker
            self._worker = worker_cls(settings, self.counters, self._errors)
        self._streams: dict[int, ExecutorStream] = {}
        self._ready: dict[int, ExecutorStream] = {}  # streams with pending chunks
        self._next_id = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._gate: asyncio.Future[None] | None = None
        self._first_pending_at = 0.0
        self._deadlines: DeadlineWatch | None = None
        self._job: Job | None = None
        self._stuck_timer: asyncio.TimerHandle | None = None
        self._batch_sizes: collections.deque[int] = collections.deque(maxlen=1000)
        self._closed = False
        self._active = 0  # streams running at least one stage (a refused one submits nothing)
        self.admission = AdmissionControl(config, self._streams, self._apply_stages, self.counters,
                                          worker_boost=self._worker_boost)

    def _worker_boost(self) -> int | None:
        """Nice steps the worker process runs ahead of this one (None: a thread, remote, or not started)."""
        boost = getattr(self._worker, "priority_boost", None)
        return boost() if callable(boost) else None

    @property
    def device(self) -> torch.device:
        """Where the stages run: the configured device, the CPU after the accelerator failed."""
        return self._worker.device

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Start the worker thread and the tick task on the running loop."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self.admission.start(self._loop)
        self._wake = asyncio.Event()
        self._deadlines = DeadlineWatch(self._loop, self._expired)
        if self.config.freeze_gc:
            gc.freeze()
        self._worker.start(self._loop, self._finish, self._on_loaded)
        for stream in self._streams.values():
            for spec in stream.stages:
                self._request_load(spec)
        self._tick_task = self._loop.create_task(self._tick_loop(), name="executor-tick")

    async def close(self) -> None:
        """Stop ticking, answer every outstanding chunk unprocessed, release all stage states."""
        if self._closed:
            return
        self._closed = True
        for stream in list(self._streams.values()):
            stream.close()
        self.admission.close()
        if self._tick_task is not None:
            self._tick_task.cancel()
            try:
                await self._tick_task
            except asyncio.CancelledError:
                pass
        if self._deadlines is not None:
            for item in self._deadlines.close():
                self._bypass(item, "bypass_deadline")
        await self._worker.close()

    async def preload(self, stages: Sequence[str] | str) -> None:
        """Load the shared instances of ``stages`` now; raises what a failed load raised."""
        if self._loop is None:
            raise RuntimeError("call start() first")
        text = stages if isinstance(stages, str) else ",".join(stages)
        specs = [parse_spec(part).spec for part in text.split(",") if part.strip()]
        for spec in specs:
            self._request_load(spec)
        for spec in specs:
            await self._worker.wait_loaded(spec)

    def prepare_fallbacks(self, stages: Sequence[str]) -> list[str]:
        """Start loading, in the background, every lighter stage admission control may give a stream asking
        for ``stages``, so that an overload never waits for a model to load; the specs requested."""
        specs = sorted({spec for option in self.admission.policy.ladder(list(stages)) for spec in option}
                       - set(stages))
        for spec in specs:
            self._request_load(spec)
        return specs

    # -- streams -----------------------------------------------------------------
    def open_stream(
        self,
        stages: Sequence[str] | str,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        label: str = "",
        timeline_jumps: bool = False,
    ) -> ExecutorStream:
        """Open a stream asking for ``stages`` (e.g. ``"aec,denoise:rnnoise"``).

        ``timeline_jumps``: the chunks come from a jitter buffer that may skip or stretch its timeline (the
        SFU's streams; :meth:`ExecutorStream.shift_near`): an echo canceller that can follow such jumps only
        within a delay line it puts in front of the far end (``aec:webrtc``) gets one.  Without it, that
        canceller sees the far end as it comes (a delay line would cost it echoes shorter than the line).

        With admission on, ``stream.stages`` is what it got (maybe lighter, maybe none: then it
        submits nothing), ``stream.requested_stages`` what it asked for, ``stream.degraded_reason``
        why they differ; ``stream.on_change`` is called when an upgrade changes ``stages`` later.
        """
        if self._closed:
            raise RuntimeError("executor is closed")
        stream = ExecutorStream(self, self._next_id, label, timeline_jumps=timeline_jumps)
        self._next_id += 1
        self._set_stream_stages(stream, stages, options)
        self._streams[stream.stream_id] = stream
        self._count_active()
        return stream

    def _set_stream_stages(
        self,
        stream: ExecutorStream,
        stages: Sequence[str] | str,
        options: Mapping[str, Mapping[str, Any]] | None,
    ) -> None:
        text = stages if isinstance(stages, str) else ",".join(stages)
        stream.requested_stages, stream.options = [s.spec for s in parse_stage_list(text)], options
        self._apply_stages(stream, self.admission.admit(stream), options)

    def _retune_stream(self, stream: ExecutorStream, options: Mapping[str, Mapping[str, Any]]) -> None:
        merged = {str(k): dict(v) for k, v in (stream.options or {}).items()}
        for key, values in options.items():
            for spec in stream.stages:
                kind = spec.split(":", 1)[0]
                if key not in (spec, kind):
                    continue
                # what the stage reads now (its full spec's entry, else its kind's), updated, stored under the
                # full spec when that is where it was or what was named, else under the kind
                own = options_for(merged, spec)
                own.update(values)
                merged[spec if spec in merged or key == spec else kind] = own
        stream.options = merged
        if stream.stages:
            self._worker.declare_stream(stream.stream_id, {s: stream.stage_options(merged, s) for s in stream.stages})

    def _apply_stages(
        self, stream: ExecutorStream, specs: list[str], options: Mapping[str, Mapping[str, Any]] | None
    ) -> None:
        stream.stages = specs
        stream.track_aec(specs)
        stream.latency_samples = sum(self._worker.declared_latency(s) for s in specs)
        self._worker.declare_stream(stream.stream_id, {s: stream.stage_options(options, s) for s in specs})
        for spec in specs:
            self._request_load(spec)
        self._count_active()

    def _count_active(self) -> None:
        self._active = sum(1 for s in self._streams.values() if s.stages)
        self._maybe_open_gate()

    def _close_stream(self, stream: ExecutorStream) -> None:
        self._streams.pop(stream.stream_id, None)
        self._ready.pop(stream.stream_id, None)
        while stream.pending:
            self._bypass(stream.pending.popleft(), None)
        self._worker.close_stream(stream.stream_id)
        self._count_active()

    def _request_load(self, spec: str) -> None:
        if self._loop is not None:
            self._worker.request_load(spec)

    def _on_loaded(self, spec: str, ok: bool) -> None:
        if not ok:
            return
        for stream in self._streams.values():
            if spec in stream.stages:
                stream.latency_samples = sum(self._worker.declared_latency(s) for s in stream.stages)

    # -- submission and deadlines --------------------------------------------------
    def _submit(self, stream: ExecutorStream, chunk: np.ndarray, reference: np.ndarray | None) -> None:
        loop = self._loop
        if loop is None or self._closed:
            raise RuntimeError("executor is not running")
        if stream.closed:
            raise RuntimeError("stream is closed")
        if chunk.shape != (CHUNK,):
            raise ValueError(f"chunk must have shape ({CHUNK},), got {chunk.shape}")
        if chunk.dtype != np.float32:
            chunk = chunk.astype(np.float32)
        if reference is not None:
            if reference.shape != (CHUNK,):
                raise ValueError(f"reference must have shape ({CHUNK},), got {reference.shape}")
            if reference.dtype != np.float32:
                reference = reference.astype(np.float32)
        now = loop.time()
        bypass, gains = stream.fallback_audio(chunk, reference)
        item = PendingChunk(stream.stream_id, chunk, reference, stream, now + self._deadline_s, bypass)
        item.echo_gains = gains
        self.counters["chunks"] += 1
        stream.pending.append(item)
        assert self._deadlines is not None
        self._deadlines.add(item)
        if stream.stream_id not in self._ready:
            if not self._ready:
                self._first_pending_at = now
                assert self._wake is not None
                self._wake.set()
            self._ready[stream.stream_id] = stream
            self._maybe_open_gate()

    def _maybe_open_gate(self) -> None:
        gate = self._gate
        if gate is not None and not gate.done() and len(self._ready) >= self._active:
            gate.set_result(None)

    def _expired(self, item: PendingChunk) -> None:
        """Deadline passed: answer ``item`` unprocessed; it still runs (the stages' state) unless too
        many late chunks of its stream wait, in which case the oldest are dropped."""
        self._bypass(item, "bypass_deadline")
        stream = self._streams.get(item.stream_id)
        if stream is None:
            return
        pending = stream.pending
        late = 0
        for waiting in pending:  # answered (late) chunks are at the front: deadlines are FIFO
            if not waiting.answered:
                break
            late += 1
        while late > self.config.max_backlog_chunks:
            pending.popleft()
            late -= 1
            self.counters["dropped_backlog"] += 1
        if not pending:
            self._ready.pop(item.stream_id, None)

    def _bypass(self, item: PendingChunk, counter: str | None) -> None:
        if not item.answered:
            item.answered = True
            if counter is not None:
                self.counters[counter] += 1
            self._deliver(item, ProcessedChunk(item.bypass_audio.copy(), {}, True))

    def _deliver(self, item: PendingChunk, chunk: ProcessedChunk) -> None:
        try:
            item.sink._deliver(chunk)
        except Exception as exc:  # noqa: BLE001 - one stream's consumer must not stop the others' results
            self._errors.error("deliver", "a stream's consumer failed on a processed chunk", exc)

    # -- ticking -----------------------------------------------------------------------
    async def _tick_loop(self) -> None:
        assert self._loop is not None and self._wake is not None
        loop = self._loop
        wait_s = self.config.max_wait_ms / 1e3
        while True:
            if not self._ready:
                self._wake.clear()
                await self._wake.wait()
                continue
            remaining = self._first_pending_at + wait_s - loop.time()
            if len(self._ready) < self._active and remaining > 0:
                gate: asyncio.Future[None] = loop.create_future()
                self._gate = gate
                timer = loop.call_later(remaining, _open, gate)
                await gate
                timer.cancel()
                self._gate = None
            job = self._gather()
            if job is not None:
                await self._run(job)

    def _gather(self) -> Job | None:
        ready, self._ready = self._ready, {}
        rounds: list[list[PendingChunk]] = []
        for sid in sorted(ready):
            pending = ready[sid].pending
            for depth in range(len(pending)):
                if depth == len(rounds):
                    rounds.append([])
                rounds[depth].append(pending[depth])
            pending.clear()
        if not rounds:
            return None
        for items in rounds:
            self._batch_sizes.append(len(items))
        return Job(ops=[], items=rounds)  # the worker adds the stream changes declared since the last job

    async def _run(self, job: Job) -> None:
        assert self._loop is not None
        job.done = self._loop.create_future()
        job.started = time.monotonic()
        self._job = job
        self._worker.submit(job)
        self._stuck_timer = self._loop.call_later(self.config.stuck_after_ms / 1e3, self._check_stuck, job)
        try:
            await job.done
        finally:
            if self._stuck_timer is not None:
                self._stuck_timer.cancel()
            self._stuck_timer = self._job = None

    def _check_stuck(self, job: Job) -> None:
        """``job`` is still out: stuck once it has run ``stuck_after_ms`` by the worker's account (from when
        it began it; not while it loads a stage), else looked at again when that time would be up."""
        self._stuck_timer = None
        if job.done is None or job.done.done() or self._loop is None:
            return
        stuck_s = self.config.stuck_after_ms / 1e3
        since = self._worker.busy_since(job)
        left = STUCK_POLL_S if since is None else since + stuck_s - time.monotonic()
        if since is not None and left <= 0:
            return self._abandon(job, time.monotonic() - since)
        self._stuck_timer = self._loop.call_later(min(left, stuck_s), self._check_stuck, job)

    def _finish(self, job: Job) -> None:
        """Back on the loop: hand each chunk its result unless its deadline already passed."""
        if job.abandoned or job.done is None or job.done.done():
            return
        late = 0
        rounds = job.items
        self.admission.observe(job.results)
        for items, result in zip(rounds, job.results):
            rows, side, failed = result.audio, result.side, result.failed
            for i, item in enumerate(items):
                if item.answered:
                    late += 1
                    continue
                item.answered = True
                audio = rows[i]
                if item.echo_gains is not None and not result.passthrough:  # was the aec there for it?
                    stream = self._streams.get(item.stream_id)
                    if stream is not None:
                        audio = stream.without_aec(audio, item.echo_gains, self._worker.stage_available)
                self._deliver(item, ProcessedChunk(audio, side[i] if side else _NO_SIDE, i in failed))
        for items in rounds[len(job.results) :]:
            for item in items:
                self._bypass(item, "bypass_error")
        self.counters["late_discarded"] += late
        job.done.set_result(None)

    def _abandon(self, job: Job, busy_s: float) -> None:
        """A job hung: the worker puts the stage on its backoff and carries on with a fresh worker."""
        if job.done is None or job.done.done():
            return
        job.abandoned = True
        spec = self._worker.abandon(job)
        self.counters["stuck_restarts"] += 1
        log.error(
            "executor worker stuck for %.0f ms in stage %r; worker replaced, stage retried after a backoff",
            busy_s * 1e3,
            spec,
        )
        for items in job.items:
            for item in items:
                self._bypass(item, "bypass_deadline")
        job.done.set_result(None)

    # -- introspection ---------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters, batch sizes, per-stage tick time, live streams, device."""
        sizes = self._batch_sizes
        job = self._job
        busy_ms = (time.monotonic() - job.started) * 1e3 if job is not None else 0.0
        return {
            **self.counters,
            "last_batch_size": sizes[-1] if sizes else 0,
            "avg_batch_size": round(sum(sizes) / len(sizes), 2) if sizes else 0.0,
            "live_streams": len(self._streams),
            "device": str(self.device),
            "worker_busy_ms": round(busy_ms, 3),
            "isolation": self.config.isolation,
            "worker_pid": self._worker.pid,
            "stages": self._worker.stage_stats(),
            "worker": self._worker.worker_stats(),
            **self.admission.stats(),
        }


def _open(gate: asyncio.Future[None]) -> None:
    if not gate.done():
        gate.set_result(None)
