"""The executor as a service: two media processes' streams batched together in one service process.

A real ``enhancers serve-executor`` process on loopback; two executors (isolation ``remote``) in
this process stand for two media nodes.  Their streams' chunks are processed (a loud tone comes back
limited) in batches holding both clients; a client with the wrong token is refused and processes
locally; killing the service mid-stream costs no chunk (bypassed, then the local fallback), and
processing moves back to the service when it returns.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from enhancers.executor import Executor, ExecutorConfig, ExecutorStream

TOKEN = "test-token-1234"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_service(port: int) -> subprocess.Popen[str]:
    exe = Path(sys.executable).parent / "enhancers"
    return subprocess.Popen([str(exe), "serve-executor", "--listen", f"127.0.0.1:{port}", "--device", "cpu",
                             "--preload", "limiter"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "MEDIASERVER_EXECUTOR_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"})


async def _listening(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise AssertionError("the executor service did not start listening")


@pytest.fixture
async def service() -> AsyncIterator[tuple[int, list[subprocess.Popen[str]]]]:
    port = _free_port()
    procs = [_start_service(port)]
    try:
        await _listening(port)
        yield port, procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()


def _executor(port: int, token: str = TOKEN, name: str = "node", deadline_ms: float = 200.0) -> Executor:
    return Executor(ExecutorConfig(device="cpu", isolation="remote", remote_address=f"127.0.0.1:{port}",
                                   remote_token=token.encode(), remote_name=name, deadline_ms=deadline_ms))


TONE = (0.99 * np.sin(2 * np.pi * 440 * np.arange(480) / 48_000)).astype(np.float32)


async def _tick(streams: list[ExecutorStream]) -> list[tuple[float, bool]]:
    """One chunk of a full-scale tone through every stream: (peak of what came back, bypassed)."""
    results = await asyncio.gather(*(s.process(TONE) for s in streams))
    return [(float(np.max(np.abs(r.audio))), r.bypassed) for r in results]


async def _until_processed(streams: list[ExecutorStream], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await _tick(streams)
        if all(not bypassed and peak < 0.95 for peak, bypassed in got):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"chunks not processed within {timeout} s: {got}")


async def test_two_nodes_batched_in_one_service(service: tuple[int, list[subprocess.Popen[str]]]) -> None:
    port, _ = service
    a, b = _executor(port, name="node-a"), _executor(port, name="node-b")
    await a.start()
    await b.start()
    try:
        sa = [a.open_stream("limiter") for _ in range(3)]
        sb = [b.open_stream("limiter") for _ in range(2)]
        await _until_processed(sa + sb)
        for _ in range(100):  # one second of ticks, both nodes at once
            got = await _tick(sa + sb)
            assert all(not bypassed and peak < 0.95 for peak, bypassed in got), got
        stats = a.stats()["worker"]
        assert stats["state"] == "remote", stats
        await asyncio.sleep(0.6)  # the service's figures ride on its answers (twice a second)
        await _tick(sa + sb)
        figures = a.stats()["worker"]["service"]
        assert figures["clients"] == 2, figures
        assert figures["avg_clients_per_batch"] > 1.5, figures  # the two nodes' rows ran together
    finally:
        await a.close()
        await b.close()


async def test_wrong_token_is_refused_and_processes_locally(service: tuple[int, list[subprocess.Popen[str]]]) -> None:
    port, _ = service
    ex = _executor(port, token="not-the-token")
    await ex.start()
    try:
        streams = [ex.open_stream("limiter")]
        await _until_processed(streams)  # by the local fallback worker process
        worker = ex.stats()["worker"]
        assert worker["state"] == "fallback" and worker["connects"] == 0, worker
    finally:
        await ex.close()


async def test_service_killed_mid_stream_then_back(service: tuple[int, list[subprocess.Popen[str]]]) -> None:
    port, procs = service
    ex = _executor(port)
    await ex.start()
    try:
        streams = [ex.open_stream("limiter") for _ in range(2)]
        await _until_processed(streams)
        procs[0].kill()
        procs[0].wait()
        answered = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.0:  # every chunk is answered (unprocessed at worst) without a stall
            started = time.monotonic()
            await _tick(streams)
            assert time.monotonic() - started < 1.0, "a chunk waited more than a second"
            answered += 1
            await asyncio.sleep(0.01)
        assert answered > 50
        await _until_processed(streams)  # the local fallback took over
        assert ex.stats()["worker"]["state"] == "fallback"
        procs.append(_start_service(port))
        deadline = time.monotonic() + 120
        while ex.stats()["worker"]["state"] != "remote":
            assert time.monotonic() < deadline, "the service was not used again after it came back"
            await _tick(streams)
            await asyncio.sleep(0.05)
        await _until_processed(streams)
    finally:
        await ex.close()


async def test_live_call_survives_the_service_and_uses_it_again(
        service: tuple[int, list[subprocess.Popen[str]]], start_server) -> None:  # type: ignore[no-untyped-def]
    """A call whose stages run in the service: the service dies mid-call, the listener's audio goes on
    without a hole, and the stages run in the service again once it is back."""
    from dataclasses import replace

    from loadtest.bot import Bot
    from mediaserver.config import AuthConfig, EnhanceConfig, ServerConfig
    from tests.audio_checks import longest_silence_ms
    from tests.conftest import noise

    port, procs = service
    cfg = ServerConfig(host="127.0.0.1", port=0, auth=AuthConfig(dev_mode=True),
                       enhance=replace(EnhanceConfig(), default_stages=("limiter",), device="cpu",
                                       executor_url=f"127.0.0.1:{port}", executor_token=TOKEN))
    rs = await start_server(cfg)
    talker = Bot(rs.url, "remote", "talker", noise("running_tap.wav") * 4.0)  # continuous: holes show
    listener = Bot(rs.url, "remote", "listener", None)
    await talker.join()
    await listener.join()

    def worker() -> dict:  # type: ignore[type-arg]
        return rs.server.hub.executor.stats()["worker"]  # type: ignore[no-any-return]

    try:
        deadline = time.monotonic() + 60
        while worker()["state"] != "remote" or not rs.server.hub.executor.stats()["stages"].get("limiter"):
            assert time.monotonic() < deadline, worker()
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.0)
        t_kill = time.monotonic()
        procs[0].kill()
        await asyncio.sleep(4.0)
        heard = listener.received_from(talker.id, since=t_kill - 1.0)  # type: ignore[arg-type]
        assert len(heard) > 48_000 * 4
        gap = longest_silence_ms(heard[4800:])
        assert gap < 250.0, f"a {gap:.0f} ms hole when the executor service died"
        procs.append(_start_service(port))
        deadline = time.monotonic() + 120
        while worker()["state"] != "remote":
            assert time.monotonic() < deadline, worker()
            await asyncio.sleep(0.2)
        before = rs.server.hub.executor.stats()["stages"].get("limiter", {}).get("calls", 0)
        await asyncio.sleep(2.0)
        after = rs.server.hub.executor.stats()["stages"].get("limiter", {}).get("calls", 0)
        assert after > before, "the stages did not run in the service again"
    finally:
        await talker.leave()
        await listener.leave()


async def test_the_service_canceller_follows_a_jump_of_a_clients_mic_timeline(
        service: tuple[int, list[subprocess.Popen[str]]]) -> None:
    """``shift_near`` crosses the wire as a live option of the stream's aec stage in the service (its state
    kept): across a 20 ms skip of the mic's timeline the told stream keeps cancelling, the other leaks."""
    from tests.test_aec_streams import EVAL as AEC_EVAL
    from tests.test_aec_streams import check_the_told_canceller_follows

    if not (AEC_EVAL / "speech").is_dir():
        pytest.skip("shared eval recordings not present")
    await check_the_told_canceller_follows(_executor(service[0], deadline_ms=5_000.0))
