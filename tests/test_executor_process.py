"""The executor's worker process: stages run outside the server's process, and its faults are contained.

Real stages (the limiter) and the fault stages of ``tests.fault_stages`` run
in a spawned worker process; the tests check what a stream gets back (the
processed audio, in order, never stalled) through a hang and a crash of it.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from enhancers import registry
from enhancers.executor import Executor, ExecutorConfig, ExecutorStream, ProcessedChunk
from enhancers.executor.recovery import RecoveryPolicy
from enhancers.stage import CHUNK

LOUD = 2.0  # the limiter brings this down to its ceiling


def loud_chunks(count: int) -> np.ndarray:
    t = np.arange(count * CHUNK) / 48_000
    return (LOUD * np.sin(2 * np.pi * 440 * t)).astype(np.float32).reshape(count, CHUNK)


async def make_executor(**overrides: Any) -> AsyncIterator[Executor]:
    config = {"device": "cpu", "isolation": "process", "deadline_ms": 200.0, **overrides}
    executor = Executor(ExecutorConfig(**config))
    await executor.start()
    try:
        yield executor
    finally:
        await executor.close()


async def limited_again(streams: list[ExecutorStream], timeout_s: float = 30.0) -> bool:
    """Keep every stream going until all of them get limited audio back (a new worker is ready)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while loop.time() < end:
        batches = await asyncio.gather(*(run_chunks(s, loud_chunks(20)) for s in streams))
        if all(sum(limited(r) for r in batch[-10:]) >= 8 for batch in batches):
            return True
    return False


async def run_chunks(stream: ExecutorStream, chunks: np.ndarray, pace_s: float = 0.01) -> list[ProcessedChunk]:
    results = []
    for chunk in chunks:
        results.append(await asyncio.wait_for(stream.process(chunk), 5.0))
        await asyncio.sleep(pace_s)
    return results


def limited(result: ProcessedChunk) -> bool:
    return not result.bypassed and float(np.abs(result.audio).max()) < 1.0


async def test_stages_run_in_a_worker_process() -> None:
    async for executor in make_executor():
        assert executor.stats()["worker_pid"] is None  # nothing started before a stage is wanted
        await executor.preload("limiter")
        pid = executor.stats()["worker_pid"]
        assert pid is not None and pid != os.getpid()
        stream = executor.open_stream("limiter")
        results = await run_chunks(stream, loud_chunks(50), pace_s=0.0)
        assert sum(limited(r) for r in results) >= 45
        stats = executor.stats()
        assert stats["isolation"] == "process"
        assert stats["stages"]["limiter"]["calls"] > 0 or stats["batches"] > 0


def _may_raise_priority() -> bool:
    """Whether a process here may lower its nice value (CAP_SYS_NICE or RLIMIT_NICE), probed in a child."""
    import subprocess
    import sys

    probe = "import os; os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) - 1)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


async def test_the_worker_runs_ahead_of_the_media_process_and_again_after_a_restart() -> None:
    """On a core it shares with the media process, the worker's rounds win the CPU over a burst of the media
    process's own work: it runs ``priority_boost`` nice steps ahead (where the system permits; else at the same
    priority, reported as 0), its rounds' thread and the threads it starts, and a worker started again after a
    crash does too.  Its stage loader (seconds of model loading, no deadline) stays at the media process's."""
    boost = 3 if _may_raise_priority() else 0
    async for executor in make_executor(priority_boost=3):
        await executor.preload("limiter")
        stream = executor.open_stream("limiter")
        assert sum(limited(r) for r in await run_chunks(stream, loud_chunks(20))) >= 15
        assert executor.stats()["worker"]["priority_boost"] == boost
        pid = executor.stats()["worker_pid"]
        own = os.getpriority(os.PRIO_PROCESS, 0)
        assert own - os.getpriority(os.PRIO_PROCESS, pid) == boost  # the main thread: it runs the rounds
        ahead = sorted(own - os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task"))
        assert ahead.count(0) <= 1 and ahead.count(boost) == len(ahead) - ahead.count(0)  # all but the loader
        os.kill(pid, signal.SIGKILL)
        assert await limited_again([stream])
        assert executor.stats()["worker_pid"] != pid and executor.stats()["worker"]["priority_boost"] == boost


async def test_a_crashed_worker_is_replaced_and_audio_never_stalls() -> None:
    async for executor in make_executor():
        await executor.preload("limiter")
        stream = executor.open_stream("limiter")
        before = await run_chunks(stream, loud_chunks(20))
        assert sum(limited(r) for r in before) >= 15
        old = executor.stats()["worker_pid"]
        os.kill(old, signal.SIGKILL)
        during = await run_chunks(stream, loud_chunks(100))  # every chunk answered, in time or bypassed
        assert len(during) == 100
        assert executor.counters["worker_restarts"] == 1
        assert executor.stats()["worker_pid"] not in (None, old)
        # the new worker loads the limiter again and the stream is limited again
        assert await limited_again([stream])


async def test_a_hung_stage_kills_the_worker_and_only_that_stage_is_disabled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(registry.STAGES, "denoise:hang", "tests.fault_stages:HangingStage")
    # one retry allowed: it hangs again, and then it stays disabled
    policy = RecoveryPolicy(backoff_first_s=0.2, max_faults=1)
    async for executor in make_executor(deadline_ms=40.0, stuck_after_ms=500.0, recovery=policy):
        await executor.preload("denoise:hang,limiter")
        hung = executor.open_stream("denoise:hang,limiter")
        other = executor.open_stream("limiter")
        chunks = loud_chunks(150)
        end = asyncio.get_running_loop().time() + 30.0
        while not executor.stats()["stages"].get("denoise:hang", {}).get("permanently_disabled"):
            assert asyncio.get_running_loop().time() < end, executor.stats()
            results = await asyncio.gather(run_chunks(hung, chunks[:20]), run_chunks(other, chunks[:20]))
            assert all(len(r) == 20 for r in results)  # never stalled
        stage = executor.stats()["stages"]["denoise:hang"]
        assert stage["disabled"] and "permanently disabled after 2 faults" in stage["disabled_reason"], stage
        assert executor.counters["stuck_restarts"] == 2
        # after the restart the limiter runs again for both streams
        assert await limited_again([hung, other])


async def test_a_stage_that_fails_to_load_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.STAGES, "denoise:missing", "tests.no_such_module:Stage")
    async for executor in make_executor():
        with pytest.raises(RuntimeError, match="failed to load"):
            await executor.preload("denoise:missing")
        stream = executor.open_stream("denoise:missing,limiter")
        await executor.preload("limiter")
        results = await run_chunks(stream, loud_chunks(20))
        assert sum(limited(r) for r in results) >= 15  # the rest of the chain still runs
