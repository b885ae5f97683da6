"""Signaling limits against hostile clients: each attack gets a clear answer, the honest call keeps flowing.

Real sockets against the real server on a loopback port (``tests/conftest.py``),
the attacks of ``loadtest/attacks.py``, and two real aiortc participants
talking where the attack could hurt them.  Behaviour only: figures of how
well the call survives are in ``bench/signaling_flood.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import Any, AsyncIterator

import aiohttp
import numpy as np
import pytest

from enhancers.registry import MAX_STAGES, check_stage_specs
from loadtest import attacks
from loadtest.bot import Bot
from mediaserver.auth import create_token
from mediaserver.config import AuthConfig, EnhanceConfig, LimitsConfig, ServerConfig
from mediaserver.server import MediaServer
from signaling.app import create_app
from signaling.http_server import start_http
from tests.conftest import RunningServer, ServerFactory, noise

SECRET = "test-secret-of-decent-length-0123456789"
ATTACKER = "127.0.0.2"  # the honest bots connect from 127.0.0.1


def config(*, dev: bool = True, **limits: Any) -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, auth=AuthConfig(dev_mode=dev, secret=None if dev else SECRET),
                        enhance=replace(EnhanceConfig(), default_stages=(), device="cpu"),
                        limits=replace(LimitsConfig(), **limits))


async def receive_json(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10.0) -> dict[str, Any]:
    msg = await asyncio.wait_for(ws.receive(), timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)  # type: ignore[no-any-return]


async def until(ws: aiohttp.ClientWebSocketResponse, pred: Any, timeout: float = 10.0) -> dict[str, Any]:
    """The first message ``pred`` accepts (others, e.g. stats, skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await receive_json(ws, max(0.1, deadline - time.monotonic()))
        if pred(msg):
            return msg


async def talking(url: str, room: str, **kw: Any) -> tuple[Bot, Bot]:
    continuous = noise("running_tap.wav") * 4.0
    a = Bot(url, room, "a", continuous, **kw)
    b = Bot(url, room, "b", continuous)
    await a.join(timeout=20.0)
    await b.join(timeout=20.0)
    await asyncio.sleep(1.0)
    return a, b


async def assert_hears(listener: Bot, speaker: Bot, since: float, timeout: float = 20.0) -> None:
    """Half a second of ``speaker``'s audio reaches ``listener`` after ``since`` (a hang guard, not a speed check)."""
    assert speaker.id is not None
    deadline = time.monotonic() + timeout
    while True:
        heard = listener.received_from(speaker.id, since=since)
        if len(heard) > 48_000 * 0.5 and float(np.sqrt(np.mean(heard ** 2))) > 1e-3:
            return
        assert time.monotonic() < deadline, f"{len(heard) / 48_000:.2f} s heard"
        await asyncio.sleep(0.1)


@pytest.fixture
async def call(server: RunningServer) -> AsyncIterator[tuple[RunningServer, Bot, Bot]]:
    a, b = await talking(server.url, "call")
    try:
        yield server, a, b
    finally:
        await a.leave()
        await b.leave()


async def test_preauth_ping_flood_is_cut_off_and_the_call_goes_on(call: tuple[RunningServer, Bot, Bot]) -> None:
    """Unjoined sockets flooding pings are closed after their pre-join budget, refusals cost no reply
    each, the address then cools down (429), and the honest call in the meantime keeps its audio."""
    server, a, b = call
    t0 = time.monotonic()
    seen = await attacks.ping_flood(server.url, sockets=8, seconds=2.0, local_addr=ATTACKER)
    assert seen["connections"] >= 8 and seen.get("error_not-joined", 0) >= 1, seen
    budget = LimitsConfig().max_messages_before_join
    assert seen["replies"] <= (budget + 1) * seen["connections"], seen  # replies bounded per socket, not per message
    assert seen.get("handshake_429", 0) > 0, seen  # the address cooled down
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(ATTACKER, 0))) as http:
        r = await http.get(server.url + "/ws")
        assert r.status == 429 and (await r.json())["error"] == "cooling-down"
    await asyncio.sleep(1.0)
    await assert_hears(a, b, t0)
    await assert_hears(b, a, t0)
    assert set(server.server.rooms.get("call").participants) == {a.id, b.id}


