"""The capacity baseline: a plain aiortc SFU that forwards audio, encoding once per published stream.

What a developer would write with aiortc's own parts and nothing of this
project: every published track is read once (aiortc's receiver: SRTP, its
fixed jitter buffer, its Opus decoder thread), encoded once with aiortc's
``OpusEncoder``, and the packets are handed to one bounded queue per
subscriber, whose ``RTCRtpSender`` only packetizes them (no per-subscriber
encode, no audio level).  It speaks enough of the project's signaling
protocol (docs/PROTOCOL.md: ``join``, ``offer``/``answer``, server offers
with a ``tracks`` map) for ``loadtest`` bots to measure it exactly as they
measure the real server.  No stages, no stats, no limits: a baseline only.

    .venv/bin/python bench/plain_forwarder.py --port 8090
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import itertools
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.codecs.opus import OpusEncoder
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

log = logging.getLogger("plain_forwarder")
TIME_BASE = fractions.Fraction(1, 48_000)
QUEUE_PACKETS = 5  # as the real server: 100 ms per subscriber, oldest dropped


@dataclass
class Packet:
    """One Opus packet in the shape aiortc's sender reads (``pts``, ``time_base``, bytes)."""

    data: bytes
    pts: int
    time_base: fractions.Fraction = TIME_BASE

    def __bytes__(self) -> bytes:
        return self.data


class PacketTrack(MediaStreamTrack):
    """A subscriber's copy of one published stream: a bounded queue of pre-encoded packets."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.queue: asyncio.Queue[Packet] = asyncio.Queue(QUEUE_PACKETS)
        self._pts = 0

    def offer(self, data: bytes) -> None:
        if self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(Packet(data, self._pts))
        self._pts += 960

    async def recv(self) -> Packet:  # type: ignore[override]
        if self.readyState != "live":
            raise MediaStreamError
        return await self.queue.get()


@dataclass
class Member:
    """One participant: its socket, peer connection and the one-at-a-time server offers."""

    id: str
    ws: web.WebSocketResponse
    pc: RTCPeerConnection
    room: Room
    sending: dict[str, PacketTrack] = field(default_factory=dict)  # publisher id -> our track to it
    tracks: dict[str, dict[str, Any]] = field(default_factory=dict)  # mid -> info
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    dirty: asyncio.Event = field(default_factory=asyncio.Event)
    readers: list[asyncio.Task[None]] = field(default_factory=list)


@dataclass
class Room:
    """Members and the encoded fan-out of each published stream."""

    id: str
    members: dict[str, Member] = field(default_factory=dict)
    publishers: set[str] = field(default_factory=set)


class Forwarder:
    """Rooms of members; one reader and one encoder per published track."""

    def __init__(self) -> None:
        self.rooms: dict[str, Room] = {}
        self._ids = itertools.count(1)

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=1 << 20)
        await ws.prepare(request)
        member: Member | None = None
        try:
            async for raw in ws:
                if raw.type != WSMsgType.TEXT:
                    continue
                msg = json.loads(raw.data)
                kind = msg.get("type")
                if kind == "join" and member is None:
                    member = self._join(ws, str(msg.get("room", "lobby")))
                    await ws.send_json({"type": "joined", "version": 1,
                                        "participant": {"id": member.id, "name": msg.get("name", "")},
                                        "room": {"id": member.room.id, "stages": [], "participants": [],
                                                 "streams": [], "active_speaker": None}})
                elif kind == "offer" and member is not None:
                    await self._client_offer(member, msg["sdp"])
                elif kind == "answer" and member is not None:
                    await member.pc.setRemoteDescription(RTCSessionDescription(msg["sdp"], "answer"))
                    member.answered.set()
                elif kind == "ping":
                    await ws.send_json({"type": "pong"})
        finally:
            if member is not None:
                await self._leave(member)
        return ws

    def _join(self, ws: web.WebSocketResponse, room_id: str) -> Member:
        room = self.rooms.setdefault(room_id, Room(room_id))
        member = Member(id=f"p{next(self._ids)}", ws=ws, pc=RTCPeerConnection(RTCConfiguration(iceServers=[])),
                        room=room)
        room.members[member.id] = member
        member.pc.on("track", lambda track: self._on_track(member, track))
        return member

    async def _client_offer(self, member: Member, sdp: str) -> None:
        await member.pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
        await member.pc.setLocalDescription(await member.pc.createAnswer())
        await member.ws.send_json({"type": "answer", "sdp": member.pc.localDescription.sdp})
        member.answered.set()
        member.readers.append(asyncio.get_running_loop().create_task(self._negotiator(member)))
        for pub in member.room.publishers:
            if pub != member.id:
                self._subscribe(member, pub)

    def _on_track(self, member: Member, track: MediaStreamTrack) -> None:
        room = member.room
        room.publishers.add(member.id)
        member.readers.append(asyncio.get_running_loop().create_task(self._read(member, track)))
        for other in list(room.members.values()):
            if other is not member and other.pc.remoteDescription is not None:
                self._subscribe(other, member.id)

    def _subscribe(self, member: Member, publisher: str) -> None:
        if publisher in member.sending:
            return
        track = PacketTrack()
        member.sending[publisher] = track
        transceiver = member.pc.addTransceiver(track, direction="sendonly")
        transceiver._forwarder_publisher = publisher  # type: ignore[attr-defined]
        member.dirty.set()

    async def _negotiator(self, member: Member) -> None:
        """One server offer at a time; changes meanwhile fold into the next."""
        while True:
            await member.dirty.wait()
            member.dirty.clear()
            await member.answered.wait()
            member.answered.clear()
            await member.pc.setLocalDescription(await member.pc.createOffer())
            tracks = {str(t.mid): {"stream": pub, "participant": pub, "kind": "microphone", "synthetic": False}
                      for t in member.pc.getTransceivers()
                      if (pub := getattr(t, "_forwarder_publisher", None)) is not None and t.mid is not None}
            await member.ws.send_json({"type": "offer", "sdp": member.pc.localDescription.sdp, "tracks": tracks})

    async def _read(self, member: Member, track: MediaStreamTrack) -> None:
        """The one reader of a published track: decode (aiortc), encode once, fan out."""
        encoder = OpusEncoder()
        try:
            while True:
                frame = await track.recv()
                payloads, _ = encoder.encode(frame)
                for other in list(member.room.members.values()):
                    out = other.sending.get(member.id)
                    if out is not None:
                        for data in payloads:
                            out.offer(data)
        except MediaStreamError:
            pass

    async def _leave(self, member: Member) -> None:
        room = member.room
        room.members.pop(member.id, None)
        room.publishers.discard(member.id)
        for task in member.readers:
            task.cancel()
        await member.pc.close()
        for other in room.members.values():
            track = other.sending.pop(member.id, None)
            if track is not None:
                track.stop()
        if not room.members:
            self.rooms.pop(room.id, None)


async def healthz(request: web.Request) -> web.Response:
    forwarder: Forwarder = request.app["forwarder"]
    return web.json_response({"status": "ok", "kind": "plain-aiortc-forwarder", "rooms": len(forwarder.rooms)})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text="# plain aiortc forwarder: no metrics\n", content_type="text/plain")


def create_app() -> web.Application:
    forwarder = Forwarder()
    app = web.Application()
    app["forwarder"] = forwarder
    app.router.add_get("/ws", forwarder.websocket)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    web.run_app(create_app(), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
