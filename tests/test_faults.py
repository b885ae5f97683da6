"""Faults: broken stages fail open end to end, garbage on the media port, SIGTERM drains."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from enhancers import registry
from loadtest.bot import Bot
from mediaserver.config import AuthConfig, EnhanceConfig, LimitsConfig, ServerConfig
from tests import fault_stages
from tests.audio_checks import content_match, looped
from tests.conftest import RunningServer, ServerFactory, noise, speech


@pytest.mark.parametrize("spec,target", [("limiter:raise", "RaisingStage"), ("limiter:hang", "HangingStage")])
async def test_broken_stage_fails_open_in_a_call(start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch,
                                                 spec: str, target: str) -> None:
    monkeypatch.setitem(registry.STAGES, spec, f"tests.fault_stages:{target}")
    fault_stages.RELEASE.clear()
    rs = await start_server(stages=(spec,))
    src = speech()
    talker = Bot(rs.url, "f", "talker", src)
    listener = Bot(rs.url, "f", "listener", None)
    await talker.join()
    await listener.join()
    try:
        await asyncio.sleep(4.0)
        got = listener.received_from(talker.id)  # type: ignore[arg-type]
        assert len(got) > 48_000 * 2.5, "audio stalled behind a broken stage"
        assert content_match(got[48_000:], looped(src)) > 0.5
        stats = rs.server.hub.stats()
        counter = "bypass_error" if target == "RaisingStage" else "bypass_deadline"
        assert stats[counter] > 100, stats
    finally:
        fault_stages.RELEASE.set()
        await talker.leave()
        await listener.leave()


def _tone_share(frame: np.ndarray) -> float:
    """Share of a frame's energy at the FlakyGpuStage tone: ~1 for processed audio, ~0 for speech."""
    energy = float(np.sum(frame * frame))
    if energy < 1e-6:
        return 0.0
    n = np.arange(len(frame))
    bin_ = np.sum(frame * np.exp(-2j * np.pi * fault_stages.TONE_HZ * n / 48_000))
    return float(2 * abs(bin_) ** 2 / len(frame) / energy)


def _longest_unprocessed_ms(bot: Bot, publisher: str, since: float) -> tuple[float, int]:
    """Longest stretch of media time (RTP timestamps) that arrived without the stage's tone, or not at all."""
    frames = sorted((pts, block) for rec in bot.recordings.values() if rec.participant == publisher
                    for block, t, pts in zip(rec.blocks, rec.arrivals, rec.pts) if t >= since and pts >= 0)
    longest = run = 0
    previous_end: int | None = None
    for pts, block in frames:
        missing = pts - previous_end if previous_end is not None and pts > previous_end else 0
        if _tone_share(block) > 0.8:
            run = missing
        else:
            run += missing + len(block)
        longest = max(longest, run)
        previous_end = pts + len(block)
    return longest / 48.0, len(frames)


@pytest.mark.parametrize("unreachable", [False, True], ids=["state-moved", "stage-reloaded"])
async def test_gpu_lost_mid_call_falls_back_to_cpu(start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path, unreachable: bool) -> None:
    """The accelerator fails under a live call (simulated: no GPU in CI): the listener keeps hearing processed
    audio, with at most a short stretch of unprocessed input while the stages move to the CPU."""
    spec = "limiter:flakygpu"
    monkeypatch.setitem(registry.STAGES, spec, "tests.fault_stages:FlakyGpuStage")
    monkeypatch.setenv("FLAKY_GPU_FLAG", str(tmp_path / "gpu"))
    rs = await start_server(stages=(spec,))
    talker = Bot(rs.url, "gpu", "talker", speech())
    listener = Bot(rs.url, "gpu", "listener", None)
    await talker.join()
    await listener.join()
    try:
        await asyncio.sleep(2.0)
        before = listener.received_from(talker.id)  # type: ignore[arg-type]
        assert np.median([_tone_share(b) for b in before[-48_000:].reshape(-1, 960)]) > 0.8, "stage not running"
        t_fault = time.monotonic()
        fault_stages.lose_gpu("cuda-error", unreachable=unreachable)
        await asyncio.sleep(4.0)
        stats = rs.server.hub.stats()
        assert stats["device_fallbacks"] == 1 and stats["device"] == "cpu", stats
        gap_ms, frames = _longest_unprocessed_ms(listener, talker.id, t_fault - 0.5)  # type: ignore[arg-type]
        assert frames > 4.0 / 0.02 * 0.8, "audio stalled after the device failed"
        assert gap_ms <= 200.0, f"{gap_ms:.0f} ms without processed audio"
        async with aiohttp.ClientSession() as http:
            text = await (await http.get(f"{rs.url}/metrics")).text()
        assert re.search(r"^mediaserver_executor_device_fallbacks_total\{[^}]*\} 1(\.0)?$", text, re.M), \
            [line for line in text.splitlines() if "fallbacks" in line]
    finally:
        await talker.leave()
        await listener.leave()


