"""Rooms that span media processes: this process's side of them.

A room can have participants on several hosts (the media workers of one
server; the same messages would carry between nodes).  Each host keeps its
own ``Room`` with its local participants and streams; ``RoomLinks`` makes the
others visible in it:

- the room's events (``participant-joined``, ``-updated``, ``-left``,
  ``room-updated``) go out on the *room bus* with ``Room.announce`` and come
  in from the other hosts: remote participants are listed in the room and
  told to the local ones like local events; a remote ``room-updated`` applies
  the room's stages to the local participants too;
- every local stream of the room gets one ``RelaySink`` per other host (its
  packets, encoded once here, sent once per host), and every stream of
  another host is a ``RemoteStream`` here, subscribed by the local
  participants who hear it.

The bus (``RoomBus``: the front's hub, signaling/cluster/bus.py) tells a host
the other hosts of each room it hosts and their relay addresses (``peers``),
and replays the room's participants and streams when a host joins it.

Bus messages (JSON objects), host -> bus: ``{"op": "host"|"unhost", "room"}``,
``{"op": "event", "room", "message"}``, ``{"op": "stream", "room", "event":
"added"|"removed", "stream": {id, owner, kind, synthetic, targets, relay:
[ip, port, id]}}``; bus -> host: the same ``event`` and ``stream`` messages of
the other hosts (with ``from``), and ``{"op": "peers", "room", "peers": {host:
[ip, port]}}``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Optional, Protocol

from mediaserver.relay import Address, RelayEndpoint, RelaySink, RemoteStream

if TYPE_CHECKING:
    from mediaserver.room import Room

log = logging.getLogger(__name__)

ROOM_EVENTS = ("participant-joined", "participant-updated", "participant-left", "room-updated")


class LinkedServer(Protocol):
    """What the links read and do of the media server (``MediaServer``): its rooms and clock, and setting a
    room's stages on its own participants."""

    rooms: Any  # RoomRegistry
    clock: Any  # MediaClock

    async def apply_room_stages(self, room: "Room", stages: list[str]) -> None: ...


class RoomBus(Protocol):
    """Where this host's room messages go (in order); the link's ``on_message`` gets the bus's."""

    def send(self, message: dict[str, Any]) -> None: ...