async def test_joined_flood_gets_one_error_then_silence_then_1008(call: tuple[RunningServer, Bot, Bot]) -> None:
    server, a, b = call
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(attacks.ws_url(server.url))
        await ws.send_str(json.dumps({"type": "join", "room": "call", "name": "flood"}))
        await until(ws, lambda m: m["type"] == "joined")
        for _ in range(400):
            await ws.send_str(attacks.PING)
        codes = []
        while (msg := await asyncio.wait_for(ws.receive(), 10.0)).type == aiohttp.WSMsgType.TEXT:
            codes.append(json.loads(msg.data).get("code"))
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1008, msg
        assert codes.count("rate-limited") == 2, codes  # the first refusal, and the reason of the close
    await asyncio.sleep(1.0)
    await assert_hears(a, b, t0)
    assert set(server.server.rooms.get("call").participants) == {a.id, b.id}  # the flooder was removed


def test_stage_check_is_bounded_typed_and_linear() -> None:
    assert [s.spec for s in check_stage_specs("limiter, vad")] == ["vad", "limiter"]
    assert [s.spec for s in check_stage_specs(["denoise:rnnoise", "aec"])] == ["aec", "denoise:rnnoise"]
    for bad, words in [(["vad", 1], "strings"), ("vad,vad", "twice"), (["vad"] * 8000, f"at most {MAX_STAGES}"),
                       (",".join(["vad"] * 8000), f"at most {MAX_STAGES}"), ({"vad": 1}, "a list"),
                       (["x" * 1000], "characters"), ("denoise:magic", "unknown stage")]:
        with pytest.raises(ValueError, match=words):
            check_stage_specs(bad)


async def test_bad_stage_specs_are_refused_the_same_way_everywhere(call: tuple[RunningServer, Bot, Bot]) -> None:
    """WebSocket join and set-stages, HTTP room and participant PUTs: one check, 400 ``bad-stages``."""
    server, a, b = call
    t0 = time.monotonic()
    seen = await attacks.stage_join(server.url, items=8000, room="stage-attack", local_addr=ATTACKER)
    assert seen["reply"] == "bad-stages", seen
    assert "stage-attack" not in server.server.rooms.rooms  # refused before the room was created
    bad_specs: list[Any] = [["vad", 1], ["vad"] * 8000, "vad,vad", {"a": 1}, "denoise:magic"]
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(attacks.ws_url(server.url))
        for bad in bad_specs:
            await ws.send_str(json.dumps({"type": "join", "room": "call", "stages": bad}))
            reply = await receive_json(ws)
            assert reply["type"] == "error" and reply["code"] == "bad-stages", (str(bad)[:30], reply)
        await ws.send_str(json.dumps({"type": "join", "room": "call", "name": "m"}))
        joined = await until(ws, lambda m: m["type"] == "joined")
        for bad in bad_specs:
            await ws.send_str(json.dumps({"type": "set-stages", "stages": bad}))
            reply = await until(ws, lambda m: m["type"] == "error")
            assert reply["code"] == "bad-stages", (str(bad)[:30], reply)
        await ws.send_str(attacks.PING)  # the socket is still usable
        await until(ws, lambda m: m["type"] == "pong")
        pid = joined["participant"]["id"]
        for path in ("/api/rooms/call/stages", f"/api/rooms/call/participants/{pid}/stages"):
            for bad in bad_specs:
                r = await http.put(server.url + path, json={"stages": bad})
                body = await r.json()
                assert r.status == 400 and body["error"] == "bad-stages", (path, str(bad)[:30], body)
        r = await http.put(server.url + "/api/rooms/call/stages", json={})
        assert r.status == 400 and (await r.json())["error"] == "bad-stages"
        r = await http.put(server.url + f"/api/rooms/call/participants/{pid}/stages", json={"stages": None})
        assert r.status == 200
        await ws.close()
    await asyncio.sleep(1.0)
    await assert_hears(a, b, t0)


