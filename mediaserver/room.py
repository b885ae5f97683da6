"""Rooms and participants: who publishes what, and who hears whom.

SFU semantics: every participant publishes (at most) one microphone stream
and is subscribed to every other published stream of its room, including
prompt tracks addressed to it.  A ``Room`` keeps these relations and tells
participants about changes; media never passes through it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Protocol

from mediaserver.echo import RoomMix
from mediaserver.stream import PublishedStream

log = logging.getLogger(__name__)

ROOM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

Send = Callable[[dict[str, Any]], Awaitable[None]]


class MediaSession(Protocol):
    """How a participant receives the streams it hears (WebRTC peer, SIP call, ...)."""

    def subscribe(self, stream: PublishedStream) -> None: ...

    def unsubscribe(self, stream: PublishedStream) -> None: ...

    async def close(self) -> None: ...


class RoomError(Exception):
    """A request about rooms that cannot be honoured; ``code`` is the protocol error code."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass
class Participant:
    """One member of a room: identity, peer session, published stream and settings."""

    id: str
    name: str
    room: "Room"
    session: MediaSession
    send: Send
    kind: str = "webrtc"  # webrtc | sip | bot
    stages: Optional[list[str]] = None  # None: the room's stages
    echo_cancellation_client: bool = True
    published: Optional[PublishedStream] = None
    muted: bool = False
    can_publish: bool = True
    can_subscribe: bool = True
    is_admin: bool = True
    identity: Optional[str] = None  # the join token's ``sub``; unique in a room (None: development grant)
    offered: bool = False  # the client's one offer arrived (the join-without-offer timeout stops)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "kind": self.kind,
            "muted": self.muted,
            "publishing": self.published is not None,
            **self.stage_state(),
        }

    def stage_state(self) -> dict[str, Any]:
        """``stages``: what runs on the microphone (the executor's admission control may give less than
        was asked for), ``requested_stages``, ``degraded_reason`` (None when they are the same)."""
        pipeline = self.published.pipeline if self.published is not None else None
        if pipeline is None:
            stages = self.effective_stages()
            return {"stages": stages, "requested_stages": stages, "degraded_reason": None}
        return {"stages": pipeline.stages, "requested_stages": pipeline.requested_stages,
                "degraded_reason": pipeline.degraded_reason or None}

    def effective_stages(self) -> list[str]:
        """Explicit stages, else the room's; plus server echo cancellation when the client has none."""
        if self.stages is not None:
            return list(self.stages)
        stages = list(self.room.stages)
        if not self.echo_cancellation_client and not any(s.split(":")[0] == "aec" for s in stages):
            stages.insert(0, "aec")
        return stages


