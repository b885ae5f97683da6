"""``mediaserver serve --workers 2``: rooms on two media worker processes behind one port.

The real command, real aiortc participants over loopback: each room is placed on a worker of
its own and its participants hear each other through the front's proxy; the page, the API and
the metrics come through the one public port; a worker that dies is started again while the
other worker's call goes on, and its participants can join again.
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
from typing import Any

import aiohttp
import pytest

from loadtest.bot import Bot, JoinError
from tests.audio_checks import content_match, looped
from tests.conftest import speech


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _health(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/healthz") as resp:
            return resp.status, await resp.json()


async def _wait_healthy(url: str, timeout: float = 240.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, body = await _health(url)
            if status == 200:
                return body
        except (aiohttp.ClientError, ValueError):
            pass
        await asyncio.sleep(0.25)
    raise AssertionError("the server did not become healthy")


async def _serve(env: dict[str, str]) -> AsyncIterator[tuple[str, subprocess.Popen[str]]]:
    port = _free_port()
    exe = Path(sys.executable).parent / "mediaserver"
    proc = subprocess.Popen([str(exe), "serve", "--dev", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "2", "--stages", ""],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "MEDIASERVER_QUALITY": "0", **env})
    url = f"http://127.0.0.1:{port}"
    try:
        await _wait_healthy(url)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[str, subprocess.Popen[str]]]:
    async for served in _serve({}):
        yield served


@pytest.fixture
async def spanning() -> AsyncIterator[tuple[str, subprocess.Popen[str]]]:
    """Two workers, at most two participants of a room on one of them: a room of four spans both."""
    async for served in _serve({"MEDIASERVER_ROOM_SPILL_AFTER": "2"}):
        yield served


@pytest.fixture
async def small_workers() -> AsyncIterator[tuple[str, subprocess.Popen[str]]]:
    """Two workers that each count themselves full from two participants on (any busy share is over a
    join_busy_limit of 0), as two full cores would."""
    async for served in _serve({"MEDIASERVER_JOIN_BUSY_LIMIT": "0", "MEDIASERVER_JOIN_MIN_PARTICIPANTS": "2"}):
        yield served


async def _hears(listener: Bot, talker: Bot, source: Any, seconds: float = 3.0, since: float = 0.0) -> float:
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        got = listener.received_from(talker.id, since=since) if talker.id else []  # type: ignore[arg-type]
        if len(got) > 48_000 * seconds:
            return content_match(got[24_000:], looped(source))
        await asyncio.sleep(0.25)
    raise AssertionError(f"{listener.name} did not receive {seconds} s of {talker.name}")


async def test_rooms_on_two_workers_behind_one_port(cluster: tuple[str, subprocess.Popen[str]]) -> None:
    url, proc = cluster
    a_src, b_src = speech("cmu_arctic_us_aew_a0001.wav"), speech("cmu_arctic_us_axb_a0004.wav")
    a, b = Bot(url, "north", "a", a_src), Bot(url, "north", "b", b_src)
    c, d = Bot(url, "south", "c", a_src), Bot(url, "south", "d", b_src)
    for bot in (a, b, c, d):
        await bot.join()
    try:
        assert await _hears(a, b, b_src) > 0.5
        assert await _hears(b, a, a_src) > 0.5
        assert await _hears(d, c, a_src) > 0.5
        status, health = await _health(url)
        assert status == 200 and health["status"] == "ok", health
        placement = health["placement"]
        assert {placement["north"], placement["south"]} == {0, 1}, placement  # one room on each worker
        assert health["participants"] == 4
        async with aiohttp.ClientSession() as http:
            page = await http.get(f"{url}/")
            assert page.status == 200 and "<html" in (await page.text()).lower()
            rooms = await (await http.get(f"{url}/api/rooms")).json()
            assert {r["id"]: r["worker"] for r in rooms["rooms"]} == placement
            north = await (await http.get(f"{url}/api/rooms/north")).json()
            assert {p["name"] for p in north["participants"]} == {"a", "b"}
            missing = await http.get(f"{url}/api/rooms/nowhere")
            assert missing.status == 404 and (await missing.json())["error"] == "unknown-room"
            text = await (await http.get(f"{url}/metrics")).text()
            assert 'worker="0"' in text and 'worker="1"' in text
            types = [line for line in text.splitlines() if line.startswith("# TYPE ")]
            assert len(types) == len(set(types)), "a metric family is declared twice"
            # a live change through the API reaches the room's worker
            put = await http.put(f"{url}/api/rooms/south/stages", json={"stages": "limiter"})
            assert put.status == 200 and (await put.json())["stages"] == ["limiter"]
        # the worker of 'south' dies: 'north' goes on; c and d are told, and can join again
        south = placement["south"]
        pid = next(w["pid"] for w in health["workers"] if w["index"] == south)
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        deadline = time.monotonic() + 20
        while not (c.events_of("error") and any(e.get("code") == "worker-restarted" for e in c.events_of("error"))):
            assert time.monotonic() < deadline, "c was not told that its worker restarted"
            await asyncio.sleep(0.1)
        north_listener = a if placement["north"] != south else c
        assert await _hears(north_listener, b, b_src, seconds=2.0, since=t_kill) > 0.5
        health = await _wait_healthy(url, timeout=120)
        assert health["participants"] == 2
        await c.leave()
        await d.leave()
        c, d = Bot(url, "south", "c2", a_src), Bot(url, "south", "d2", b_src)
        await c.join()
        await d.join()
        assert await _hears(d, c, a_src) > 0.5
    finally:
        for bot in (a, b, c, d):
            await bot.leave()


async def test_front_answers_before_join_and_drains(cluster: tuple[str, subprocess.Popen[str]]) -> None:
    url, proc = cluster
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{url.replace('http', 'ws')}/ws") as ws:
            await ws.send_json({"type": "ping"})
            assert (await ws.receive_json(timeout=5))["type"] == "pong"
            await ws.send_json({"type": "offer", "sdp": "x"})
            assert (await ws.receive_json(timeout=5))["code"] == "not-joined"
            await ws.send_json({"type": "join", "room": "bad room!"})
            assert (await ws.receive_json(timeout=5))["code"] == "bad-room"
            await ws.send_json({"type": "join", "room": "ok", "version": 99})
            assert (await ws.receive_json(timeout=5))["code"] == "unsupported-version"  # the worker's answer
    bot = Bot(url, "drain", "bot", speech())
    await bot.join()
    proc.send_signal(signal.SIGTERM)
    rc = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30)
    assert rc == 0
    await asyncio.sleep(0.2)
    assert any(e["type"] == "bye" for e in bot.events), "participants were not told"
    out = proc.stdout.read() if proc.stdout else ""
    assert "Traceback" not in out, out[-3000:]
    await bot.leave()


async def test_a_room_spanning_two_workers(spanning: tuple[str, subprocess.Popen[str]]) -> None:
    """Four participants, two on each worker: everyone hears everyone (streams relayed once per worker),
    the room lists all four, a leave on one worker is seen on the other, and when a worker dies the
    participants of the other one are told and keep talking."""
    url, proc = spanning
    names = ["cmu_arctic_us_aew_a0001.wav", "cmu_arctic_us_axb_a0004.wav", "cmu_arctic_a0010.wav",
             "vctk_p286_011_48k.wav"]
    sources = [speech(n) for n in names]
    bots = [Bot(url, "big", f"p{i}", src) for i, src in enumerate(sources)]
    for bot in bots:
        await bot.join()
    try:
        for i, listener in enumerate(bots):
            for j, talker in enumerate(bots):
                if i != j:
                    assert await _hears(listener, talker, sources[j]) > 0.5, (listener.name, talker.name)
        _, health = await _health(url)
        assert health["spanning_rooms"] == {"big": ["w0", "w1"]}, health["spanning_rooms"]
        assert sorted(w["rooms"].get("big", 0) for w in health["workers"]) == [2, 2]
        async with aiohttp.ClientSession() as http:
            room = await (await http.get(f"{url}/api/rooms/big")).json()
        assert {p["name"] for p in room["participants"]} == {"p0", "p1", "p2", "p3"}
        # who is where: the first two joined the room's first worker
        relayed = [s for w in health["workers"] for s in [w["health"]["relay"]] if s]
        assert all(r["received"] > 0 and r["sent"] > 0 for r in relayed), relayed
        async with aiohttp.ClientSession() as http:  # a prompt to p3 (on the second worker) goes there
            said = await http.post(f"{url}/api/rooms/big/prompts", json={"text": "Hello there.", "to": bots[3].id})
            assert said.status == 202, await said.text()
        deadline = time.monotonic() + 20
        while not any(e.get("to") == bots[3].id for e in bots[3].events_of("prompt.started")):
            assert time.monotonic() < deadline, "the prompt to a participant of the other worker was not played"
            await asyncio.sleep(0.1)
        # p3 (second worker) leaves: p0 (first worker) is told
        gone = bots.pop(3)
        await gone.leave()
        deadline = time.monotonic() + 10
        while not any(e["participant"]["id"] == gone.id for e in bots[0].events_of("participant-left")):
            assert time.monotonic() < deadline, "a leave on one worker was not seen on the other"
            await asyncio.sleep(0.1)
        # the second worker dies: p2 (on it) is gone for p0 and p1, who keep hearing each other
        second = next(w for w in health["workers"] if w["index"] != health["placement"]["big"])
        os.kill(second["pid"], signal.SIGKILL)
        t_kill = time.monotonic()
        deadline = time.monotonic() + 20
        while not any(e["participant"]["id"] == bots[2].id for e in bots[0].events_of("participant-left")):
            assert time.monotonic() < deadline, "the participants of a dead worker were not removed"
            await asyncio.sleep(0.1)
        assert await _hears(bots[0], bots[1], sources[1], seconds=2.0, since=t_kill) > 0.5
    finally:
        for bot in bots:
            await bot.leave()


@pytest.fixture
async def cluster_with_sip(tmp_path: Path) -> AsyncIterator[tuple[str, int, subprocess.Popen[str]]]:
    from tests.test_sip_support import free_port

    sip_port = free_port()
    port = _free_port()
    exe = Path(sys.executable).parent / "mediaserver"
    proc = subprocess.Popen([str(exe), "serve", "--dev", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "2", "--stages", "", "--sip-port", str(sip_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "MEDIASERVER_QUALITY": "0"})
    url = f"http://127.0.0.1:{port}"
    try:
        await _wait_healthy(url)
        yield url, sip_port, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_phone_on_worker_zero_talks_with_a_room_on_worker_one(
        cluster_with_sip: tuple[str, int, subprocess.Popen[str]], tmp_path: Path) -> None:
    """The SIP bridge runs on worker 0; a phone joins a room placed on worker 1: the room spans both
    workers and the phone and the WebRTC participant hear each other."""
    import numpy as np
    import soundfile as sf
    from scipy.signal import resample_poly

    from enhancers.audio_io import read_48k
    from tests.test_sip_baresip import Baresip
    from tests.test_sip_support import needs_baresip, telephone_band

    if needs_baresip.args[0]:
        pytest.skip("baresip is not installed")
    url, sip_port, proc = cluster_with_sip
    room = "7788"
    filler = Bot(url, "filler", "filler", speech())  # takes worker 0: the phone's room goes to worker 1
    await filler.join()
    bot_voice = speech("cmu_arctic_us_aew_a0001.wav")
    bot = Bot(url, room, "webrtc", bot_voice)
    await bot.join()
    phone_voice = speech("cmu_arctic_us_axb_a0005.wav")
    mic = tmp_path / "phone-mic.wav"
    sf.write(mic, resample_poly(looped(phone_voice, 12), 1, 6).astype(np.float32), 8000, subtype="PCM_16")
    mic_48k = read_48k(mic)
    phone = Baresip(tmp_path, mic)
    await phone.start()
    try:
        _, health = await _health(url)
        assert health["placement"][room] == 1, health["placement"]
        await phone.command("dial", f"sip:ivr@127.0.0.1:{sip_port}")
        await asyncio.sleep(8.0)  # the spoken menu
        await phone.command("sndcode", f"{room}#")
        phone_id = None
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as http:
            while phone_id is None:
                assert time.monotonic() < deadline, "the phone did not join the room"
                state = await (await http.get(f"{url}/api/rooms/{room}")).json()
                phone_id = next((p["id"] for p in state.get("participants", []) if p.get("kind") == "sip"), None)
                await asyncio.sleep(0.25)
        _, health = await _health(url)
        assert health["spanning_rooms"].get(room) == ["w0", "w1"], health["spanning_rooms"]
        t0 = time.monotonic()
        await asyncio.sleep(5.0)
        heard_by_bot = bot.received_from(phone_id, since=t0)
        await phone.command("hangup")
        await asyncio.sleep(0.5)
    finally:
        await phone.stop()
        await bot.leave()
        await filler.leave()
    assert len(heard_by_bot) > 48_000 * 3, "the phone's audio did not reach the WebRTC participant"
    assert content_match(heard_by_bot[24_000:], looped(mic_48k, 2)) > 0.5
    room_part = phone.received()[-4 * 48_000:]
    assert content_match(room_part, looped(telephone_band(bot_voice), 4)) > 0.45


async def _counted_full(url: str, first: bool) -> None:
    """Wait until the room's worker (``first``) or the other one has two participants and has read its load
    over a span with them in (before that its join gate lets newcomers in: no reading to predict from)."""
    deadline = time.monotonic() + 20
    while True:
        _, health = await _health(url)
        worker = next(w for w in health["workers"] if (w["index"] == health["placement"]["busy"]) == first)
        load = worker["health"]["load"]
        if load["predicted_busy"] is not None and worker["health"]["participants"] == 2:
            return
        assert time.monotonic() < deadline, load
        await asyncio.sleep(0.25)


async def test_a_full_worker_leaves_newcomers_to_the_other_and_the_room_spans(
        small_workers: tuple[str, subprocess.Popen[str]]) -> None:
    """The room's worker refuses a join (server-busy: its core is full): the front takes the newcomer to the
    other worker, the room spans both and everyone hears everyone; only when both are full is the
    newcomer refused."""
    url, _ = small_workers
    names = ["cmu_arctic_us_aew_a0001.wav", "cmu_arctic_us_axb_a0004.wav", "cmu_arctic_a0010.wav"]
    sources = [speech(n) for n in names]
    a, b = Bot(url, "busy", "a", sources[0]), Bot(url, "busy", "b", sources[1])
    c, d, late = Bot(url, "busy", "c", sources[2]), Bot(url, "busy", "d", None), Bot(url, "busy", "late", None)
    await a.join()
    await b.join()
    try:
        await _counted_full(url, first=True)  # the room's worker
        await c.join()  # refused by the room's worker, taken by the other
        assert await _hears(c, a, sources[0]) > 0.5
        assert await _hears(a, c, sources[2]) > 0.5
        _, health = await _health(url)
        assert health["spanning_rooms"] == {"busy": ["w0", "w1"]}, health["spanning_rooms"]
        first = next(w for w in health["workers"] if w["index"] == health["placement"]["busy"])
        assert first["health"]["load"]["joins_refused_predicted"] == 1
        assert sorted(w["rooms"].get("busy", 0) for w in health["workers"]) == [1, 2]
        await d.join()  # the other worker still had one: below its two
        await _counted_full(url, first=False)
        with pytest.raises(JoinError, match="server-busy"):
            await late.join()  # both full now
        assert await _hears(a, c, sources[2], since=time.monotonic()) > 0.5  # those in keep talking
    finally:
        for bot in (a, b, c, d, late):
            await bot.leave()
