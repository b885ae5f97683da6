"""Executor overhead and batched stage cost, per stream-chunk, at B = 1, 16, 64, 256 streams.

Prints JSON.  For each B:
  * ``identity``: a trivial stage through the full executor path (submit, tick,
    worker thread, resolve), minus the stage's own time = executor overhead;
    ``asyncio_floor`` is the same gather of B awaits per tick resolved by a bare
    callback: what any per-stream ``await`` API costs before doing anything;
  * ``limiter``, ``vad`` (webrtc), ``vad:silero``: one batched ``Stage.process``
    call over B streams against B separate single-stream calls (the per-stream
    baseline), both measured in this run, plus the full executor path.
All figures are microseconds per stream-chunk (one 10 ms chunk of one stream):
stage calls in CPU time of the calling thread; the executor path in wall time
and in process CPU time (loop + worker threads), since wall time on a shared
machine also counts other processes.  ``calibration_python_loop_ms`` (a 1e6-step
loop, about 40-50 ms on an idle modern core) tells how slow the machine was.
Run: ``.venv/bin/python bench/executor.py [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from enhancers import registry
from enhancers.audio_io import read_48k
from enhancers.compute_threads import limit_compute_threads
from enhancers.executor import Executor, ExecutorConfig
from enhancers.stage import CHUNK, BatchContext, Stage, StageStream

EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "eval"
BATCHES = (1, 16, 64, 256)


class IdentityStage(Stage):
    """Returns its input: isolates what the executor itself costs."""

    name = "denoise"

    def process(self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext) -> torch.Tensor:
        return audio


registry.STAGES["denoise:bench_identity"] = "__main__:IdentityStage"


def load_audio(streams: int, ticks: int) -> np.ndarray:
    """[streams, ticks, CHUNK] of real speech, each stream starting at a different offset."""
    speech = np.concatenate([read_48k(p) for p in sorted((EVAL / "speech").glob("*.wav"))])
    out = np.empty((streams, ticks, CHUNK), dtype=np.float32)
    for s in range(streams):
        start = (s * 7919 * CHUNK) % (len(speech) - ticks * CHUNK)
        out[s] = speech[start : start + ticks * CHUNK].reshape(ticks, CHUNK)
    return out


def stage_cost(spec: str, audio: np.ndarray, ticks: int) -> dict[str, float]:
    """Batched call vs B single-stream calls, CPU microseconds per stream-chunk."""
    b = audio.shape[0]
    stage = registry.create_stage(spec, device="cpu")
    batched_streams = [stage.stream() for _ in range(b)]
    single_streams = [stage.stream() for _ in range(b)]
    chunks = torch.from_numpy(audio)
    with torch.inference_mode():
        for k in range(3):  # warm-up (JIT profiling runs)
            stage.process(chunks[:, k], batched_streams, BatchContext())
            for s in range(b):
                stage.process(chunks[s : s + 1, k], [single_streams[s]], BatchContext())
        start = time.thread_time()
        for k in range(ticks):
            stage.process(chunks[:, k], batched_streams, BatchContext())
        batched = time.thread_time() - start
        start = time.thread_time()
        for k in range(ticks):
            for s in range(b):
                stage.process(chunks[s : s + 1, k], [single_streams[s]], BatchContext())
        single = time.thread_time() - start
    per = 1e6 / (ticks * b)
    return {
        "batched_us": round(batched * per, 2),
        "per_stream_calls_us": round(single * per, 2),
        "speedup": round(single / batched, 2),
    }


async def asyncio_floor(streams: int, ticks: int) -> dict[str, float]:
    """The same per-tick gather of B awaits, resolved by a bare callback: the asyncio floor."""
    loop = asyncio.get_running_loop()
    waiting: list[asyncio.Future[None]] = []

    def resolve() -> None:
        for future in waiting:
            future.set_result(None)
        waiting.clear()

    async def submit() -> None:
        future: asyncio.Future[None] = loop.create_future()
        waiting.append(future)
        if len(waiting) == streams:
            loop.call_soon(resolve)
        await future

    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(ticks):
        await asyncio.gather(*(submit() for _ in range(streams)))
    per = 1e6 / (ticks * streams)
    return {
        "wall_us": round((time.perf_counter() - start) * per, 2),
        "cpu_us": round((time.process_time() - cpu_start) * per, 2),
    }


async def executor_cost(spec: str, audio: np.ndarray, ticks: int) -> dict[str, Any]:
    """Full path: B streams each submit one chunk per tick; wall time per stream-chunk."""
    b = audio.shape[0]
    executor = Executor(ExecutorConfig(device="cpu", deadline_ms=10_000.0, max_wait_ms=3.0))
    await executor.start()
    try:
        await executor.preload(spec)
        streams = [executor.open_stream(spec) for _ in range(b)]
        for k in range(3):
            await asyncio.gather(*(s.process(audio[i, k]) for i, s in enumerate(streams)))
        base_calls = executor.stats()["stages"][spec]
        start, cpu_start = time.perf_counter(), time.process_time()
        for k in range(ticks):
            await asyncio.gather(*(s.process(audio[i, k]) for i, s in enumerate(streams)))
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
        stats = executor.stats()
    finally:
        await executor.close()
    stage = stats["stages"][spec]
    calls = stage["calls"] - base_calls["calls"]
    stage_s = stage["avg_ms"] * stage["calls"] / 1e3 - base_calls["avg_ms"] * base_calls["calls"] / 1e3
    per = 1e6 / (ticks * b)
    return {
        "wall_us": round(wall * per, 2),
        "cpu_us": round(cpu * per, 2),  # both threads; less disturbed by other load than wall
        "cpu_overhead_us": round((cpu - stage_s) * per, 2),
        "stage_us": round(stage_s * per, 2),
        "overhead_us": round((wall - stage_s) * per, 2),
        "tick_ms": round(wall / ticks * 1e3, 3),
        "stage_calls_per_tick": round(calls / ticks, 2),
        "bypassed": stats["bypass_deadline"] + stats["bypass_error"],
    }


def python_speed_ms() -> float:
    """CPU time of a 1e6-step Python loop: scale figures taken on a loaded or slow machine."""
    start = time.thread_time()
    total = 0
    for i in range(1_000_000):
        total += i
    return round((time.thread_time() - start) * 1e3, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer ticks, for a smoke run")
    args = parser.parse_args()
    limit_compute_threads(1)
    ticks = 10 if args.quick else 50
    audio_all = load_audio(max(BATCHES), ticks + 3)
    results: dict[str, Any] = {}
    for b in BATCHES:
        audio = audio_all[:b]
        row: dict[str, Any] = {
            "identity": {
                "executor": asyncio.run(executor_cost("denoise:bench_identity", audio, ticks)),
                "asyncio_floor": asyncio.run(asyncio_floor(b, ticks)),
                **stage_cost("denoise:bench_identity", audio[:, 3:], ticks),
            }
        }
        for spec in ("limiter", "vad", "vad:silero"):
            row[spec] = {
                **stage_cost(spec, audio[:, 3:], ticks),
                "executor": asyncio.run(executor_cost(spec, audio, ticks)),
            }
        results[f"B={b}"] = row
    report = {
        "bench": "executor",
        "unit": "microseconds per stream-chunk (10 ms of one stream)",
        "ticks": ticks,
        "device": "cpu",
        "torch_threads": 1,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "calibration_python_loop_ms": python_speed_ms(),
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
