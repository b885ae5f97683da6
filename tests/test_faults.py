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
from pathlib import Path

import aiohttp
import pytest

from enhancers import registry
from loadtest.bot import Bot
from tests import fault_stages
from tests.audio_checks import content_match, looped
from tests.conftest import RunningServer, ServerFactory, speech


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
