"""One signaling WebSocket connection: the protocol state machine of a participant."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional

from aiohttp import WSMsgType, web

from mediaserver.auth import AuthError
from mediaserver.room import Participant, RoomError
from mediaserver.server import MediaServer
from mediaserver.session import NegotiationError
from signaling.prompts_api import handle_prompt_message
from signaling.protocol import (
    PROTOCOL_VERSION,
    ProtocolError,
    TokenBucket,
    check_version,
    error,
    parse_message,
    require_bool,
    require_str,
)

log = logging.getLogger(__name__)


class SignalingConnection:
    """Owns one WebSocket: parses messages, drives the MediaServer, sends events."""

    def __init__(self, ws: web.WebSocketResponse, server: MediaServer, peer: str) -> None:
        self.ws = ws
        self.server = server
        self.peer = peer
        limits = server.config.limits
        self.bucket = TokenBucket(limits.max_ws_messages_per_second, limits.max_ws_burst)
        self.participant: Optional[Participant] = None
        self.rate_limited = 0
        self._send_lock = asyncio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        if self.ws.closed:
            return
        async with self._send_lock:
            try:
                await self.ws.send_json(message)
            except (ConnectionError, RuntimeError):
                pass

    async def run(self) -> None:
        limits = self.server.config.limits
        try:
            async for msg in self.ws:
                if msg.type == WSMsgType.TEXT:
                    if not self.bucket.take():
                        self.rate_limited += 1
                        if self.rate_limited in (1, 10, 100, 1000) or self.rate_limited % 10000 == 0:
                            log.warning("%s: message rate limit exceeded (%d refused)", self.peer, self.rate_limited)
                        await self.send(error("rate-limited", "too many messages; slow down"))
                        continue
                    try:
                        message = parse_message(msg.data, limits.max_ws_message_bytes)
                        await self.handle(message)
                    except ProtocolError as exc:
                        log.info("%s: refused message: %s (%s)", self.peer, exc, exc.code)
                        await self.send(error(exc.code, str(exc)))
                    except (RoomError, AuthError) as exc:
                        log.info("%s: refused: %s (%s)", self.peer, exc, exc.code)
                        await self.send(error(exc.code, str(exc)))
                    except NegotiationError as exc:
                        log.info("%s: negotiation error: %s", self.peer, exc)
                        await self.send(error("bad-sdp", str(exc)))
                elif msg.type == WSMsgType.BINARY:
                    log.info("%s: refused binary message", self.peer)
                    await self.send(error("bad-message", "binary messages are not part of the protocol"))
                elif msg.type == WSMsgType.ERROR:
                    log.info("%s: websocket error: %s", self.peer, self.ws.exception())
        finally:
            if self.participant is not None:
                await self.server.leave(self.participant, reason="disconnected")
                self.participant = None

    async def handle(self, msg: dict[str, Any]) -> None:
        mtype = msg["type"]
        if mtype == "ping":
            await self.send({"type": "pong"})
            return
        if mtype == "join":
            await self._join(msg)
            return
        p = self.participant
        if p is None:
            raise ProtocolError("not-joined", f"'{mtype}' needs a 'join' first")
        max_sdp = self.server.config.limits.max_sdp_bytes
        if mtype == "offer":
            sdp = require_str(msg, "sdp", max_len=max_sdp)
            await self.server.accept_offer(p, sdp)  # sends the answer itself, before any server offer
        elif mtype == "answer":
            await self.server.accept_answer(p, require_str(msg, "sdp", max_len=max_sdp))
        elif mtype == "mute":
            await self.server.set_muted(p, require_bool(msg, "muted", True))
        elif mtype == "set-stages":
            stages = msg.get("stages")
            if stages is not None and not isinstance(stages, (str, list)):
                raise ProtocolError("bad-message", "'stages' is a comma-separated string, a list or null")
            if isinstance(stages, list) and not all(isinstance(s, str) for s in stages):
                raise ProtocolError("bad-message", "'stages' list items must be strings")
            await self.server.set_participant_stages(p, stages)
        elif mtype == "prompt":  # signaling/prompts_api.py
            await handle_prompt_message(self.server, p, msg, self.send)
        elif mtype == "leave":
            self.participant = None
            await self.server.leave(p)
            await self.send({"type": "left"})

    async def _join(self, msg: dict[str, Any]) -> None:
        if self.participant is not None:
            raise ProtocolError("already-joined", "this connection already joined a room")
        check_version(msg)
        limits = self.server.config.limits
        room_id = require_str(msg, "room", max_len=64)
        name = require_str(msg, "name", max_len=limits.max_name_length, optional=True, default="guest")
        name = name.strip() or "guest"
        stages = msg.get("stages")
        if stages is not None and not isinstance(stages, (str, list)):
            raise ProtocolError("bad-message", "'stages' is a comma-separated string or a list")
        echo = require_bool(msg, "echoCancellation", True)
        token = require_str(msg, "token", max_len=4096, optional=True) or None
        grant = self.server.auth.verify(token)
        if grant.room not in ("*", room_id):
            raise AuthError("wrong-room", f"the token is for room {grant.room!r}", status=403)
        if grant.name and name == "guest":
            name = grant.name
        p = await self.server.join(room_id, name, self.send, stages=stages, echo_cancellation=echo, grant=grant)
        self.participant = p
        await self.send({
            "type": "joined",
            "version": PROTOCOL_VERSION,
            "participant": p.describe(),
            "room": p.room.describe(),
        })
