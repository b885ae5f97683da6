"""A cluster of two nodes on one Redis: rooms placed on nodes, a room spanning both, a node lost.

Real processes on loopback: ``redis-server``, two ``mediaserver serve --redis ...`` nodes (a front and
one media worker each), real aiortc participants.  A room's first participants are placed on its node;
one reaching the other node is proxied there, until the room has ``MEDIASERVER_ROOM_SPILL_AFTER`` (2)
participants on its node: then the room spans both nodes (events on Redis, streams relayed node to
node) and everyone hears everyone.  When a node dies, the others are told its participants left, and
those participants, joining again through the live node, are back in their room and heard.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
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

from loadtest.bot import Bot
from tests.audio_checks import content_match, looped
from tests.conftest import speech

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed (Debian package redis-server)")
VOICES = ["cmu_arctic_us_aew_a0001.wav", "cmu_arctic_us_axb_a0004.wav", "cmu_arctic_a0010.wav",
          "vctk_p286_011_48k.wav", "cmu_arctic_us_aew_a0002.wav"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _health(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/healthz", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            return await resp.json()  # type: ignore[no-any-return]


class Node:
    """One node: its front process (with its worker) and its URL."""

    def __init__(self, name: str, redis_url: str) -> None:
        self.name = name
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).parent / "mediaserver"
        self.proc = subprocess.Popen(
            [str(exe), "serve", "--dev", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--stages", ""], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "MEDIASERVER_QUALITY": "0", "MEDIASERVER_REDIS_URL": redis_url,
                 "MEDIASERVER_NODE_ID": name, "MEDIASERVER_CLUSTER_TOKEN": "cluster-secret",
                 "MEDIASERVER_ROOM_SPILL_AFTER": "2"})

    async def ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                async with aiohttp.ClientSession() as http:
                    async with http.get(f"{self.url}/healthz") as resp:
                        if resp.status == 200:
                            return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.25)
        raise AssertionError(f"node {self.name} did not start")

    async def in_room(self, room: str) -> int:
        health = await _health(self.url)
        return sum(int(w["rooms"].get(room, 0)) for w in health["workers"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[Node, Node]]:
    port = _free_port()
    assert REDIS is not None
    redis = subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nodes = (Node("node-a", f"redis://127.0.0.1:{port}/0"), Node("node-b", f"redis://127.0.0.1:{port}/0"))
    try:
        await asyncio.gather(*(n.ready() for n in nodes))
        deadline = time.monotonic() + 10
        while len((await _health(nodes[0].url)).get("workers", [])) < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.5)  # both nodes in each other's view of the directory
        yield nodes
    finally:
        for n in nodes:
            n.stop()
        redis.kill()
        redis.wait()


async def _hears(listener: Bot, talker: Bot, source: Any, since: float = 0.0, seconds: float = 2.5,
                 timeout: float = 20.0) -> float:
    deadline = time.monotonic() + timeout
    got: Any = []
    while time.monotonic() < deadline:
        got = listener.received_from(talker.id, since=since) if talker.id else []  # type: ignore[arg-type]
        if len(got) > 48_000 * seconds:
            return content_match(got[24_000:], looped(source))
        await asyncio.sleep(0.25)
    raise AssertionError(f"{listener.name} did not receive {seconds} s of {talker.name} (got {len(got)})")


async def test_room_proxied_then_spanning_then_a_node_lost(cluster: tuple[Node, Node]) -> None:
    a, b = cluster
    sources = [speech(v) for v in VOICES]
    # the first participant, through node a: the room is placed on a node (the least loaded: a tie -> node-a)
    bots = [Bot(a.url, "octet", "p0", sources[0])]
    await bots[0].join()
    # the second, through node b: proxied to the room's node (the room has 1 < 2 participants there)
    bots.append(Bot(b.url, "octet", "p1", sources[1]))
    await bots[1].join()
    assert await _hears(bots[0], bots[1], sources[1]) > 0.5
    assert (await a.in_room("octet"), await b.in_room("octet")) == (2, 0), "the second join was not proxied"
    await asyncio.sleep(2.5)  # the directory's counts are refreshed every second
    # two more through node b: the room's node has 2 already, so they are hosted on b: the room spans
    for i in (2, 3):
        bots.append(Bot(b.url, "octet", f"p{i}", sources[i]))
        await bots[i].join()
    try:
        for i, listener in enumerate(bots):
            for j, talker in enumerate(bots):
                if i != j:
                    assert await _hears(listener, talker, sources[j]) > 0.5, (listener.name, talker.name)
        assert (await a.in_room("octet"), await b.in_room("octet")) == (2, 2)
        spanning = (await _health(a.url))["spanning_rooms"]
        assert spanning == {"octet": ["node-a/w0", "node-b/w0"]}, spanning
        async with aiohttp.ClientSession() as http:
            room = await (await http.get(f"{a.url}/api/rooms/octet")).json()
        assert {p["name"] for p in room["participants"]} == {"p0", "p1", "p2", "p3"}

        # node b dies (its worker dies with it): its clients (p1, proxied through it to a, and p2, p3, hosted
        # on it) join again through node a
        t_kill = time.monotonic()
        b.proc.kill()
        lost = bots[1:]
        for bot in lost:
            await bot.leave()
        bots = bots[:1] + [Bot(a.url, "octet", f"p{i}-again", sources[i]) for i in (1, 2, 3)]
        for bot in bots[1:]:
            await bot.join()
        for i, listener in enumerate(bots):
            for j, talker in enumerate(bots):
                if i != j:
                    assert await _hears(listener, talker, sources[j], since=t_kill, seconds=1.0) > 0.5
        back_s = time.monotonic() - t_kill
        assert back_s < 10.0, f"the lost node's participants were heard again only after {back_s:.1f} s"
        # the survivors are told that the lost node's participants left
        deadline = time.monotonic() + 15
        gone = {lost[1].id, lost[2].id}  # (p1 left a's room when its socket through b closed)
        while not gone <= {e["participant"]["id"] for e in bots[0].events_of("participant-left")}:
            assert time.monotonic() < deadline, "the lost node's participants were not removed"
            await asyncio.sleep(0.2)
        print(json.dumps({"heard_again_after_s": round(back_s, 2)}))
    finally:
        for bot in bots:
            await bot.leave()