async def test_nested_json_and_handler_bugs_get_clear_errors(server: RunningServer,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    seen = await attacks.nested_json(server.url, depth=30_000, path="/api/rooms/x/stages")
    assert seen["status"] in (400, 404), seen  # no room x: either refusal is clear, never a 500
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(attacks.ws_url(server.url))
        await ws.send_str(json.dumps({"type": "join", "room": "nest"}))
        await until(ws, lambda m: m["type"] == "joined")
        seen = await attacks.nested_json(server.url, depth=30_000, path="/api/rooms/nest/stages")
        assert seen["status"] == 400 and seen["error"] == "bad-json", seen
        await ws.send_str("[" * 30_000 + "]" * 30_000)
        reply = await until(ws, lambda m: m["type"] == "error")
        assert reply["code"] == "bad-json", reply

        async def broken(*args: Any, **kw: Any) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(server.server, "set_muted", broken)
        monkeypatch.setattr(server.server, "set_room_stages", broken)
        await ws.send_str(json.dumps({"type": "mute", "muted": True}))
        reply = await until(ws, lambda m: m["type"] == "error")
        assert reply["code"] == "internal-error", reply
        await ws.send_str(attacks.PING)  # the socket survived the bug
        await until(ws, lambda m: m["type"] == "pong")
        r = await http.put(server.url + "/api/rooms/nest/stages", json={"stages": "vad"})
        assert r.status == 500 and (await r.json())["error"] == "internal-error"
        await ws.close()


async def test_a_second_join_with_the_same_identity_replaces_the_first(start_server: ServerFactory) -> None:
    rs = await start_server(config(dev=False, max_participants_per_room=3))
    token_a = create_token(SECRET, room="idr", identity="alice")
    token_b = create_token(SECRET, room="idr", identity="bob")
    a = Bot(rs.url, "idr", "a", noise("running_tap.wav") * 4.0, token=token_a)
    b = Bot(rs.url, "idr", "b", noise("running_tap.wav") * 4.0, token=token_b)
    await a.join(timeout=20.0)
    await b.join(timeout=20.0)
    a2 = Bot(rs.url, "idr", "a2", noise("running_tap.wav") * 4.0, token=token_a)
    try:
        # the attack: the same token joined many times cannot fill the room
        seen = await attacks.same_identity_joins(rs.url, token=token_a, room="idr", joins=6)
        assert seen.get("joined") == 6 and seen.get("bye_replaced", 0) >= 5, seen
        await a2.join(timeout=20.0)
        deadline = time.monotonic() + 10.0
        while not any(e.get("code") == "replaced" for e in a.events_of("bye")):
            assert time.monotonic() < deadline, a.events[-3:]
            await asyncio.sleep(0.05)
        room = rs.server.rooms.get("idr")
        assert set(room.participants) == {a2.id, b.id}
        t0 = time.monotonic()
        await asyncio.sleep(1.5)
        await assert_hears(b, a2, t0)
        await assert_hears(a2, b, t0)
    finally:
        for bot in (a, b, a2):
            await bot.leave()


async def test_join_without_offer_and_no_join_time_out(start_server: ServerFactory) -> None:
    rs = await start_server(config(offer_timeout_s=1.0, join_timeout_s=1.0))
    a, b = await talking(rs.url, "idle")
    try:
        seen = await attacks.join_without_offer(rs.url, room="idle", wait_s=20.0)
        assert "offer-timeout" in seen["seen"], seen
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(attacks.ws_url(rs.url))  # never joins
            reply = await receive_json(ws)
            assert reply["code"] == "join-timeout", reply
            msg = await asyncio.wait_for(ws.receive(), 10.0)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
        assert set(rs.server.rooms.get("idle").participants) == {a.id, b.id}  # the bots offered: kept
        t0 = time.monotonic()
        await asyncio.sleep(1.0)
        await assert_hears(a, b, t0)
    finally:
        await a.leave()
        await b.leave()


async def test_global_connection_cap(start_server: ServerFactory) -> None:
    rs = await start_server(config(max_connections=4))
    a, b = await talking(rs.url, "cap")
    try:
        seen = await attacks.connection_flood(rs.url, addresses=[ATTACKER, "127.0.0.3"], per_address=3,
                                              hold_s=0.5)
        assert seen.get("accepted") == 2 and seen.get("refused_503") == 4, seen
        async with aiohttp.ClientSession() as http:
            held = [await http.ws_connect(attacks.ws_url(rs.url)) for _ in range(2)]
            r = await http.get(rs.url + "/ws")
            body = await r.json()
            assert r.status == 503 and body["error"] == "server-busy", body
            for ws in held:
                await ws.close()
        t0 = time.monotonic()
        await asyncio.sleep(1.0)
        await assert_hears(a, b, t0)
    finally:
        await a.leave()
        await b.leave()


async def test_half_open_http_requests_are_closed_and_capped() -> None:
    """Slowloris: request heads that never finish are closed after ``http_header_timeout_s``, the TCP
    connections beyond ``max_http_connections`` get 503 at once, a slow body gets 408."""
    cfg = config(http_header_timeout_s=1.0, http_body_timeout_s=1.0, max_http_connections=20)
    server = MediaServer(cfg)
    runner, port = await start_http(create_app(server), "127.0.0.1", 0, cfg.limits)
    url = f"http://127.0.0.1:{port}"
    try:
        seen = await attacks.slowloris(url, connections=30, seconds=8.0)
        assert seen["closed_by_server"] == 30 and seen["still_open"] == 0, seen
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(attacks.ws_url(url))  # a room for the slow body to be about
            await ws.send_str(json.dumps({"type": "join", "room": "slow"}))
            await until(ws, lambda m: m["type"] == "joined")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"PUT /api/rooms/slow/stages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"stages\"")
            head = await asyncio.wait_for(reader.read(4096), 10.0)
            writer.close()
            assert head.startswith(b"HTTP/1.1 408") and b"timeout" in head, head[:200]
            r = await http.get(url + "/healthz")
            assert r.status == 200
            await ws.close()
    finally:
        await runner.cleanup()



async def test_new_connections_beyond_the_rate_get_503_unparsed_then_are_served_again() -> None:
    """A burst of new connections beyond ``new_connection_burst`` is answered 503 ``server-busy`` (and
    closed) before anything it sent is read; once the bucket refills, a new connection is served."""
    cfg = config(new_connections_per_s=2.0, new_connection_burst=5)
    server = MediaServer(cfg)
    runner, port = await start_http(create_app(server), "127.0.0.1", 0, cfg.limits)

    async def get_healthz() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head = await asyncio.wait_for(reader.read(4096), 10.0)
        writer.close()
        return head

    try:
        heads = await asyncio.gather(*(get_healthz() for _ in range(20)))
        busy = [h for h in heads if h.startswith(b"HTTP/1.1 503") and b"server-busy" in h]
        served = [h for h in heads if h.startswith(b"HTTP/1.1 200")]
        assert len(served) + len(busy) == 20, heads
        assert 5 <= len(served) <= 12 and len(busy) >= 8, (len(served), len(busy))  # refills 2/s meanwhile
        await asyncio.sleep(1.5)  # three tokens back
        assert (await get_healthz()).startswith(b"HTTP/1.1 200")
    finally:
        await runner.cleanup()
