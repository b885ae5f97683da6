"""Signed join tokens: refused with a clear error when wrong, honoured when right."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from loadtest.bot import Bot
from mediaserver.auth import create_token
from mediaserver.config import AuthConfig, ServerConfig, load_config
from tests.conftest import ServerFactory, speech

SECRET = "test-secret-of-decent-length-0123456789"


async def _join_reply(url: str, message: dict) -> dict:  # type: ignore[type-arg]
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url.replace("http", "ws") + "/ws")
        await ws.send_str(json.dumps(message))
        reply = json.loads((await asyncio.wait_for(ws.receive(), 5)).data)
        await ws.close()
        return reply  # type: ignore[no-any-return]


@pytest.fixture
async def secured(start_server: ServerFactory):  # type: ignore[no-untyped-def]
    return await start_server(ServerConfig(host="127.0.0.1", port=0, auth=AuthConfig(secret=SECRET)))


async def test_bad_tokens_are_refused(secured) -> None:  # type: ignore[no-untyped-def]
    url = secured.url
    cases = {
        "auth-required": None,
        "bad-token": create_token("another-secret-entirely-0123456789", room="r", identity="eve"),
        "token-expired": create_token(SECRET, room="r", identity="old", now=time.time() - 7200, ttl_s=60),
        "wrong-room": create_token(SECRET, room="other", identity="bob"),
    }
    for code, token in cases.items():
        msg = {"type": "join", "room": "r", "name": "x"}
        if token:
            msg["token"] = token
        reply = await _join_reply(url, msg)
        assert reply["type"] == "error" and reply["code"] == code, (code, reply)
    garbage = await _join_reply(url, {"type": "join", "room": "r", "token": "not.a.jwt"})
    assert garbage["code"] == "bad-token"
    ok = await _join_reply(url, {"type": "join", "room": "r", "token": create_token(SECRET, room="r", identity="al")})
    assert ok["type"] == "joined"


async def test_admin_actions_need_admin(secured) -> None:  # type: ignore[no-untyped-def]
    url = secured.url
    user = create_token(SECRET, room="r", identity="u")
    admin = create_token(SECRET, room="r", identity="a", permissions=("subscribe", "admin"))
    other_admin = create_token(SECRET, room="s", identity="a2", permissions=("admin",))
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url.replace("http", "ws") + "/ws")
        await ws.send_str(json.dumps({"type": "join", "room": "r", "token": user}))
        joined = json.loads((await ws.receive()).data)
        pid = joined["participant"]["id"]
        body = {"stages": "limiter"}
        r = await http.put(f"{url}/api/rooms/r/stages", json=body)
        assert r.status == 401 and (await r.json())["error"] == "auth-required"
        r = await http.put(f"{url}/api/rooms/r/stages", json=body, headers={"Authorization": f"Bearer {user}"})
        assert r.status == 403 and (await r.json())["error"] == "forbidden"
        r = await http.put(f"{url}/api/rooms/r/stages", json=body,
                           headers={"Authorization": f"Bearer {other_admin}"})
        assert r.status == 403 and (await r.json())["error"] == "wrong-room"
        r = await http.put(f"{url}/api/rooms/r/stages", json=body, headers={"Authorization": f"Bearer {admin}"})
        assert r.status == 200 and (await r.json())["stages"] == ["limiter"]
        r = await http.get(f"{url}/api/rooms/r")
        assert r.status == 401
        # kick: the participant is told and removed
        r = await http.delete(f"{url}/api/rooms/r/participants/{pid}", headers={"Authorization": f"Bearer {admin}"})
        assert r.status == 200
        seen = []
        while True:
            m = await asyncio.wait_for(ws.receive(), 5)
            if m.type != aiohttp.WSMsgType.TEXT:
                break
            seen.append(json.loads(m.data)["type"])
            if "bye" in seen:
                break
        assert "bye" in seen
        assert pid not in secured.server.rooms.rooms.get("r", type("E", (), {"participants": {}})).participants
        await ws.close()


async def test_listen_only_token_does_not_publish(secured) -> None:  # type: ignore[no-untyped-def]
    url = secured.url

    class TokenBot(Bot):
        def __init__(self, *a, token: str, **kw) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*a, **kw)
            self._token = token

        async def send(self, msg):  # type: ignore[no-untyped-def]
            if msg.get("type") == "join":
                msg = {**msg, "token": self._token}
            await super().send(msg)

    talker = TokenBot(url, "r", "talker", speech(), token=create_token(SECRET, room="r", identity="t"))
    listener = TokenBot(url, "r", "listener", speech("cmu_arctic_us_axb_a0004.wav"),
                        token=create_token(SECRET, room="r", identity="l", permissions=("subscribe",)))
    await talker.join()
    await listener.join()
    try:
        await asyncio.sleep(2.5)
        room = secured.server.rooms.get("r")
        assert len(room.streams) == 1  # only the talker publishes
        assert listener.received_from(talker.id).size > 48_000  # type: ignore[arg-type]
        assert talker.received_from(listener.id).size == 0  # type: ignore[arg-type]
    finally:
        await talker.leave()
        await listener.leave()


def test_production_config_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="MEDIASERVER_AUTH_SECRET"):
        load_config(env={})
    assert load_config(env={"MEDIASERVER_DEV": "1"}).auth.dev_mode
    assert load_config(env={"MEDIASERVER_AUTH_SECRET": "s"}).auth.secret == "s"


def test_token_command_makes_a_valid_token() -> None:
    exe = Path(sys.executable).parent / "mediaserver"
    out = subprocess.run([str(exe), "token", "--room", "r", "--identity", "ops", "--admin", "--secret", SECRET],
                         capture_output=True, text=True, check=True)
    from mediaserver.auth import TokenVerifier

    grant = TokenVerifier(SECRET, dev_mode=False).verify(out.stdout.strip())
    assert grant.identity == "ops" and "admin" in grant.permissions
    missing = subprocess.run([str(exe), "token", "--room", "r", "--identity", "x"], capture_output=True, text=True,
                             env={"PATH": "/usr/bin"})
    assert missing.returncode == 2 and "secret" in missing.stderr
