"""Hostile or broken clients get clear errors; everyone else keeps being served."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

import aiohttp
import numpy as np

from loadtest.bot import Bot
from mediaserver.config import AuthConfig, EnhanceConfig, LimitsConfig, ServerConfig
from tests.audio_checks import longest_silence_ms
from tests.conftest import RunningServer, ServerFactory, noise


async def _next(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> dict:  # type: ignore[type-arg]
    msg = await asyncio.wait_for(ws.receive(), timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)  # type: ignore[no-any-return]


async def test_malformed_messages_get_errors_and_others_keep_talking(server: RunningServer) -> None:
    continuous = noise("running_tap.wav") * 4.0
    a = Bot(server.url, "calm", "a", continuous)
    b = Bot(server.url, "calm", "b", continuous)
    await a.join()
    await b.join()
    try:
        await asyncio.sleep(1.0)
        t0 = time.monotonic()
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(server.url.replace("http", "ws") + "/ws")
            cases = [
                ("{not json", "bad-json"),
                ("[1,2,3]", "bad-message"),
                (json.dumps({"no": "type"}), "bad-message"),
                (json.dumps({"type": "launch-missiles"}), "unknown-type"),
                (json.dumps({"type": "offer", "sdp": "v=0"}), "not-joined"),
                (json.dumps({"type": "join", "room": "bad room!"}), "bad-room"),
                (json.dumps({"type": "join", "room": 42}), "bad-message"),
                (json.dumps({"type": "join", "room": "r", "version": 99}), "unsupported-version"),
                (json.dumps({"type": "join", "room": "r", "stages": "denoise:magic"}), "bad-stages"),
                (json.dumps({"type": "join", "room": "r", "name": "x" * 1000}), "too-large"),
            ]
            for raw, code in cases:
                await ws.send_str(raw)
                reply = await _next(ws)
                assert reply["type"] == "error" and reply["code"] == code, (raw[:40], reply)
            await ws.send_bytes(b"\x00\x01binary")
            assert (await _next(ws))["code"] == "bad-message"
            # joined, then garbage SDP and an answer nobody asked for
            await ws.send_str(json.dumps({"type": "join", "room": "calm", "name": "mallory"}))
            assert (await _next(ws))["type"] == "joined"
            await ws.send_str(json.dumps({"type": "offer", "sdp": "v=0\r\nthis is not sdp\r\n"}))
            reply = await _next(ws)
            while reply["type"] != "error":
                reply = await _next(ws)
            assert reply["code"] == "bad-sdp"
            await ws.send_str(json.dumps({"type": "answer", "sdp": "v=0"}))
            reply = await _next(ws)
            while reply["type"] != "error":
                reply = await _next(ws)
            assert reply["code"] == "bad-sdp"
            # oversized SDP
            await ws.send_str(json.dumps({"type": "offer", "sdp": "a" * 40_000}))
            reply = await _next(ws)
            while reply["type"] != "error":
                reply = await _next(ws)
            assert reply["code"] == "too-large"
            # an oversized frame closes only this connection
            await ws.send_str("x" * 200_000)
            msg = await asyncio.wait_for(ws.receive(), 5)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
            # a message flood from a joined socket: the burst is served, one `rate-limited` error, then
            # silence for the refused ones, and the socket is closed (1008) once it keeps flooding
            ws2 = await http.ws_connect(server.url.replace("http", "ws") + "/ws")
            await ws2.send_str(json.dumps({"type": "join", "room": "flooder", "name": "f"}))
            assert (await _next(ws2))["type"] == "joined"
            for _ in range(500):
                await ws2.send_str(json.dumps({"type": "ping"}))
            codes = []
            while True:
                msg = await asyncio.wait_for(ws2.receive(), 10)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                reply = json.loads(msg.data)
                codes.append(reply.get("code", reply["type"]))
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1008, msg
            assert "pong" in codes and codes.count("rate-limited") == 2, codes[-5:]  # one reply, one at close
            assert len(codes) < 300, len(codes)  # refused messages got no reply each
            await ws2.close()
            # REST: unknown room, bad JSON, wrong types
            r = await http.put(f"{server.url}/api/rooms/calm/stages", data=b"{oops")
            assert r.status == 400 and (await r.json())["error"] == "bad-json"
            r = await http.put(f"{server.url}/api/rooms/calm/stages", json={"stages": 5})
            assert r.status == 400
            r = await http.put(f"{server.url}/api/rooms/nowhere/stages", json={"stages": "vad"})
            assert r.status == 404
        await asyncio.sleep(1.0)
        # the honest call went on without a gap while all of this happened
        heard = a.received_from(b.id, since=t0)  # type: ignore[arg-type]
        elapsed = time.monotonic() - t0
        assert len(heard) > 48_000 * (elapsed - 0.2), (len(heard) / 48_000, elapsed)
        assert longest_silence_ms(heard[4800:]) < 200.0  # scheduling hiccups only, see test_sfu_call
        room = server.server.rooms.get("calm")
        assert set(room.participants) == {a.id, b.id}
    finally:
        await a.leave()
        await b.leave()


async def test_vanished_client_is_removed(server: RunningServer) -> None:
    a = Bot(server.url, "ghost", "a", noise(seconds=2.0))
    b = Bot(server.url, "ghost", "b", noise(seconds=2.0))
    await a.join()
    await b.join()
    try:
        # b's socket dies without a 'leave'
        assert b._ws is not None
        await b._ws.close()
        deadline = time.monotonic() + 5
        while len(server.server.rooms.get("ghost").participants) != 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        while not a.events_of("participant-left"):
            assert time.monotonic() < deadline, "the others were not told"
            await asyncio.sleep(0.05)
        assert a.events_of("participant-left")[0]["participant"]["id"] == b.id
    finally:
        await a.leave()
        await b.pc.close()
        if b._session is not None:
            await b._session.close()


async def test_connections_per_address_are_capped(start_server: ServerFactory) -> None:
    """One address gets ``max_connections_per_address`` sockets, the next is refused with a clear
    error while the open ones keep working, and closing one makes room again."""
    limit = 3
    config = ServerConfig(host="127.0.0.1", port=0, auth=AuthConfig(dev_mode=True),
                          enhance=replace(EnhanceConfig(), default_stages=(), device="cpu"),
                          limits=replace(LimitsConfig(), max_connections_per_address=limit))
    rs = await start_server(config)
    ws_url = rs.url.replace("http", "ws") + "/ws"
    continuous = noise("running_tap.wav") * 4.0
    a = Bot(rs.url, "capped", "a", continuous)  # two of the three places from 127.0.0.1
    b = Bot(rs.url, "capped", "b", continuous)
    await a.join()
    await b.join()
    extra: list[aiohttp.ClientWebSocketResponse] = []
    try:
        async with aiohttp.ClientSession() as http:
            # three handshakes at once for the last place: exactly one gets it
            results = await asyncio.gather(*(http.ws_connect(ws_url) for _ in range(3)), return_exceptions=True)
            extra = [r for r in results if isinstance(r, aiohttp.ClientWebSocketResponse)]
            refused = [r for r in results if isinstance(r, aiohttp.WSServerHandshakeError)]
            assert len(extra) == 1 and len(refused) == 2, results
            assert all(r.status == 429 for r in refused)
            # what the refusal says (the same answer a browser's handshake gets)
            r = await http.get(rs.url + "/ws")
            body = await r.json()
            assert r.status == 429 and body["error"] == "too-many-connections", body
            assert f"at most {limit}" in body["message"]
            # the open connections keep working: the spare socket answers, the call goes on
            await extra[0].send_str(json.dumps({"type": "ping"}))
            assert (await _next(extra[0]))["type"] == "pong"
            t0 = time.monotonic()
            await asyncio.sleep(1.5)
            heard = a.received_from(b.id, since=t0)  # type: ignore[arg-type]
            assert len(heard) > 48_000 * 0.5 and float(np.sqrt(np.mean(heard ** 2))) > 1e-3
            assert set(rs.server.rooms.get("capped").participants) == {a.id, b.id}
            # another address is not held to this one's count
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as other:
                ws2 = await other.ws_connect(ws_url)
                await ws2.send_str(json.dumps({"type": "ping"}))
                assert (await _next(ws2))["type"] == "pong"
                await ws2.close()
            # closing one makes room for a new connection (once the server has seen the close)
            await extra.pop().close()
            deadline = time.monotonic() + 10.0  # a hang guard, not a speed check
            while True:
                try:
                    extra.append(await http.ws_connect(ws_url))
                    break
                except aiohttp.WSServerHandshakeError as exc:
                    assert exc.status == 429 and time.monotonic() < deadline, exc
                    await asyncio.sleep(0.05)
            await extra[0].send_str(json.dumps({"type": "join", "room": "capped", "name": "c"}))
            reply = await _next(extra[0])
            assert reply["type"] == "joined", reply
            for ws in extra:
                await ws.close()
    finally:
        await a.leave()
        await b.leave()
