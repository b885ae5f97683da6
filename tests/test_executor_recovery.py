"""Processing comes back after faults of the executor's worker process, and a stage that keeps failing
is disabled with a reason while the others run.

Real worker processes, real stages (the limiter) and the fault stages of ``tests.fault_stages``.
Behaviour only: every wait is a generous poll, nothing is timed.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from enhancers import registry
from enhancers.executor import Executor, ExecutorStream
from enhancers.executor.recovery import RecoveryPolicy, StageFaults
from enhancers.stage import CHUNK
from tests.conftest import speech
from tests.test_executor_process import limited, limited_again, loud_chunks, make_executor, run_chunks

FAST = RecoveryPolicy(backoff_first_s=0.2, backoff_max_s=1.0, max_faults=2)


async def _kill_quietly(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # already replaced (killed by the executor): nothing to continue


async def _stage_state(executor: Executor, streams: list[ExecutorStream], spec: str, key: str,
                       want: object, timeout_s: float = 30.0) -> dict[str, object]:
    """Keep the streams going until the stats of ``spec`` have ``key == want``; returns those stats."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while True:
        stats = executor.stats()["stages"].get(spec, {})
        if stats.get(key, False) == want:
            return stats
        assert loop.time() < end, executor.stats()
        results = await asyncio.gather(*(run_chunks(s, loud_chunks(10)) for s in streams))
        assert all(len(r) == 10 for r in results)  # never stalled


def test_backoff_doubles_up_to_the_cap_then_disables_for_good() -> None:
    now = [0.0]
    faults = StageFaults(RecoveryPolicy(backoff_first_s=1.0, backoff_max_s=4.0, max_faults=4,
                                        fault_window_s=300.0), clock=lambda: now[0])
    delays = []
    for _ in range(4):
        delays.append(faults.fault("aec", "hung"))
        assert faults.disabled("aec") and "hung" in faults.describe("aec")["disabled_reason"]
        now[0] += 10.0
        assert faults.enable("aec") and not faults.disabled("aec")
    assert delays == [1.0, 2.0, 4.0, 4.0]
    assert faults.fault("aec", "hung") is None  # the 5th in the window
    described = faults.describe("aec")
    assert described["disabled"] and described["permanently_disabled"]
    assert "permanently disabled after 5 faults" in described["disabled_reason"]
    assert not faults.enable("aec")
    # faults out of the window no longer count
    other = StageFaults(RecoveryPolicy(max_faults=1, fault_window_s=60.0), clock=lambda: now[0])
    other.fault("vad", "hung")
    now[0] += 120.0
    assert other.fault("vad", "hung") == 1.0


@pytest.mark.parametrize("stop_s", [1.0, 4.0], ids=["shorter-than-stuck", "longer-than-stuck"])
async def test_a_stopped_worker_comes_back(stop_s: float) -> None:
    """SIGSTOP the worker, SIGCONT it later: audio flows meanwhile, and limiting comes back."""
    async for executor in make_executor(deadline_ms=40.0, stuck_after_ms=2000.0):
        await executor.preload("limiter")
        streams = [executor.open_stream("limiter") for _ in range(2)]
        assert await limited_again(streams)
        pid = executor.stats()["worker_pid"]
        os.kill(pid, signal.SIGSTOP)
        loop = asyncio.get_running_loop()
        resume = loop.call_later(stop_s, lambda: loop.create_task(_kill_quietly(pid, signal.SIGCONT)))
        try:
            during = await asyncio.gather(*(run_chunks(s, loud_chunks(int(stop_s * 100) + 50)) for s in streams))
            assert all(len(r) == int(stop_s * 100) + 50 for r in during)  # every chunk answered
            assert any(r.bypassed for r in during[0])  # while stopped: passed through, counted
            assert executor.counters["bypass_deadline"] + executor.counters["stage_unavailable"] > 0
            assert await limited_again(streams)
        finally:
            resume.cancel()
            await _kill_quietly(pid, signal.SIGCONT)
        stats = executor.stats()
        assert not stats["stages"]["limiter"].get("disabled"), stats
        assert stats["worker"]["state"] == "running"
        if stop_s > 2.0:
            assert executor.counters["stuck_restarts"] == 1 and stats["worker_pid"] != pid


async def test_repeated_kills_are_restarted_every_time() -> None:
    """The worker is killed four times in a row (it used to be given up after three deaths in 30 s)."""
    async for executor in make_executor(recovery=FAST):
        await executor.preload("limiter")
        stream = executor.open_stream("limiter")
        for kill in range(4):
            assert await limited_again([stream]), f"not limited again before kill {kill}"
            pid = executor.stats()["worker_pid"]
            os.kill(pid, signal.SIGKILL)
            results = await run_chunks(stream, loud_chunks(30))
            assert len(results) == 30
        assert await limited_again([stream])
        assert executor.counters["worker_restarts"] == 4
        assert not executor.stats()["stages"]["limiter"].get("disabled")


