"""The room bus of a multi-worker server: the front's hub for rooms that span workers (and nodes).

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

In a cluster (``--redis``) the hub is one node's part of the room bus: what its
workers report is also published to the room's channel (signaling/cluster/
interbus.py), and what other nodes' hosts publish comes in as from hosts
without a socket here; host ids are ``<node>/w<i>``.  A node joining a room asks
the others to replay it (``sync``); a node that is gone leaves its rooms.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from aiohttp import WSMsgType, web

from signaling.cluster.pool import Placement

log = logging.getLogger(__name__)


class ClusterChannel(Protocol):
    """The hub's way to the other nodes (``interbus.ClusterBus``)."""

    async def publish(self, room: str, host: str, relay: tuple[str, int] | None, body: dict[str, Any]) -> None: ...

    async def follow(self, room: str) -> None: ...

    async def unfollow(self, room: str) -> None: ...


@dataclass
class _RoomState:
    hosts: dict[str, tuple[str, int]] = field(default_factory=dict)  # host -> relay address
    participants: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)  # id -> (host, desc)
    streams: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)  # id -> (host, stream desc)


class RoomBusHub:
    """Owns the bus sockets of the workers and the spanning state of every room."""

    def __init__(self, placement: Placement, node_id: str = "") -> None:
        self.placement = placement
        self.node_id = node_id
        self.cluster: Optional[ClusterChannel] = None  # set in a cluster (interbus.ClusterBus)
        self._sockets: dict[str, web.WebSocketResponse] = {}  # local host -> its bus socket
        self._relay: dict[str, tuple[str, int]] = {}
        self._worker: dict[str, int] = {}
        self._rooms: dict[str, _RoomState] = {}
        self.forwarded = 0

    def worker_of_participant(self, room: str, participant: str) -> Optional[int]:
        """The worker of this node a participant of a spanning room is on (None: unknown or elsewhere)."""
        state = self._rooms.get(room)
        entry = state.participants.get(participant) if state is not None else None
        return self._worker.get(entry[0]) if entry is not None else None

    def spanning(self) -> dict[str, list[str]]:
        """Rooms hosted by more than one worker (or node), and by which."""
        return {r: sorted(s.hosts) for r, s in self._rooms.items() if len(s.hosts) > 1}

    def _local(self, host: str) -> bool:
        return host in self._sockets

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
                    host = f"{self.node_id}/{body['host']}" if self.node_id else str(body["host"])
                    self._sockets[host] = ws
                    self._relay[host] = (str(body["relay"][0]), int(body["relay"][1]))
                    self._worker[host] = int(body["worker"])
                    continue
                await self._apply(host, self._relay[host], body)
        finally:
            if host is not None and self._sockets.get(host) is ws:
                del self._sockets[host]
                await self.host_gone(host, local=True)
        return ws

    async def remote(self, host: str, relay: tuple[str, int] | None, body: dict[str, Any]) -> None:
        """A message another node's host published on the room's channel."""
        if self._local(host):
            return
        if body.get("op") == "sync":
            await self._replay(str(body.get("room")))
            return
        await self._apply(host, relay, body)

    async def _send(self, host: str, message: dict[str, Any]) -> None:
        ws = self._sockets.get(host)
        if ws is None or ws.closed:
            return
        try:
            await ws.send_str(json.dumps(message))
            self.forwarded += 1
        except (ConnectionError, RuntimeError):
            pass

    async def _publish(self, host: str, body: dict[str, Any]) -> None:
        if self.cluster is not None and self._local(host):
            await self.cluster.publish(str(body.get("room")), host, self._relay.get(host), body)

    async def _peers(self, room: str, state: _RoomState) -> None:
        for host in list(state.hosts):
            if self._local(host):
                others = {h: list(a) for h, a in state.hosts.items() if h != host}
                await self._send(host, {"op": "peers", "room": room, "peers": others})

    async def _apply(self, host: str, relay: tuple[str, int] | None, body: dict[str, Any]) -> None:
        op, room = body.get("op"), body.get("room")
        if not isinstance(room, str):
            return
        local = self._local(host)
        if op == "host":
            if relay is None:
                return
            state = self._rooms.setdefault(room, _RoomState())
            first_here = local and not any(self._local(h) for h in state.hosts)
            state.hosts[host] = relay
            if local:
                self.placement.hosted(room, self._worker[host])
                for _pid, (h, desc) in list(state.participants.items()):
                    if h != host:
                        await self._send(host, {"op": "event", "room": room, "from": h,
                                                "message": {"type": "participant-joined", "participant": desc}})
                for _sid, (h, desc) in list(state.streams.items()):
                    if h != host:
                        await self._send(host, {"op": "stream", "room": room, "from": h, "event": "added",
                                                "stream": desc})
            await self._peers(room, state)
            await self._publish(host, body)
            if first_here and self.cluster is not None:  # this node joins the room: the others replay it
                await self.cluster.follow(room)
                await self.cluster.publish(room, host, relay, {"op": "sync", "room": room})
        elif op == "unhost":
            await self._unhost(room, host)
            await self._publish(host, body)
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
            await self._publish(host, body)
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
            await self._publish(host, body)

    async def _replay(self, room: str) -> None:
        """Another node joined ``room``: publish what this node's hosts hold of it (their host, participants
        and streams), as they reported it."""
        state = self._rooms.get(room)
        if state is None or self.cluster is None:
            return
        for host, relay in list(state.hosts.items()):
            if not self._local(host):
                continue
            await self.cluster.publish(room, host, relay, {"op": "host", "room": room})
            for _pid, (h, desc) in list(state.participants.items()):
                if h == host:
                    await self.cluster.publish(room, host, relay, {
                        "op": "event", "room": room, "message": {"type": "participant-joined", "participant": desc}})
            for _sid, (h, desc) in list(state.streams.items()):
                if h == host:
                    await self.cluster.publish(room, host, relay, {"op": "stream", "room": room, "event": "added",
                                                                   "stream": desc})

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
        if host in self._worker:
            self.placement.unhosted(room, self._worker[host],
                                    [self._worker[h] for h in state.hosts if h in self._worker])
        if any(self._local(h) for h in state.hosts):
            await self._peers(room, state)
        else:  # no host of this node left: the room is the other nodes' business
            del self._rooms[room]
            if self.cluster is not None:
                await self.cluster.unfollow(room)

    async def host_gone(self, host: str, local: bool = False) -> None:
        """A host is gone (a worker's bus socket closed): it leaves every room; a local one is also
        reported to the other nodes."""
        for room in [r for r, s in self._rooms.items() if host in s.hosts]:
            await self._unhost(room, host)
            if local and self.cluster is not None:
                await self.cluster.publish(room, host, None, {"op": "unhost", "room": room})

    async def node_gone(self, node_id: str) -> None:
        """Another node is gone (its directory entry expired): its hosts leave every room."""
        prefix = f"{node_id}/"
        hosts = {h for s in self._rooms.values() for h in s.hosts if h.startswith(prefix)}
        for host in hosts:
            await self.host_gone(host)
