"""The batched executor: one stage call per tick for all streams, isolation, fail-open."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from enhancers import registry
from enhancers.audio_io import read_48k
from enhancers.executor import Executor, ExecutorConfig, ExecutorStream, ProcessedChunk
from enhancers.stage import CHUNK, BatchContext, Stage, StageStream

EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "eval"
RELAXED = {"deadline_ms": 5_000.0, "max_wait_ms": 50.0}  # a loaded CI box must not bypass


def speech_chunks(name: str, count: int, gain: float = 1.0, skip: int = 50) -> np.ndarray:
    x = read_48k(EVAL / "speech" / name) * gain
    return x[skip * CHUNK : (skip + count) * CHUNK].reshape(count, CHUNK).astype(np.float32)


class RecordingStage(Stage):
    """Test stage: identity audio; records batch sizes; side "seq" counts each stream's chunks."""

    name = "denoise"
    batch_sizes: ClassVar[list[int]] = []

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {"seq": torch.zeros(())}

    def process(self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext) -> torch.Tensor:
        type(self).batch_sizes.append(audio.shape[0])
        slots = self.slots(streams)
        seq = self.state["seq"].index_select(0, slots) + 1
        self.state["seq"].index_copy_(0, slots, seq)
        ctx.side["seq"] = seq
        return audio.clone()


class FaultyStage(Stage):
    """Test stage: identity, but raises or hangs (until released) while armed."""

    name = "dereverb"
    mode = "ok"  # "ok" | "raise" | "hang"
    release = threading.Event()

    def process(self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext) -> torch.Tensor:
        if type(self).mode == "raise":
            raise RuntimeError("boom (test)")
        if type(self).mode == "hang":
            type(self).release.wait(30.0)
        return audio * 0.5


class SlowDelayStage(Stage):
    """Test stage with 300 samples of latency (a pure delay) that stalls on calls 10..12."""

    name = "aec"
    latency_samples = 300
    calls = 0

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {"tail": torch.zeros(self.latency_samples)}

    def process(self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext) -> torch.Tensor:
        type(self).calls += 1
        if 10 <= type(self).calls < 13:
            threading.Event().wait(0.4)
        slots = self.slots(streams)
        full = torch.cat([self.state["tail"].index_select(0, slots), audio], dim=1)
        self.state["tail"].index_copy_(0, slots, full[:, -self.latency_samples :].contiguous())
        return full[:, :CHUNK]


class TunableStage(RecordingStage):
    """Test stage: ``gain`` (live: state kept) times the audio, ``mode`` (not live: reopens); side "seq"."""

    live_options = frozenset({"gain"})

    def process(self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext) -> torch.Tensor:
        gains = torch.tensor([float(s.options.get("gain", 1.0)) for s in streams])[:, None]
        return super().process(audio, streams, ctx) * gains

    def retune(self, stream: StageStream, changed: dict[str, Any]) -> None:
        pass  # ``gain`` is read from the options, which the executor updates after this