@dataclass
class Room:
    """The participants and published streams of one room."""

    id: str
    stages: list[str]
    participants: dict[str, Participant] = field(default_factory=dict)
    streams: dict[str, PublishedStream] = field(default_factory=dict)
    stream_targets: dict[str, Optional[set[str]]] = field(default_factory=dict)
    active_speaker: Optional[str] = None
    mix: RoomMix = field(default_factory=RoomMix)
    # a room spanning media processes (mediaserver/federation.py): the others' participants, as described
    # by their hosts, and the link that carries this room's events and streams to them (None: alone)
    remote_participants: dict[str, dict[str, Any]] = field(default_factory=dict)
    links: Any = None

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "stages": list(self.stages),
            "participants": [p.describe() for p in self.participants.values()]
            + list(self.remote_participants.values()),
            "streams": [
                {"id": s.id, "owner": s.owner_id, "kind": s.kind, "synthetic": s.synthetic,
                 "subscribers": s.fanout.subscriber_count}
                for s in self.streams.values()
            ],
            "active_speaker": self.active_speaker,
        }

    async def announce(self, message: dict[str, Any], exclude: Optional[str] = None) -> None:
        """A room event (participants, room settings): to the local participants and the room's other hosts."""
        if self.links is not None:
            self.links.room_event(self, message)
        await self.broadcast(message, exclude)

    async def broadcast(self, message: dict[str, Any], exclude: Optional[str] = None) -> None:
        for p in list(self.participants.values()):
            if p.id != exclude:
                try:
                    await p.send(message)
                except Exception:  # a broken socket must not stop the others
                    log.debug("send to %s failed", p.id, exc_info=True)

    def _hears(self, participant: Participant, stream: PublishedStream) -> bool:
        if stream.owner_id == participant.id or not participant.can_subscribe:
            return False
        targets = self.stream_targets.get(stream.id)
        return targets is None or participant.id in targets

    # -- membership -----------------------------------------------------------
    def add_participant(self, participant: Participant) -> None:
        self.participants[participant.id] = participant

    def with_identity(self, identity: str) -> Optional[Participant]:
        """The participant that joined with this token identity, if any (identities are unique per room)."""
        return next((p for p in self.participants.values() if p.identity == identity), None)

    def subscribe_existing(self, participant: Participant) -> None:
        """Subscribe a newly ready participant to every stream it should hear."""
        for stream in self.streams.values():
            if self._hears(participant, stream):
                participant.session.subscribe(stream)

    async def remove_participant(self, participant: Participant) -> None:
        self.participants.pop(participant.id, None)
        self.mix.remove_participant(participant.id)
        if participant.published is not None:
            await self.remove_stream(participant.published)
            participant.published = None
        await participant.session.close()

    # -- streams ----------------------------------------------------------------
    def add_stream(self, stream: PublishedStream, targets: Optional[set[str]] = None) -> None:
        self.streams[stream.id] = stream
        self.stream_targets[stream.id] = targets
        self.mix.add_stream(stream, targets)
        if self.links is not None:
            self.links.stream_added(self, stream, targets)
        for p in self.participants.values():
            if self._hears(p, stream):
                p.session.subscribe(stream)

    async def remove_stream(self, stream: PublishedStream) -> None:
        if self.streams.pop(stream.id, None) is None:
            return
        if self.links is not None:
            self.links.stream_removed(self, stream)
        self.stream_targets.pop(stream.id, None)
        self.mix.remove_stream(stream)
        for p in self.participants.values():
            p.session.unsubscribe(stream)
        await stream.close()

    def update_active_speaker(self) -> Optional[str]:
        """Recompute the active speaker from VAD and level; return it when it changed."""
        best: Optional[str] = None
        best_level = -60.0
        for stream in self.streams.values():
            c = stream.counters
            if stream.kind == "microphone" and c.vad >= 0.5 and c.level_dbfs > best_level:
                best, best_level = stream.owner_id, c.level_dbfs
        if best is not None and best != self.active_speaker:
            self.active_speaker = best
            return best
        return None


class RoomRegistry:
    """All rooms of the process, created on first join and dropped when empty."""

    def __init__(self, default_stages: list[str], max_rooms: int, max_participants: int) -> None:
        self.rooms: dict[str, Room] = {}
        self._default_stages = list(default_stages)
        self._max_rooms = max_rooms
        self._max_participants = max_participants
        self.links: Any = None  # mediaserver/federation.RoomLinks when rooms may span processes

    @property
    def default_stages(self) -> list[str]:
        """The stages of rooms created from now on."""
        return list(self._default_stages)

    @default_stages.setter
    def default_stages(self, stages: list[str]) -> None:
        self._default_stages = list(stages)

    @staticmethod
    def validate_id(room_id: str) -> None:
        if not isinstance(room_id, str) or not ROOM_ID_RE.match(room_id):
            raise RoomError("bad-room", "room ids are 1-64 characters: letters, digits, '_', '-', '.'")

    def get(self, room_id: str) -> Room:
        room = self.rooms.get(room_id)
        if room is None:
            raise RoomError("unknown-room", f"no room {room_id!r}", status=404)
        return room

    def get_or_create(self, room_id: str, stages: Optional[list[str]] = None) -> Room:
        self.validate_id(room_id)
        room = self.rooms.get(room_id)
        if room is None:
            if len(self.rooms) >= self._max_rooms:
                raise RoomError("too-many-rooms", "the server is at its room limit", status=503)
            room = Room(id=room_id, stages=list(stages if stages is not None else self._default_stages),
                        links=self.links)
            self.rooms[room_id] = room
            if self.links is not None:
                self.links.room_hosted(room)
        if len(room.participants) >= self._max_participants:
            raise RoomError("room-full", f"room {room_id!r} is full", status=503)
        return room

    def drop_if_empty(self, room: Room) -> None:
        if not room.participants and not room.streams and self.rooms.get(room.id) is room:
            del self.rooms[room.id]

    async def drop_if_unused(self, room: Room) -> None:
        """No local participant is left: stop hosting a spanning room (its remote streams close), then
        drop it if nothing of its own is left either."""
        if room.participants or self.rooms.get(room.id) is not room:
            return
        if room.links is not None:
            await room.links.room_unhosted(room)
        self.drop_if_empty(room)

    @property
    def participant_count(self) -> int:
        return sum(len(r.participants) for r in self.rooms.values())


def new_id(prefix: str = "") -> str:
    return prefix + secrets.token_hex(4)


async def cancel_quietly(task: Optional[asyncio.Task[Any]]) -> None:
    if task is None:
        return
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