@pytest.mark.parametrize("isolation", ["process", "thread"])
async def test_a_stage_that_hung_once_comes_back_and_processes(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path, isolation: str) -> None:
    monkeypatch.setitem(registry.STAGES, "denoise:hangonce", "tests.fault_stages:HangOnceStage")
    monkeypatch.setenv("HANG_ONCE_FLAG", str(tmp_path / "hung"))
    async for executor in make_executor(deadline_ms=40.0, stuck_after_ms=500.0, recovery=FAST,
                                        isolation=isolation):
        await executor.preload("denoise:hangonce,limiter")
        stream = executor.open_stream("denoise:hangonce")
        other = executor.open_stream("limiter")
        faulted = await _stage_state(executor, [stream, other], "denoise:hangonce", "faults", 1)
        assert "hung" in str(faulted.get("disabled_reason") or faulted.get("last_fault")), faulted
        await _stage_state(executor, [stream, other], "denoise:hangonce", "disabled", False)
        loop = asyncio.get_running_loop()
        end = loop.time() + 30.0
        while True:  # the fresh instance halves the input (a bypassed chunk keeps it at full scale)
            results = await run_chunks(stream, loud_chunks(20))
            halved = [r for r in results if not r.bypassed and float(abs(r.audio).max()) < 0.75 * 2.0]
            if len(halved) >= 10:
                break
            assert loop.time() < end, executor.stats()
        assert executor.counters["stage_recoveries"] >= 1
        assert sum(limited(r) for r in await run_chunks(other, loud_chunks(20))) >= 15


async def test_a_stage_that_always_crashes_the_worker_is_disabled_and_the_rest_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(registry.STAGES, "denoise:crash", "tests.fault_stages:CrashingStage")
    async for executor in make_executor(recovery=FAST):
        await executor.preload("limiter")
        crashing = executor.open_stream("denoise:crash,limiter")
        other = executor.open_stream("limiter")
        stats = await _stage_state(executor, [crashing, other], "denoise:crash", "permanently_disabled", True)
        assert stats["disabled"] and "crashed the worker process" in str(stats["disabled_reason"]), stats
        assert "permanently disabled after 3 faults" in str(stats["disabled_reason"]), stats
        # bounded: one restart per fault, no storm
        assert executor.counters["worker_restarts"] == 3, executor.counters
        assert await limited_again([crashing, other])  # the limiter runs for both, the worker stays up
        pid = executor.stats()["worker_pid"]
        await run_chunks(crashing, loud_chunks(50))
        assert executor.stats()["worker_pid"] == pid and executor.counters["worker_restarts"] == 3


async def test_a_stopped_executor_does_not_leak_echo() -> None:
    """The worker is stopped while a stream runs the aec: its chunks go out unprocessed, but echo-only input
    is attenuated by >= 10 dB while the far end is active, and near-end speech with a silent far end is not."""
    far = speech(seconds=3.0).astype(np.float32)
    delay = 4_800  # 100 ms echo path
    echo = (0.5 * np.concatenate([np.zeros(delay, np.float32), far])[: len(far)]).astype(np.float32)
    n = len(far) // CHUNK
    async for executor in make_executor(deadline_ms=40.0, stuck_after_ms=120_000.0):  # stays stopped
        await executor.preload("aec")
        stream = executor.open_stream("aec")
        near = speech("cmu_arctic_us_aew_a0002.wav", seconds=1.0).astype(np.float32)
        pid = executor.stats()["worker_pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            alone = [await stream.process(near[i * CHUNK:(i + 1) * CHUNK]) for i in range(len(near) // CHUNK)]
            assert all(r.bypassed for r in alone)
            sent = near[: len(alone) * CHUNK]
            assert np.allclose(np.concatenate([r.audio for r in alone]), sent)  # far end silent: untouched
            results = []
            for i in range(n):
                results.append(await stream.process(echo[i * CHUNK:(i + 1) * CHUNK], far[i * CHUNK:(i + 1) * CHUNK]))
        finally:
            await _kill_quietly(pid, signal.SIGCONT)
        assert all(r.bypassed for r in results)  # the executor was stopped throughout
        active = slice(20, n)  # after the far end started
        out = np.concatenate([r.audio for r in results[active]])
        inp = echo[active.start * CHUNK: n * CHUNK]
        attenuation_db = 10 * np.log10(float(np.sum(inp * inp)) / max(float(np.sum(out * out)), 1e-12))
        print(f"echo attenuated by {attenuation_db:.1f} dB while the executor was stopped")
        assert attenuation_db >= 10.0


async def test_echo_is_gated_while_the_aec_stage_is_missing_from_a_running_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker runs the stream's other stages, but not its aec (here: it fails to load; the same holds
    while it loads into a restarted worker or waits out a fault backoff): no raw echo goes out either."""
    monkeypatch.setitem(registry.STAGES, "aec:missing", "tests.no_such_module:Stage")
    far = speech(seconds=2.0).astype(np.float32)
    echo = (0.3 * np.concatenate([np.zeros(4_800, np.float32), far])[: len(far)]).astype(np.float32)
    n = len(far) // CHUNK
    async for executor in make_executor():
        await executor.preload("limiter")
        stream = executor.open_stream("aec:missing,limiter")
        results = await run_chunks(stream, np.zeros((20, CHUNK), np.float32))  # the failed load is reported
        results = [await stream.process(echo[i * CHUNK:(i + 1) * CHUNK], far[i * CHUNK:(i + 1) * CHUNK])
                   for i in range(n)]
        ran = [i for i, r in enumerate(results) if not r.bypassed and i >= 20]
        assert len(ran) >= 0.8 * (n - 20), "the limiter did not run"
        out = np.concatenate([results[i].audio for i in ran])
        inp = np.concatenate([echo[i * CHUNK:(i + 1) * CHUNK] for i in ran])
        attenuation_db = 10 * np.log10(float(np.sum(inp * inp)) / max(float(np.sum(out * out)), 1e-12))
        assert attenuation_db >= 10.0, attenuation_db
