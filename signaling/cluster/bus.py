"""The room bus of a multi-worker server: the front's hub for rooms that span workers.

Each worker keeps a WebSocket to the front's private socket (``/internal/bus``)
and reports, per room it hosts, its room events and streams
(``mediaserver/federation.py`` has the messages).  ``RoomBusHub`` keeps what
every host reported and forwards each message to the room's other hosts; a
host that starts hosting a room gets the room's participants and streams
replayed, and every host of a room gets the relay addresses of the others
(``peers``) whenever they change.  A worker that goes away (its bus socket
closes) leaves its rooms: the other hosts are told its participants left and
its streams ended.  The hub also tells the placement which worker a room
lives on when a worker creates one by itself (a phone call, a prompt).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from aiohttp import WSMsgType, web

from signaling.cluster.pool import Placement

log = logging.getLogger(__name__)


@dataclass
class _RoomState:
    hosts: dict[str, tuple[str, int]] = field(default_factory=dict)  # host -> relay address
    participants: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)  # id -> (host, desc)
    streams: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)  # id -> (host, stream desc)


class RoomBusHub:
    """Owns the bus sockets of the workers and the spanning state of every room."""

    def __init__(self, placement: Placement) -> None:
        self.placement = placement
        self._sockets: dict[str, web.WebSocketResponse] = {}  # host -> its bus socket
        self._relay: dict[str, tuple[str, int]] = {}
        self._worker: dict[str, int] = {}
        self._rooms: dict[str, _RoomState] = {}
        self.forwarded = 0

    def worker_of_participant(self, room: str, participant: str) -> Optional[int]:
        """The worker a participant of a spanning room is on (None: unknown, or the room does not span)."""
        state = self._rooms.get(room)
        entry = state.participants.get(participant) if state is not None else None
        return self._worker.get(entry[0]) if entry is not None else None

    def spanning(self) -> dict[str, list[str]]:
        """Rooms hosted by more than one worker, and by which."""
        return {r: sorted(s.hosts) for r, s in self._rooms.items() if len(s.hosts) > 1}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=1 << 22)
        await ws.prepare(request)
        host: Optional[str] = None
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    body = json.loads(msg.data)
                except ValueError:
                    log.error("room bus: a worker sent a frame that is not JSON")
                    continue
                if host is None:
                    if body.get("op") != "hello":
                        continue
                    host = str(body["host"])
                    self._sockets[host] = ws
                    self._relay[host] = (str(body["relay"][0]), int(body["relay"][1]))
                    self._worker[host] = int(body["worker"])
                    continue
                await self._on(host, body)
        finally:
            if host is not None and self._sockets.get(host) is ws:
                await self.host_gone(host)
        return ws

    async def _send(self, host: str, message: dict[str, Any]) -> None:
        ws = self._sockets.get(host)
        if ws is None or ws.closed:
            return
        try:
            await ws.send_str(json.dumps(message))
            self.forwarded += 1
        except (ConnectionError, RuntimeError):
            pass

    async def _peers(self, room: str, state: _RoomState) -> None:
        for host in list(state.hosts):
            others = {h: list(a) for h, a in state.hosts.items() if h != host}
            await self._send(host, {"op": "peers", "room": room, "peers": others})

    async def _on(self, host: str, body: dict[str, Any]) -> None:
        op, room = body.get("op"), body.get("room")
        if not isinstance(room, str):
            return
        if op == "host":
            state = self._rooms.setdefault(room, _RoomState())
            state.hosts[host] = self._relay[host]
            self.placement.hosted(room, self._worker[host])
            for pid, (h, desc) in list(state.participants.items()):
                if h != host:
                    await self._send(host, {"op": "event", "room": room, "from": h,
                                            "message": {"type": "participant-joined", "participant": desc}})
            for sid, (h, desc) in list(state.streams.items()):
                if h != host:
                    await self._send(host, {"op": "stream", "room": room, "from": h, "event": "added",
                                            "stream": desc})
            await self._peers(room, state)
        elif op == "unhost":
            await self._unhost(room, host)
        elif op == "event":
            found = self._rooms.get(room)
            message = body.get("message")
            if found is None or host not in found.hosts or not isinstance(message, dict):
                return
            state = found
            p = message.get("participant")
            if isinstance(p, dict) and "id" in p:
                if message.get("type") == "participant-left":
                    state.participants.pop(str(p["id"]), None)
                else:
                    state.participants[str(p["id"])] = (host, p)
            await self._forward(room, state, host, {"op": "event", "room": room, "from": host, "message": message})
        elif op == "stream":
            found = self._rooms.get(room)
            stream = body.get("stream")
            if found is None or host not in found.hosts or not isinstance(stream, dict):
                return
            state, desc = found, stream
            if body.get("event") == "added":
                state.streams[str(desc.get("id"))] = (host, desc)
            else:
                state.streams.pop(str(desc.get("id")), None)
            await self._forward(room, state, host, {"op": "stream", "room": room, "from": host,
                                                    "event": body.get("event"), "stream": desc})

    async def _forward(self, room: str, state: _RoomState, origin: str, message: dict[str, Any]) -> None:
        for h in list(state.hosts):
            if h != origin:
                await self._send(h, message)

    async def _unhost(self, room: str, host: str) -> None:
        state = self._rooms.get(room)
        if state is None or host not in state.hosts:
            return
        del state.hosts[host]
        for pid, (h, desc) in list(state.participants.items()):
            if h == host:
                del state.participants[pid]
                await self._forward(room, state, host, {"op": "event", "room": room, "from": host, "message": {
                    "type": "participant-left", "participant": desc, "reason": "left"}})
        for sid, (h, desc) in list(state.streams.items()):
            if h == host:
                del state.streams[sid]
                await self._forward(room, state, host, {"op": "stream", "room": room, "from": host,
                                                        "event": "removed", "stream": {"id": sid}})
        self.placement.unhosted(room, self._worker[host], [self._worker[h] for h in state.hosts])
        if state.hosts:
            await self._peers(room, state)
        else:
            del self._rooms[room]

    async def host_gone(self, host: str) -> None:
        """A worker's bus socket closed (it died or stopped): it hosts nothing any more."""
        self._sockets.pop(host, None)
        for room in [r for r, s in self._rooms.items() if host in s.hosts]:
            await self._unhost(room, host)
