"""A worker process busy loading a model is slow, not stuck: it is never killed for it (issue 16).

At startup the worker process loads the stages (DF3: seconds on a busy core)
while chunks already arrive; the load starves the child, so its first jobs
take longer than ``stuck_after_ms``.  The stage here holds the interpreter lock
for its whole load (as a heavy model construction on a contended core does,
deterministically): no job can run in the child until it is loaded.  The
worker must be left alone, the chunks meanwhile pass through unprocessed, and
processing starts once the stage is loaded.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from enhancers import registry
from enhancers.executor import Executor, ExecutorConfig, ProcessedChunk
from enhancers.stage import CHUNK, BatchContext, Stage, StageStream

SPEC = "limiter:test_slow_to_load"
STUCK_AFTER_MS = 300.0
LOAD_S = 2.0  # well past stuck_after_ms


class GreedyLoadStage(Stage):
    """Halves its input; its construction keeps the interpreter lock for ``LOAD_S``."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__(device)
        interval = sys.getswitchinterval()
        sys.setswitchinterval(60.0)  # no other thread of the worker process runs until this load is over
        try:
            end = time.monotonic() + LOAD_S
            while time.monotonic() < end:
                pass
        finally:
            sys.setswitchinterval(interval)

    def process(self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext) -> torch.Tensor:
        return audio * 0.5


@pytest.fixture(autouse=True)
def slow_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.STAGES, SPEC, f"{__name__}:GreedyLoadStage")


def halved(audio: np.ndarray, result: ProcessedChunk) -> bool:
    return not result.bypassed and bool(np.allclose(result.audio, audio * 0.5, atol=1e-6))


def chunk(k: int) -> np.ndarray:
    t = (np.arange(CHUNK) + k * CHUNK) / 48_000
    return (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


async def test_a_worker_loading_a_stage_is_not_killed_and_processing_starts_when_loaded() -> None:
    config = ExecutorConfig(device="cpu", isolation="process", stuck_after_ms=STUCK_AFTER_MS, deadline_ms=500.0)
    executor = Executor(config)
    await executor.start()
    try:
        stream = executor.open_stream(SPEC)  # the worker process starts and loads the stage
        pids: set[int] = set()
        results: list[tuple[np.ndarray, ProcessedChunk]] = []
        give_up = asyncio.get_running_loop().time() + 90.0  # a hang guard, not a speed check
        streak = 0  # processed in a row
        k = 0
        while streak < 20:
            assert asyncio.get_running_loop().time() < give_up, "the stage never started processing"
            audio = chunk(k)
            k += 1
            result = await asyncio.wait_for(stream.process(audio), 10.0)  # never stalled
            results.append((audio, result))
            streak = streak + 1 if halved(audio, result) else 0
            assert executor.stats()["stuck_restarts"] == 0, "the worker was abandoned while it loaded the stage"
            pid = executor.stats()["worker_pid"]
            if pid is not None:
                pids.add(pid)
            await asyncio.sleep(0.01)
        stats = executor.stats()
    finally:
        await executor.close()

    assert stats["stuck_restarts"] == 0 and stats["worker_restarts"] == 0 and stats["stage_faults"] == 0
    assert len(pids) == 1, f"the worker process was replaced: {pids}"
    assert stats["worker"]["last_exit_code"] is None
    first = next(i for i, (audio, r) in enumerate(results) if halved(audio, r))
    assert first > 0, "the stage cannot have been loaded before the first chunk"
    for audio, result in results[:first]:  # fail-open while loading: the chunk as it came
        np.testing.assert_array_equal(result.audio, audio)
    for audio, result in results[first:]:  # then processed (a chunk may still miss its deadline when busy)
        assert halved(audio, result) or (result.bypassed and np.array_equal(result.audio, audio))
