"""The batch runner: stage instances, per-stream handles, batched runs (the worker's inside).

It runs on one thread only (the thread worker's, or the worker process's main
thread), so stage state is only ever touched by one thread.  A job's control
operations are applied first, then each round runs every stage once, batched
over the rows of the streams that enabled it, in canonical order
(``enhancers.registry.CHAIN_ORDER``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from enhancers.executor.device import CPU, is_device_error, move_stage
from enhancers.executor.messages import CloseStream, ControlOp, Job, RoundIn, RoundResult, SetStreamStages
from enhancers.executor.worker import RateLimitedLog
from enhancers.registry import CHAIN_ORDER
from enhancers.stage import CHUNK, BatchContext, Stage, StageStream

log = logging.getLogger("enhancers.executor")


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

    # -- losing the accelerator ------------------------------------------------
    def fall_back_to_cpu(self, exc: BaseException) -> None:
        """The accelerator failed: batches on the CPU from now on, every stage moved there.

        A stage that cannot be moved is disabled (its streams pass through) until
        the fresh CPU instance ``reload`` asked for is loaded.
        """
        lost = self.device
        self.fell_back = True
        self.use_device(CPU)
        self.counters["device_fallbacks"] += 1
        moved_specs, failed = [], []
        for spec, runtime in self.stages.items():
            handles = [own[spec] for own in self.handles.values() if spec in own]
            if self.move_to_cpu(spec, runtime.stage, handles):
                moved_specs.append(spec)
            else:
                runtime.disabled = True
                failed.append(spec)
        log.error("executor: accelerator error on %s (%s: %s); falling back to cpu: moved %s, reloading %s",
                  lost, type(exc).__name__, str(exc)[:200], moved_specs or "nothing", failed or "nothing")

    def move_to_cpu(self, spec: str, stage: Stage, handles: list[StageStream]) -> bool:
        """Move one stage to the CPU in place; False, and a reload requested, when that fails."""
        try:
            move_stage(stage, handles, CPU)
            return True
        except Exception as exc:  # noqa: BLE001 - a lost device cannot be read back: load it afresh
            self.errors.error(f"move:{spec}", f"stage {spec!r} could not be moved to the cpu; reloading it", exc)
            if self.reload is not None:
                self.reload([spec])
            return False

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
            if self.fell_back and not self.move_to_cpu(op.spec, op.stage, []):
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
            if spec not in wanted or (wanted[spec] != before.get(spec)
                                      and not self._retune(spec, current[spec], wanted[spec])):
                self._close_handle(spec, current.pop(spec))
        self.wanted[sid] = wanted
        for spec, options in wanted.items():
            if spec not in current:
                self._open_handle(sid, spec, options)

    def _retune(self, spec: str, handle: StageStream, options: dict[str, Any]) -> bool:
        """Change a running stream's live options in place; False: the handle must be reopened instead."""
        runtime = self.stages.get(spec)
        if runtime is None or runtime.disabled:
            return False
        old = handle.options
        changed = {k: options.get(k) for k in set(old) | set(options) if old.get(k) != options.get(k)}
        if not changed.keys() <= runtime.stage.live_options:
            return False
        try:
            runtime.stage.retune(handle, changed)
        except Exception as exc:  # noqa: BLE001 - reopen it fresh instead
            self.errors.error(f"retune:{spec}", f"stage {spec!r} failed to retune a stream", exc)
            return False
        handle.options = dict(options)
        return True

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
            for rnd in job.rounds:
                if job.abandoned:
                    return
                try:
                    results = self._run_round(job, rnd)
                except Exception as exc:
                    if self.fell_back or not is_device_error(exc):
                        raise
                    job.current_spec = None
                    self.fall_back_to_cpu(exc)
                    # this round's chunks pass through unprocessed; the next ones run on the CPU
                    n = len(rnd.stream_ids)
                    self.counters["bypass_error"] += n
                    audio = (rnd.audio if rnd.bypass is None else rnd.bypass).astype(np.float32, copy=True)
                    results = RoundResult(audio, None, set(range(n)))
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

    def _run_round(self, job: Job, rnd: RoundIn) -> RoundResult | None:
        n = len(rnd.stream_ids)
        plan = self._plan(tuple(rnd.stream_ids))
        self.counters["batches"] += 1
        batch = rnd.audio
        if batch.shape != (n, CHUNK) or batch.dtype != np.float32:
            raise ValueError(f"a round of {n} rows needs [{n}, {CHUNK}] float32 audio, got {batch.shape}")
        x = torch.from_numpy(batch)
        if self._on_device:
            x = x.to(self.device)
        if rnd.reference is not None:
            reference = torch.from_numpy(rnd.reference)
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
            # a stage's cost is what admission control budgets: on the CPU that is the thread's CPU time
            # (the wall time of a call also counts the time the core ran other processes: on a core shared
            # with the media process it doubled under load and made admission refuse everyone); on a
            # device it is the wall time up to the synchronisation
            clock = time.perf_counter if self._sync else time.thread_time
            start = clock()
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
                elapsed = clock() - start
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