class SlowLoadStage(RecordingStage):
    """Test stage whose construction takes a while (as loading real weights does)."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__(device)
        threading.Event().wait(0.5)


@pytest.fixture(autouse=True)
def test_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.STAGES, "denoise:test_record", f"{__name__}:RecordingStage")
    monkeypatch.setitem(registry.STAGES, "dereverb:test_faulty", f"{__name__}:FaultyStage")
    monkeypatch.setitem(registry.STAGES, "aec:test_slow_delay", f"{__name__}:SlowDelayStage")
    monkeypatch.setitem(registry.STAGES, "denoise:test_slow_load", f"{__name__}:SlowLoadStage")
    monkeypatch.setitem(registry.STAGES, "denoise:test_tunable", f"{__name__}:TunableStage")
    SlowDelayStage.calls = 0
    RecordingStage.batch_sizes = []
    FaultyStage.mode = "ok"
    FaultyStage.release = threading.Event()


async def make_executor(**overrides: Any) -> AsyncIterator[Executor]:
    executor = Executor(ExecutorConfig(device="cpu", **{**RELAXED, **overrides}))
    await executor.start()
    try:
        yield executor
    finally:
        FaultyStage.release.set()
        await executor.close()


@pytest.fixture
async def executor() -> AsyncIterator[Executor]:
    async for ex in make_executor():
        yield ex


async def tick(streams: Sequence[ExecutorStream], chunks: Sequence[np.ndarray]) -> list[ProcessedChunk]:
    return list(await asyncio.gather(*(s.process(c) for s, c in zip(streams, chunks))))


async def test_one_batched_stage_call_per_tick(executor: Executor) -> None:
    await executor.preload("denoise:test_record,vad,limiter")
    streams = [executor.open_stream("denoise:test_record,limiter") for _ in range(8)]
    streams += [executor.open_stream("vad,denoise:test_record") for _ in range(4)]
    audio = speech_chunks("vctk_p286_011_48k.wav", 20)
    for k in range(20):
        results = await tick(streams, [audio[k]] * len(streams))
        assert [r.side["seq"] for r in results] == [k + 1] * len(streams)
        assert all("vad" in r.side for r in results[8:]) and all("vad" not in r.side for r in results[:8])
    assert RecordingStage.batch_sizes == [12] * 20  # one call per tick with every stream in it
    stages = executor.stats()["stages"]
    assert stages["limiter"]["avg_batch"] == 8 and stages["vad"]["avg_batch"] == 4
    assert executor.counters["batches"] == 20 and executor.counters["bypass_deadline"] == 0


async def test_streams_keep_their_own_state(executor: Executor) -> None:
    """Two different streams processed together give what each gives alone."""
    chain = "vad:silero,limiter"
    await executor.preload(chain)
    loud = speech_chunks("vctk_p286_011_48k.wav", 120, gain=4.0)
    quiet = speech_chunks("cmu_arctic_us_aew_a0001.wav", 120, gain=0.5, skip=0)

    async def alone(chunks: np.ndarray) -> list[ProcessedChunk]:
        stream = executor.open_stream(chain)
        out = [await stream.process(c) for c in chunks]
        stream.close()
        return out

    a_alone, b_alone = await alone(loud), await alone(quiet)
    a, b = executor.open_stream(chain), executor.open_stream(chain)
    together = [await tick([a, b], [x, y]) for x, y in zip(loud, quiet)]
    for (ra, rb), sa, sb in zip(together, a_alone, b_alone):
        np.testing.assert_allclose(ra.audio, sa.audio, atol=1e-5)
        np.testing.assert_allclose(rb.audio, sb.audio, atol=1e-5)
        assert ra.side["vad"] == pytest.approx(sa.side["vad"], abs=1e-4)
        assert rb.side["vad"] == pytest.approx(sb.side["vad"], abs=1e-4)
    assert np.abs(np.concatenate([r.audio for r in a_alone])).max() < 0.9  # the loud one was limited


async def test_streams_join_and_leave_mid_run(executor: Executor) -> None:
    await executor.preload("denoise:test_record")
    audio = speech_chunks("vctk_p286_011_48k.wav", 60)
    streams = [executor.open_stream("denoise:test_record", label=f"s{i}") for i in range(4)]
    seen: dict[str, list[float]] = {}
    for k in range(60):
        if k == 20:
            streams.append(executor.open_stream("denoise:test_record", label="late"))
        if k == 40:
            streams.pop(1).close()
        results = await tick(streams, [audio[k]] * len(streams))
        for stream, result in zip(streams, results):
            np.testing.assert_array_equal(result.audio, audio[k])
            seen.setdefault(stream.label, []).append(result.side["seq"])
    assert seen["late"] == list(range(1, 41)) and seen["s0"] == list(range(1, 61))
    assert RecordingStage.batch_sizes == [4] * 20 + [5] * 20 + [4] * 20
    assert executor.stats()["live_streams"] == 4 and executor.counters["bypass_deadline"] == 0


async def test_stage_loading_does_not_stall_anyone(executor: Executor) -> None:
    """A stream asking for a stage that is still loading runs without it meanwhile; others go on."""
    await executor.preload("limiter")
    running = executor.open_stream("limiter")
    loud = speech_chunks("vctk_p286_011_48k.wav", 200, gain=4.0, skip=100)
    newcomer = executor.open_stream("denoise:test_slow_load,limiter")
    k, unloaded = 0, 0
    while True:
        r_running, r_new = await tick([running, newcomer], [loud[k % 200], loud[k % 200]])
        assert not r_running.bypassed and not r_new.bypassed
        assert np.abs(r_running.audio).max() <= 10 ** (-1 / 20) + 1e-6
        k += 1
        if "seq" in r_new.side:
            break
        unloaded += 1
        await asyncio.sleep(0.005)
    assert unloaded > 5 and r_new.side["seq"] == 1  # it ran without the stage, then with it
    assert executor.counters["stage_unavailable"] == unloaded


async def test_early_submission_keeps_order(executor: Executor) -> None:
    """A stream that sends chunk k+1 before chunk k came back still gets every chunk in order."""
    await executor.preload("denoise:test_record")
    stream = executor.open_stream("denoise:test_record")
    audio = speech_chunks("cmu_arctic_a0010.wav", 12)
    results = await asyncio.gather(*(stream.process(c) for c in audio))
    assert [r.side["seq"] for r in results] == list(range(1, 13))
    for result, chunk in zip(results, audio):
        np.testing.assert_array_equal(result.audio, chunk)


async def test_raising_stage_fails_open(executor: Executor) -> None:
    await executor.preload("dereverb:test_faulty,denoise:test_record")
    stream = executor.open_stream("dereverb:test_faulty,denoise:test_record")
    audio = speech_chunks("vctk_p286_011_48k.wav", 30)
    for k in range(30):
        FaultyStage.mode = "raise" if 10 <= k < 20 else "ok"
        result = await stream.process(audio[k])
        expected = audio[k] if FaultyStage.mode == "raise" else audio[k] * 0.5
        np.testing.assert_allclose(result.audio, expected)
        assert result.side["seq"] == k + 1  # the other stage kept running
        assert result.bypassed == (FaultyStage.mode == "raise")
    assert executor.counters["bypass_error"] == 10
    assert executor.stats()["stages"]["dereverb:test_faulty"]["errors"] == 10


async def test_hanging_stage_never_stalls_audio() -> None:
    async for executor in make_executor(deadline_ms=30.0, stuck_after_ms=400.0):
        await executor.preload("dereverb:test_faulty,denoise:test_record")
        hung = executor.open_stream("dereverb:test_faulty,denoise:test_record")
        other = executor.open_stream("denoise:test_record")
        audio = speech_chunks("vctk_p286_011_48k.wav", 80)
        FaultyStage.mode = "hang"
        for k in range(80):
            r_hung, r_other = await asyncio.wait_for(tick([hung, other], [audio[k], audio[k]]), 5.0)
            # In order, never stalled: either processed or this very chunk passed through.
            for r in (r_hung, r_other):
                assert r.bypassed or "seq" in r.side
            np.testing.assert_allclose(r_other.audio, audio[k])
            if r_hung.bypassed:
                np.testing.assert_array_equal(r_hung.audio, audio[k])
            await asyncio.sleep(0.01)
        FaultyStage.mode = "ok"  # a retry after the backoff must not hang again
        assert executor.counters["bypass_deadline"] > 0
        assert executor.counters["stuck_restarts"] >= 1
        # The hung stage was disabled (for a backoff that may already be over on a slow machine: then it
        # hung again and was disabled again); the rest of the chain runs again for everyone.
        assert executor.stats()["stages"]["dereverb:test_faulty"]["faults"] >= 1
        processed = 0
        for k in range(20):
            r_hung, r_other = await tick([hung, other], [audio[k], audio[k]])
            processed += not r_hung.bypassed and not r_other.bypassed and "seq" in r_hung.side
        assert processed > 0


async def test_bypassed_chunks_keep_the_declared_latency() -> None:
    """A chunk passed through on deadline is the input delayed like the chain delays it."""
    async for executor in make_executor(deadline_ms=150.0):
        await executor.preload("aec:test_slow_delay")
        stream = executor.open_stream("aec:test_slow_delay")
        assert stream.latency_samples == 300
        audio = speech_chunks("vctk_p286_011_48k.wav", 40, skip=100)
        delayed = np.concatenate([np.zeros(300, dtype=np.float32), audio.reshape(-1)])
        results = [await stream.process(c) for c in audio]
        assert sum(r.bypassed for r in results) >= 3
        for k, result in enumerate(results):
            if result.bypassed or k < 10:
                np.testing.assert_array_equal(result.audio, delayed[k * CHUNK : (k + 1) * CHUNK])


async def test_set_stages_live(executor: Executor) -> None:
    await executor.preload("denoise:test_record,limiter")
    stream = executor.open_stream("denoise:test_record")
    loud = speech_chunks("vctk_p286_011_48k.wav", 30, gain=4.0, skip=100)
    first = [await stream.process(c) for c in loud[:10]]
    stream.set_stages(["limiter", "denoise:test_record"])
    assert stream.stages == ["denoise:test_record", "limiter"]
    second = [await stream.process(c) for c in loud[10:20]]
    stream.set_stages("limiter")
    stream.set_stages("limiter,denoise:test_record")  # removed then added back: fresh state
    third = [await stream.process(c) for c in loud[20:30]]
    assert max(np.abs(r.audio).max() for r in first) > 1.0
    assert max(np.abs(r.audio).max() for r in second + third) <= 10 ** (-1 / 20) + 1e-6
    assert [r.side["seq"] for r in first + second] == list(range(1, 21))
    assert [r.side["seq"] for r in third] == list(range(1, 11))


async def test_live_options_change_a_running_stream_without_resetting_it(executor: Executor) -> None:
    """``retune``: a live option applies from the next chunk on and the stage keeps the stream's state;
    any other option reopens the state fresh; the stage list stays what it was (no admission)."""
    await executor.preload("denoise:test_tunable")
    stream = executor.open_stream("denoise:test_tunable", {"denoise": {"gain": 1.0, "mode": "a"}})
    chunk = np.full(CHUNK, 0.1, dtype=np.float32)
    first = [await stream.process(chunk) for _ in range(5)]
    stream.retune({"denoise": {"gain": 0.5}})
    second = [await stream.process(chunk) for _ in range(5)]
    stream.retune({"denoise:test_tunable": {"mode": "b"}})
    third = [await stream.process(chunk) for _ in range(5)]
    assert [r.side["seq"] for r in first + second] == list(range(1, 11))  # the same state all along
    assert [r.side["seq"] for r in third] == list(range(1, 6))  # reopened
    assert [round(float(r.audio[0]), 3) for r in (first[-1], second[0], third[0])] == [0.1, 0.05, 0.05]
    assert stream.stages == ["denoise:test_tunable"]


async def test_unknown_stage_is_rejected(executor: Executor) -> None:
    with pytest.raises(ValueError, match="unknown stage"):
        executor.open_stream("denoise,bogus")
    stream = executor.open_stream("limiter")
    stream.close()
    stream.close()  # idempotent
    with pytest.raises(RuntimeError):
        await stream.process(np.zeros(CHUNK, dtype=np.float32))
