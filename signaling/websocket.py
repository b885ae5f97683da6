"""One signaling WebSocket connection: the protocol state machine of a participant."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional

from aiohttp import WSCloseCode, WSMessage, WSMsgType, web

from mediaserver.auth import AuthError
from mediaserver.room import Participant, RoomError
from mediaserver.server import MediaServer, validate_stages
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

    def __init__(self, ws: web.WebSocketResponse, server: MediaServer, peer: str,
                 transport: Optional[asyncio.BaseTransport] = None) -> None:
        self.ws = ws
        self.transport = transport  # closed right after a policy close frame (see close_with)
        self.policy_closed = False
        self.server = server
        self.peer = peer
        limits = server.config.limits
        self.bucket = TokenBucket(limits.max_ws_messages_per_second, limits.max_ws_burst)
        self.participant: Optional[Participant] = None
        self.rate_limited = 0  # refused by the rate limit, ever
        self.unjoined_messages = 0  # since connecting or since the last leave
        self.internal_errors = 0
        self._flood_window_start = time.monotonic()
        self._flood_refused = 0
        self._join_deadline = time.monotonic() + limits.join_timeout_s
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
        """Read messages until the socket closes; leave the room at the end, whatever happened."""
        try:
            while not self.ws.closed:
                msg = await self._receive()
                if msg is None or msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                    break
                if msg.type == WSMsgType.ERROR:
                    log.info("%s: websocket error: %s", self.peer, self.ws.exception())
                    continue
                if not await self._admit():
                    continue
                if msg.type == WSMsgType.TEXT:
                    await self._handle_text(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    log.info("%s: refused binary message", self.peer)
                    await self.send(error("bad-message", "binary messages are not part of the protocol"))
        finally:
            if self.participant is not None:
                await self.server.leave(self.participant, reason="disconnected")
                self.participant = None

    async def _receive(self) -> Optional[WSMessage]:
        """The next frame; an unjoined socket waits at most until its join deadline (then closed)."""
        if self._current() is not None:
            return await self.ws.receive()
        remaining = self._join_deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            return await self.ws.receive(timeout=remaining)
        except asyncio.TimeoutError:
            s = self.server.config.limits.join_timeout_s
            log.info("%s: no join within %.0f s, closing", self.peer, s)
            await self.close_with("join-timeout", f"join a room within {s:.0f} s of connecting")
            return None

    async def _admit(self) -> bool:
        """O(1) admission of one frame: rate limit, flood and pre-join budgets.  False: dropped unread."""
        limits = self.server.config.limits
        if self._current() is None:
            self.unjoined_messages += 1
            if self.unjoined_messages > limits.max_messages_before_join:
                log.info("%s: %d messages without joining, closing", self.peer, self.unjoined_messages)
                await self.close_with("not-joined", f"at most {limits.max_messages_before_join} messages "
                                      "before a successful 'join'")
                return False
        if self.bucket.take():
            return True
        self.rate_limited += 1
        now = time.monotonic()
        if now - self._flood_window_start > limits.ws_flood_window_s:
            self._flood_window_start, self._flood_refused = now, 0
        self._flood_refused += 1
        if self.rate_limited in (1, 10, 100, 1000) or self.rate_limited % 10000 == 0:
            log.warning("%s: message rate limit exceeded (%d refused)", self.peer, self.rate_limited)
        if self._flood_refused > limits.ws_flood_close_after:
            log.warning("%s: %d messages refused within %.0f s, closing", self.peer, self._flood_refused,
                        limits.ws_flood_window_s)
            await self.close_with("rate-limited", "too many messages; closing this connection")
        elif self._flood_refused == 1:  # one reply per window, then silence: refusals cost no writes
            await self.send(error("rate-limited", "too many messages; slow down (further ones are dropped)"))
        elif self._flood_refused % 64 == 0:
            await asyncio.sleep(0)  # a socket with a full buffer does not hold the event loop
        return False

    async def close_with(self, code: str, message: str) -> None:
        """Send one last error and close the socket with 1008 (policy violation).

        The TCP connection is closed right after the close frame: a flooding
        client's remaining frames are not read (aiohttp's own close would read
        and parse them until the client's close frame, for up to 10 s).
        """
        self.policy_closed = True
        await self.send(error(code, message))
        if self.ws.closed:
            return
        closing = asyncio.ensure_future(self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=code.encode()))
        await asyncio.sleep(0)  # the close frame is written
        if self.transport is not None:
            self.transport.close()
        try:
            await asyncio.wait_for(closing, 2.0)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            pass

    def _current(self) -> Optional[Participant]:
        """The participant of this socket, forgetting one the server removed (kicked, replaced, timed out)."""
        p = self.participant
        if p is not None and p.room.participants.get(p.id) is not p:
            self.participant = None
            self._join_deadline = time.monotonic() + self.server.config.limits.join_timeout_s
            self.unjoined_messages = 0
            return None
        return p

    async def _handle_text(self, data: str) -> None:
        limits = self.server.config.limits
        try:
            message = parse_message(data, limits.max_ws_message_bytes)
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
        except Exception:  # a bug must cost this message, never the socket without a word
            self.internal_errors += 1
            if self.internal_errors in (1, 10, 100) or self.internal_errors % 1000 == 0:
                log.exception("%s: internal error handling a message (%d so far)", self.peer,
                              self.internal_errors)
            await self.send(error("internal-error", "the server failed to handle this message"))

    async def handle(self, msg: dict[str, Any]) -> None:
        mtype = msg["type"]
        if mtype == "ping":
            await self.send({"type": "pong"})
            return
        if mtype == "join":
            await self._join(msg)
            return
        p = self._current()
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
            stages = msg.get("stages")  # null: back to the room's stages
            await self.server.set_participant_stages(p, None if stages is None else validate_stages(stages))
        elif mtype == "prompt":  # signaling/prompts_api.py
            await handle_prompt_message(self.server, p, msg, self.send)
        elif mtype == "leave":
            self.participant = None
            self._join_deadline = time.monotonic() + self.server.config.limits.join_timeout_s
            self.unjoined_messages = 0
            await self.server.leave(p)
            await self.send({"type": "left"})

    async def _join(self, msg: dict[str, Any]) -> None:
        if self._current() is not None:
            raise ProtocolError("already-joined", "this connection already joined a room")
        check_version(msg)
        limits = self.server.config.limits
        room_id = require_str(msg, "room", max_len=64)
        name = require_str(msg, "name", max_len=limits.max_name_length, optional=True, default="guest")
        name = name.strip() or "guest"
        raw_stages = msg.get("stages")
        stages = None if raw_stages is None else validate_stages(raw_stages)  # before any room exists
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