class RoomLinks:
    """Owns, for every room this process hosts, the other hosts, the relay sinks of local streams and
    the remote streams and participants."""

    def __init__(self, server: LinkedServer, endpoint: RelayEndpoint, bus: RoomBus) -> None:
        self.server = server
        self.endpoint = endpoint
        self.bus = bus
        self._peers: dict[str, dict[str, Address]] = {}  # room -> host -> relay address
        self._local: dict[str, dict[str, tuple[Any, int]]] = {}  # room -> stream id -> (stream, relay id)
        self._sinks: dict[tuple[str, str], RelaySink] = {}  # (stream id, host) -> sink
        self._remote: dict[str, dict[str, RemoteStream]] = {}  # room -> stream id -> remote stream
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- local side: what MediaServer and Room report ------------------------------------------
    def room_hosted(self, room: "Room") -> None:
        self._local.setdefault(room.id, {})
        self.bus.send({"op": "host", "room": room.id})

    async def room_unhosted(self, room: "Room") -> None:
        """The last local participant left: stop hearing the others (remote streams closed)."""
        self.bus.send({"op": "unhost", "room": room.id})
        for stream in list(self._remote.pop(room.id, {}).values()):
            await room.remove_stream(stream)  # type: ignore[arg-type]
            self._forget_remote(stream)
        room.remote_participants.clear()
        for sid in list(self._local.pop(room.id, {})):
            self._drop_sinks(sid)
        self._peers.pop(room.id, None)

    def stream_added(self, room: "Room", stream: Any, targets: Optional[set[str]]) -> None:
        if getattr(stream, "remote", False):
            return
        relay_id = self.endpoint.new_relay_id()
        self._local.setdefault(room.id, {})[stream.id] = (stream, relay_id)
        address = self.endpoint.address or ("127.0.0.1", 0)
        self.bus.send({"op": "stream", "room": room.id, "event": "added", "stream": {
            "id": stream.id, "owner": stream.owner_id, "kind": stream.kind, "synthetic": stream.synthetic,
            "targets": sorted(targets) if targets is not None else None,
            "relay": [address[0], address[1], relay_id]}})
        for host, peer in self._peers.get(room.id, {}).items():
            self._add_sink(stream, relay_id, host, peer)

    def stream_removed(self, room: "Room", stream: Any) -> None:
        if getattr(stream, "remote", False):
            return
        if self._local.get(room.id, {}).pop(stream.id, None) is None:
            return
        self._drop_sinks(stream.id)
        self.bus.send({"op": "stream", "room": room.id, "event": "removed", "stream": {"id": stream.id}})

    def room_event(self, room: "Room", message: dict[str, Any]) -> None:
        if message.get("type") in ROOM_EVENTS:
            self.bus.send({"op": "event", "room": room.id, "message": message})

    # -- remote side: what the bus says --------------------------------------------------------------
    def on_message(self, msg: dict[str, Any]) -> None:
        """A bus message (signaling hands them over in order, on the loop)."""
        op, room_id = msg.get("op"), msg.get("room")
        room = self.server.rooms.rooms.get(room_id) if isinstance(room_id, str) else None
        if room is None:
            return  # not (or no longer) hosted here
        if op == "peers":
            self._set_peers(room, {str(h): (str(a[0]), int(a[1])) for h, a in dict(msg.get("peers") or {}).items()})
        elif op == "event":
            self._spawn(self._remote_event(room, dict(msg.get("message") or {}), str(msg.get("from", ""))))
        elif op == "stream":
            self._spawn(self._remote_stream(room, str(msg.get("event")), dict(msg.get("stream") or {}),
                                            str(msg.get("from", ""))))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _set_peers(self, room: "Room", peers: dict[str, Address]) -> None:
        old = self._peers.get(room.id, {})
        self._peers[room.id] = peers
        for address in peers.values():
            self.endpoint.peers.add(address)
        for sid, (stream, relay_id) in self._local.get(room.id, {}).items():
            for host in old:
                if host not in peers:
                    sink = self._sinks.pop((sid, host), None)
                    if sink is not None:
                        stream.fanout.remove(sink)
            for host, peer in peers.items():
                if (sid, host) not in self._sinks:
                    self._add_sink(stream, relay_id, host, peer)

    def _add_sink(self, stream: Any, relay_id: int, host: str, peer: Address) -> None:
        sink = RelaySink(self.endpoint, peer, relay_id, stream)
        self._sinks[(stream.id, host)] = sink
        stream.fanout.add(sink)

    def _drop_sinks(self, stream_id: str) -> None:
        for key in [k for k in self._sinks if k[0] == stream_id]:
            sink = self._sinks.pop(key)
            sink.stream.fanout.remove(sink)

    async def _remote_event(self, room: "Room", message: dict[str, Any], origin: str) -> None:
        mtype = message.get("type")
        participant = message.get("participant") if isinstance(message.get("participant"), dict) else None
        if mtype in ("participant-joined", "participant-updated") and participant is not None:
            room.remote_participants[str(participant.get("id"))] = {**participant, "host": origin}
        elif mtype == "participant-left" and participant is not None:
            room.remote_participants.pop(str(participant.get("id")), None)
        elif mtype == "room-updated":
            stages = (message.get("room") or {}).get("stages")
            if isinstance(stages, list) and stages != room.stages:
                await self.server.apply_room_stages(room, stages)
                message = {"type": "room-updated", "room": room.describe()}
        else:
            return
        await room.broadcast(message)

    async def _remote_stream(self, room: "Room", event: str, desc: dict[str, Any], origin: str) -> None:
        sid = str(desc.get("id"))
        remotes = self._remote.setdefault(room.id, {})
        if event == "added":
            relay = desc.get("relay") or []
            if len(relay) != 3 or sid in remotes or sid in room.streams:
                return
            address: Address = (str(relay[0]), int(relay[1]))
            stream = RemoteStream(sid, str(desc.get("owner")), str(desc.get("kind", "microphone")),
                                  bool(desc.get("synthetic")), int(relay[2]), origin,
                                  lambda: self.server.clock.ticks)
            remotes[sid] = stream
            self.endpoint.streams[(address, stream.relay_id)] = stream
            self.endpoint.peers.add(address)
            targets = desc.get("targets")
            room.add_stream(stream, set(targets) if isinstance(targets, list) else None)  # type: ignore[arg-type]
        elif event == "removed":
            gone = remotes.pop(sid, None)
            if gone is not None:
                self._forget_remote(gone)
                await room.remove_stream(gone)  # type: ignore[arg-type]

    def _forget_remote(self, stream: RemoteStream) -> None:
        for key in [k for k, s in self.endpoint.streams.items() if s is stream]:
            del self.endpoint.streams[key]

    def stats(self) -> dict[str, Any]:
        return {**self.endpoint.stats(), "spanning_rooms": sum(1 for p in self._peers.values() if p),
                "relay_sinks": len(self._sinks)}

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self.endpoint.close()
