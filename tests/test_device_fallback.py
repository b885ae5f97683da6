"""The accelerator failing mid-run: the executor notices, moves or reloads the stages on the CPU, goes on.

CI has no GPU, so the device is simulated where the real part cannot run
(``tests.fault_stages.FlakyGpuStage``: its calls raise what torch raises once
a CUDA device is lost); the executor code path under test is the generic one.
The live-call version is in ``tests/test_faults.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from enhancers import registry
from enhancers.executor import Executor, ExecutorConfig, ExecutorStream, ProcessedChunk
from enhancers.executor.device import is_device_error, move_stage
from enhancers.registry import create_stage
from enhancers.stage import CHUNK, BatchContext
from tests import fault_stages

SPEC = "limiter:flakygpu"
RELAXED = {"deadline_ms": 5_000.0, "max_wait_ms": 50.0}  # a loaded CI box must not bypass


@pytest.fixture(autouse=True)
def flaky_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(registry.STAGES, SPEC, "tests.fault_stages:FlakyGpuStage")
    monkeypatch.setenv("FLAKY_GPU_FLAG", str(tmp_path / "gpu"))


@pytest.fixture
async def executor() -> AsyncIterator[Executor]:
    ex = Executor(ExecutorConfig(device="cpu", **RELAXED))
    await ex.start()
    try:
        yield ex
    finally:
        await ex.close()


def tone(start: int, n: int) -> np.ndarray:
    k = np.arange(start, start + n)
    return (0.3 * np.sin(2 * np.pi * fault_stages.TONE_HZ * k / 48_000)).astype(np.float32)


async def tick(streams: Sequence[ExecutorStream], chunk: np.ndarray) -> list[ProcessedChunk]:
    return list(await asyncio.gather(*(s.process(chunk) for s in streams)))


def test_device_errors_are_recognised() -> None:
    for make in fault_stages.FAULTS.values():
        assert is_device_error(make())
    try:
        try:
            raise fault_stages.FAULTS["cuda-error"]()
        except RuntimeError as inner:
            raise ValueError("stage failed") from inner
    except ValueError as wrapped:
        assert is_device_error(wrapped)  # a stage wrapping torch's error
    for exc in (RuntimeError("this stage always fails"), ValueError("CUDA error"), KeyError("x"), None):
        assert not is_device_error(exc)


@pytest.mark.parametrize("fault", sorted(fault_stages.FAULTS))
async def test_device_loss_moves_stages_to_cpu_keeping_stream_state(
        executor: Executor, fault: str, caplog: pytest.LogCaptureFixture) -> None:
    await executor.preload(f"{SPEC},vad")
    streams = [executor.open_stream(f"{SPEC},vad") for _ in range(3)]
    chunk = np.full(CHUNK, 0.01, dtype=np.float32)
    for k in range(10):
        for r in await tick(streams, chunk):
            assert not r.bypassed
            np.testing.assert_allclose(r.audio, tone(k * CHUNK, CHUNK), atol=1e-5)
    fault_stages.lose_gpu(fault)
    with caplog.at_level(logging.ERROR, logger="enhancers.executor"):
        lost = await tick(streams, chunk)
    assert all(r.bypassed for r in lost)  # the failing tick passes through
    for r in lost:
        np.testing.assert_array_equal(r.audio, chunk)
    late = executor.open_stream(SPEC)  # a stream opened after the fallback gets the CPU stage
    for k in range(10, 30):
        for r in await tick(streams, chunk):
            assert not r.bypassed and "vad" in r.side
            # the tone goes on where it stopped: each stream's state came along to the CPU
            np.testing.assert_allclose(r.audio, tone(k * CHUNK, CHUNK), atol=1e-5)
        assert not (await late.process(chunk)).bypassed
    stats = executor.stats()
    assert stats["device_fallbacks"] == 1 and stats["device"] == "cpu"
    assert stats["bypass_error"] == 3 and stats["stage_unavailable"] == 0
    assert stats["stages"][SPEC]["errors"] == 1 and not stats["stages"][SPEC]["disabled"]
    assert any("falling back to cpu" in r.getMessage() for r in caplog.records)


async def test_unreachable_device_reloads_the_stage_on_cpu(executor: Executor,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """The state cannot be copied off the lost device: a fresh CPU instance takes over, fresh state."""
    await executor.preload(SPEC)
    streams = [executor.open_stream(SPEC) for _ in range(2)]
    chunk = np.full(CHUNK, 0.01, dtype=np.float32)
    for _ in range(5):
        assert not any(r.bypassed for r in await tick(streams, chunk))
    fault_stages.lose_gpu("cuda-error", unreachable=True)
    with caplog.at_level(logging.ERROR, logger="enhancers.executor"):
        assert all(r.bypassed for r in await tick(streams, chunk))
        passed = 0
        give_up = asyncio.get_running_loop().time() + 30.0  # a hang guard, not a speed check
        while True:  # the reload runs on the loader thread; audio passes unprocessed meanwhile
            results = await tick(streams, chunk)
            if not any(r.bypassed for r in results) and not np.allclose(results[0].audio, chunk):
                break
            passed += 1
            assert asyncio.get_running_loop().time() < give_up, "the stage was never reloaded"
            await asyncio.sleep(0.002)
    for r in results:  # fresh state: the tone starts again from phase 0
        np.testing.assert_allclose(r.audio, tone(0, CHUNK), atol=1e-5)
    stats = executor.stats()
    assert stats["device_fallbacks"] == 1 and stats["stage_unavailable"] == 2 * passed
    assert not stats["stages"][SPEC]["disabled"]
    assert any("could not be moved" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("spec", ["limiter", "vad", "vad:silero", "aec", "dereverb", "denoise:rnnoise",
                                  "denoise:nsnet2", "denoise"])
def test_every_stage_survives_the_generic_move(spec: str) -> None:
    """``Stage.to_device`` walks real stages without breaking them: the output is unchanged."""
    rng = np.random.default_rng(3)
    audio = torch.from_numpy((rng.standard_normal((2, 40 * CHUNK)) * 0.05).astype(np.float32))
    outs = []
    for move in (False, True):
        stage = create_stage(spec)
        handles = [stage.stream(), stage.stream()]
        chunks = []
        with torch.inference_mode():
            for k in range(40):
                if move and k == 20:
                    move_stage(stage, handles, torch.device("cpu"))
                x = audio[:, k * CHUNK:(k + 1) * CHUNK]
                chunks.append(stage.process(x, handles, BatchContext(reference=torch.zeros_like(x))).clone())
        for h in handles:
            h.close()
        outs.append(torch.cat(chunks, dim=1).numpy())
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-6)