async def test_stopped_worker_in_a_call_comes_back(start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    """SIGSTOP the executor worker for 4 s, then SIGCONT: the call goes on unprocessed meanwhile, and the
    stage (its output is a tone: processed audio is recognisable) comes back without a server restart."""
    spec = "limiter:tone"
    monkeypatch.setitem(registry.STAGES, spec, "tests.fault_stages:FlakyGpuStage")
    monkeypatch.setenv("FLAKY_GPU_FLAG", str(tmp_path / "gpu"))  # never written: the stage just works
    rs = await start_server(stages=(spec,))
    talker = Bot(rs.url, "stop", "talker", speech())
    listener = Bot(rs.url, "stop", "listener", None)
    await talker.join()
    await listener.join()

    def processed_since(t: float) -> float:
        got = listener.received_from(talker.id, since=t)  # type: ignore[arg-type]
        frames = got[: len(got) // 960 * 960].reshape(-1, 960)
        return float(np.median([_tone_share(b) for b in frames])) if len(frames) >= 10 else 0.0

    pid = rs.server.hub.executor.stats()["worker_pid"]
    try:
        await asyncio.sleep(2.0)
        assert processed_since(time.monotonic() - 1.0) > 0.8, "stage not running"
        os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(4.0)
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass  # killed as hung and replaced already
        t_cont = time.monotonic()
        heard_during = listener.received_from(talker.id, since=t_cont - 4.0)  # type: ignore[arg-type]
        assert len(heard_during) > 48_000 * 2.5, "audio stalled while the worker was stopped"
        give_up = t_cont + 30.0  # a hang guard, not a speed check
        while processed_since(time.monotonic() - 1.0) < 0.8:
            assert time.monotonic() < give_up, rs.server.hub.stats()
            await asyncio.sleep(0.5)
        async with aiohttp.ClientSession() as http:
            health = await (await http.get(f"{rs.url}/healthz")).json()
            text = await (await http.get(f"{rs.url}/metrics")).text()
        executor = health["executor"]
        assert not executor["stages"][spec].get("disabled"), executor
        assert executor["bypass_deadline"] + executor["stage_unavailable"] > 0, executor  # counted, visible
        assert re.search(r'^mediaserver_executor_stage_disabled\{[^}]*stage="limiter:tone"[^}]*\} 0(\.0)?$', text,
                         re.M), [line for line in text.splitlines() if "stage_disabled" in line]
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        await talker.leave()
        await listener.leave()


async def test_garbage_udp_at_the_media_port_does_not_hurt(server: RunningServer) -> None:
    src = speech()
    a = Bot(server.url, "g", "a", src)
    b = Bot(server.url, "g", "b", None)
    await a.join()
    await b.join()
    try:
        # the server's ICE/RTP ports from its answer to b
        sdp = b.pc.remoteDescription.sdp
        ports = {int(p) for p in re.findall(r"a=candidate:\S+ \d+ udp \d+ 127\.0\.0\.1 (\d+)", sdp)}
        ports |= {int(p) for p in re.findall(r"a=candidate:\S+ \d+ udp \d+ \S+ (\d+) typ host", sdp)}
        assert ports
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        t0 = time.monotonic()
        rng = __import__("random").Random(7)
        for i in range(3000):
            size = rng.choice([1, 12, 100, 1200, 1500])
            first = rng.choice([0x00, 0x01, 0x16, 0x80, 0x90, 0xFF])  # STUN, DTLS, RTP-looking and junk
            payload = bytes([first]) + rng.randbytes(size - 1)
            for port in ports:
                sock.sendto(payload, ("127.0.0.1", port))
            if i % 100 == 0:
                await asyncio.sleep(0.01)
        sock.close()
        await asyncio.sleep(2.0)
        heard = b.received_from(a.id, since=t0)  # type: ignore[arg-type]
        assert len(heard) > 48_000 * (time.monotonic() - t0 - 0.5)
        assert content_match(heard, looped(src)) > 0.5
        async with aiohttp.ClientSession() as http:
            assert (await http.get(f"{server.url}/healthz")).status == 200
    finally:
        await a.leave()
        await b.leave()


def _cut_media_path(bot: Bot) -> None:
    """The bot's network goes dead for media: nothing it sends leaves, nothing reaches it; its WebSocket stays."""
    transports = {}
    for t in bot.pc.getTransceivers():
        for end in (t.sender, t.receiver):
            ice = end.transport.transport._connection  # aiortc RTCDtlsTransport -> RTCIceTransport -> aioice
            for protocol in ice._protocols:
                transports[id(protocol.transport)] = protocol.transport
    assert transports
    for udp in transports.values():
        udp.pause_reading()
        udp.sendto = lambda *args, **kwargs: None  # type: ignore[method-assign]


async def test_client_vanishing_with_its_websocket_open_is_removed(start_server: ServerFactory) -> None:
    timeout_s = 3.0
    config = ServerConfig(host="127.0.0.1", port=0, auth=AuthConfig(dev_mode=True),
                          enhance=replace(EnhanceConfig(), default_stages=(), device="cpu"),
                          limits=replace(LimitsConfig(), peer_timeout_s=timeout_s))
    rs = await start_server(config)
    talker = Bot(rs.url, "vanish", "talker", speech())
    listener = Bot(rs.url, "vanish", "listener", None)  # sends no audio: consent checks and RTCP only
    ghost = Bot(rs.url, "vanish", "ghost", noise(seconds=2.0))
    for bot in (talker, listener, ghost):
        await bot.join()
    try:
        await asyncio.sleep(timeout_s + 1.5)  # live clients, the silent listener included, are not removed
        room = rs.server.rooms.get("vanish")
        assert set(room.participants) == {talker.id, listener.id, ghost.id}
        ghost_p = room.participants[ghost.id]  # type: ignore[index]
        ghost_stream = ghost_p.published
        assert ghost_stream is not None and not ghost_stream.closed
        t_cut = time.monotonic()
        _cut_media_path(ghost)
        give_up = t_cut + timeout_s + 20.0  # a hang guard, not a speed check
        while not [e for e in listener.events_of("participant-left") if e["participant"]["id"] == ghost.id]:
            assert time.monotonic() < give_up, "the vanished client was never removed"
            await asyncio.sleep(0.1)
        removed_after = time.monotonic() - t_cut
        for bot in (talker, listener):
            left = [e for e in bot.events_of("participant-left") if e["participant"]["id"] == ghost.id]
            assert left and left[0]["reason"] == "timed out", bot.events_of("participant-left")
        assert set(room.participants) == {talker.id, listener.id}
        assert ghost_stream.closed and ghost_stream.id not in room.streams  # its stream is freed
        assert ghost_p.session.closed and ghost_p.session.pc.connectionState == "closed"  # type: ignore[attr-defined]
        assert ghost._ws is not None and not ghost._ws.closed  # the WebSocket itself was never closed
        assert [e for e in ghost.events_of("bye") if e["reason"].startswith("nothing received")]
        print(f"vanished client removed {removed_after:.1f} s after its media path was cut "
              f"(peer_timeout_s={timeout_s})")
        t_after = time.monotonic()
        await asyncio.sleep(1.0)
        heard = listener.received_from(talker.id, since=t_after)  # type: ignore[arg-type]
        assert content_match(heard, looped(speech())) > 0.5  # the others go on
    finally:
        for bot in (talker, listener, ghost):
            await bot.leave()


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def test_sigterm_drains_gracefully(tmp_path: Path) -> None:
    port = _free_port()
    exe = Path(sys.executable).parent / "mediaserver"
    proc = subprocess.Popen([str(exe), "serve", "--dev", "--host", "127.0.0.1", "--port", str(port),
                             "--stages", "vad"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                try:
                    if (await http.get(f"{url}/healthz")).status == 200:
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
        bot = Bot(url, "drain", "bot", speech())
        await bot.join()
        await asyncio.sleep(1.0)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 20)
        assert rc == 0
        assert time.monotonic() - t0 < 15
        await asyncio.sleep(0.2)
        assert any(e["type"] == "bye" for e in bot.events), "participants were not told"
        out = proc.stdout.read() if proc.stdout else ""
        assert "Traceback" not in out, out[-2000:]
        await bot.leave()
    finally:
        if proc.poll() is None:
            proc.kill()
        json.dumps({})


async def test_leaving_while_connecting_frees_the_participant(server: RunningServer) -> None:
    """A client that leaves right after the answer, before DTLS is up, leaves nothing behind.

    aiortc's connect task can start a receiver after ``close()``; its RTCP task then ran
    forever and, through the liveness hook, kept the participant, its room and streams.
    """
    import gc
    import weakref

    talker = Bot(server.url, "churn", "talker", speech())
    listener = Bot(server.url, "churn", "listener", None)
    await talker.join()
    await listener.join()
    try:
        room = server.server.rooms.get("churn")
        gone: list[weakref.ref[object]] = []
        for k in range(6):
            quick = Bot(server.url, "churn", f"quick{k}", noise(seconds=1.0))
            await quick.join()  # returns at the answer, while ICE/DTLS are still going
            gone.append(weakref.ref(room.participants[quick.id]))  # type: ignore[index]
            await quick.leave()
        deadline = time.monotonic() + 10.0  # a hang guard, not a speed check
        while set(room.participants) != {talker.id, listener.id}:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the quick leavers were not removed"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # let aiortc's connect tasks run to their end
        gc.collect()
        alive = [ref() for ref in gone if ref() is not None]
        assert not alive, f"{len(alive)} of {len(gone)} participants that left are still in memory"
        t_after = time.monotonic()
        await asyncio.sleep(1.0)
        heard = listener.received_from(talker.id, since=t_after)  # type: ignore[arg-type]
        assert content_match(heard, looped(speech())) > 0.5  # the others go on
    finally:
        await talker.leave()
        await listener.leave()
