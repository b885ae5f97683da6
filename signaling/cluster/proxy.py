"""One participant's signaling WebSocket in the front: read its ``join``, then pump it to the room's worker.

Until the client joins, the front answers it itself with the same budget as a
worker would (``ping`` answered, at most ``max_messages_before_join`` messages,
``join_timeout_s``; anything else ``not-joined``), so that a socket that never
joins never reaches a worker.  The ``join`` picks the worker (``Placement``),
an upstream WebSocket to it is opened over its Unix socket with the client's
address in ``X-Forwarded-For``, the join frame is sent as it came, and from
then on frames go both ways unchanged: the worker speaks the protocol
(docs/PROTOCOL.md) and enforces its rate limits; its close code reaches the
client.  A worker that answers the join ``server-busy`` (its core is full,
mediaserver/loop_load.py) is left for the least loaded other ready worker,
and the room then spans both; only when every worker refused does the client
get the ``server-busy``.  A later ``join`` of another room on the same socket
(after a ``leave``) may live on another worker: the upstream is replaced.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Optional

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web

from mediaserver.config import LimitsConfig
from mediaserver.room import ROOM_ID_RE, RoomError
from signaling.cluster.pool import WorkerPool
from signaling.protocol import TokenBucket, error

log = logging.getLogger(__name__)

SERVICE_RESTART = 1012  # RFC 6455 close code: the server (here: the room's worker) restarted

# how long the front waits for a worker's answer to a join before pumping without it
JOIN_REPLY_S = 30.0


def _is_busy(reply: aiohttp.WSMessage) -> bool:
    """A worker's ``server-busy`` error frame (its core is full)."""
    if reply.type != WSMsgType.TEXT or '"server-busy"' not in reply.data:
        return False
    try:
        body = json.loads(reply.data)
    except (ValueError, RecursionError):
        return False
    return isinstance(body, dict) and body.get("type") == "error" and body.get("code") == "server-busy"


class SignalingProxy:
    """Owns one client WebSocket of the front and its upstream WebSocket to a worker."""

    def __init__(self, ws: web.WebSocketResponse, pool: WorkerPool, peer: str, limits: LimitsConfig,
                 transport: Optional[asyncio.BaseTransport], router: Any = None) -> None:
        self.ws = ws
        self.pool = pool
        # in a cluster: ``await router.route(room)`` is None (this node) or the URL of the node to proxy to
        self.router = router
        self.node_url: Optional[str] = None  # the other node this socket is proxied to
        self.peer = peer
        self.limits = limits
        self.transport = transport
        self.policy_closed = False
        self.worker: Optional[int] = None
        self.room: Optional[str] = None
        self._upstream: Optional[aiohttp.ClientWebSocketResponse] = None
        self._bucket = TokenBucket(limits.max_ws_messages_per_second, limits.max_ws_burst)

    # -- the client side before a join ----------------------------------------------------------
    async def run(self) -> None:
        try:
            join = await self._wait_for_join()
            while join is not None:
                join = await self._relay(join)
        finally:
            await self._close_upstream()

    async def _wait_for_join(self) -> Optional[tuple[str, str]]:
        """(room, the join frame's text), or None when the client went away or broke the rules."""
        deadline = time.monotonic() + self.limits.join_timeout_s
        messages = 0
        while not self.ws.closed:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                msg = await self.ws.receive(timeout=left)
            except asyncio.TimeoutError:
                await self.close_with("join-timeout", f"join a room within {self.limits.join_timeout_s:.0f} s "
                                                      "of connecting")
                return None
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return None
            messages += 1
            if messages > self.limits.max_messages_before_join:
                await self.close_with("not-joined", f"at most {self.limits.max_messages_before_join} messages "
                                                    "before a successful 'join'")
                return None
            if not self._bucket.take():
                continue  # over the rate before joining: dropped unread (the budget above closes it soon)
            if msg.type != WSMsgType.TEXT:
                await self._send(error("bad-message", "binary messages are not part of the protocol"))
                continue
            room = await self._join_room(msg.data)
            if room is not None:
                return room, msg.data
        return None

    async def _join_room(self, text: str) -> Optional[str]:
        """The room of a ``join`` frame (its validity beyond that is the worker's to judge); answers pings."""
        try:
            body = json.loads(text)
        except (ValueError, RecursionError):
            await self._send(error("bad-json", "not valid JSON"))
            return None
        mtype = body.get("type") if isinstance(body, dict) else None
        if mtype == "ping":
            await self._send({"type": "pong"})
            return None
        if mtype != "join":
            await self._send(error("not-joined", f"'{str(mtype)[:40]}' needs a 'join' first"))
            return None
        room = body.get("room")
        if not isinstance(room, str) or not ROOM_ID_RE.match(room):
            await self._send(error("bad-room", "room ids are 1-64 characters: letters, digits, '_', '-', '.'"))
            return None
        return room

    # -- joined: the two sockets pumped ---------------------------------------------------------
    async def _relay(self, join: tuple[str, str]) -> Optional[tuple[str, str]]:
        """Open the upstream of ``join``'s room and pump until either side closes; a join to a room on
        another worker ends it early with that join (room, text) to route next."""
        room, text = join
        await self._close_upstream()  # the room before, on another worker: the worker lets it leave
        if self.router is not None:
            url = await self.router.route(room)
            if url is not None:
                return await self._relay_to_node(url, room, text)
        refused: frozenset[int] = frozenset()  # workers that answered this join server-busy (full)
        while True:
            try:
                index = self.pool.placement.route(room, avoid=refused)
            except RoomError as exc:
                await self._send(error(exc.code, str(exc)))
                return await self._wait_for_join()
            try:
                upstream = await self.pool.session(index).ws_connect(
                    "http://worker/ws", headers={"X-Forwarded-For": self.peer}, heartbeat=None,
                    max_msg_size=self.limits.max_ws_message_bytes * 4, autoping=True)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                self.pool.placement.release(room, index)
                log.warning("%s: media worker for room %s unreachable: %s", self.peer, room, exc)
                await self._send(error("server-busy", "the room's media worker is not reachable; retry"))
                return await self._wait_for_join()
            self._upstream, self.worker, self.room = upstream, index, room
            await upstream.send_str(text)
            reply = await self._join_reply(upstream)
            if reply is not None and _is_busy(reply) and self.pool.placement.others(refused | {index}):
                # the worker is full (its core, mediaserver/loop_load.py JoinGate): another one takes the
                # newcomer and the room spans both (its streams relayed between them)
                log.info("%s: media worker %d is full; room %s spans to another worker", self.peer, index,
                         room[:64])
                refused |= {index}
                await self._close_upstream()
                continue
            if reply is not None and not self.ws.closed:
                await (self.ws.send_str(reply.data) if reply.type == WSMsgType.TEXT else self.ws.send_bytes(reply.data))
            return await self._pump(upstream, None)

    async def _join_reply(self, upstream: aiohttp.ClientWebSocketResponse) -> Optional[aiohttp.WSMessage]:
        """The worker's first frame after a join (``joined`` or an error); None when it closed instead (the
        pump then closes the client like it) or said nothing within ``JOIN_REPLY_S``."""
        try:
            msg = await upstream.receive(timeout=JOIN_REPLY_S)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            return None
        return msg if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY) else None

    async def _pump(self, upstream: aiohttp.ClientWebSocketResponse, join: Optional[str]) -> Optional[tuple[str, str]]:
        """Send ``join`` upstream (unless sent already), then pump both ways until either side closes (or a
        join to move)."""
        if join is not None:
            await upstream.send_str(join)
        down = asyncio.ensure_future(self._downstream(upstream))
        try:
            return await self._upstream_pump(upstream, down)
        finally:
            down.cancel()
            try:
                await down
            except asyncio.CancelledError:
                pass

    async def _relay_to_node(self, url: str, room: str, text: str) -> Optional[tuple[str, str]]:
        """The room belongs to another node of the cluster: proxy this socket to that node's front."""
        try:
            upstream = await self.router.session().ws_connect(
                url.replace("http", "ws", 1) + "/ws", heartbeat=None, max_msg_size=self.limits.max_ws_message_bytes * 4,
                headers={"X-Forwarded-For": self.peer, "X-Mediaserver-Node": self.router.token})
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            log.warning("%s: node %s of room %s unreachable: %s", self.peer, url, room, exc)
            await self._send(error("server-busy", "the room's node is not reachable; retry"))
            return await self._wait_for_join()
        self._upstream, self.worker, self.room, self.node_url = upstream, None, room, url
        return await self._pump(upstream, text)

    async def _upstream_pump(self, upstream: aiohttp.ClientWebSocketResponse,
                             upstream_closed: asyncio.Future[None]) -> Optional[tuple[str, str]]:
        """Client -> worker, until the client closes or the worker does (``upstream_closed``: the
        downstream pump ended); a join for a room on another worker is returned instead of forwarded."""
        ws = self.ws
        receive_client = asyncio.ensure_future(ws.receive())
        try:
            while True:
                waiting: list[asyncio.Future[Any]] = [receive_client, upstream_closed]
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if upstream_closed in done:
                    await self._close_client_like(upstream)
                    return None
                msg = receive_client.result()
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    return None
                if msg.type == WSMsgType.TEXT:
                    data = msg.data
                    if '"join"' in data:  # (cheap test first: only joins are looked into)
                        other = self._other_room(data)
                        if other is not None:
                            return other, data
                    await upstream.send_str(data)
                elif msg.type == WSMsgType.BINARY:
                    await upstream.send_bytes(msg.data)
                receive_client = asyncio.ensure_future(ws.receive())
        except (ConnectionError, RuntimeError):
            return None
        finally:
            if not receive_client.done():
                receive_client.cancel()

    def _other_room(self, text: str) -> Optional[str]:
        try:
            body = json.loads(text)
        except (ValueError, RecursionError):
            return None
        if not isinstance(body, dict) or body.get("type") != "join":
            return None
        room = body.get("room")
        if not isinstance(room, str) or not ROOM_ID_RE.match(room) or room == self.room:
            return None
        if self.node_url is not None or self.router is not None:
            return room  # in a cluster any other room may live elsewhere: routed again
        index = self.pool.placement.worker_of(room)
        return room if index is not None and index != self.worker else None

    async def _downstream(self, upstream: aiohttp.ClientWebSocketResponse) -> None:
        """Worker -> client, as it comes."""
        ws = self.ws
        try:
            async for msg in upstream:
                if ws.closed:
                    return
                if msg.type == WSMsgType.TEXT:
                    await ws.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
        except (ConnectionError, RuntimeError):
            pass

    async def _close_client_like(self, upstream: aiohttp.ClientWebSocketResponse) -> None:
        """The worker closed: close the client with the worker's code (1008 policy closes count as abuse);
        a connection lost without a close frame is a worker that died."""
        code = upstream.close_code
        if code is None or code == WSCloseCode.ABNORMAL_CLOSURE:
            await self.worker_lost()
            return
        if code == WSCloseCode.POLICY_VIOLATION:
            self.policy_closed = True
        if not self.ws.closed:
            await self.ws.close(code=code, message=b"closed by the media worker")

    async def _close_upstream(self) -> None:
        if self.room is not None and self.worker is not None:
            self.pool.placement.release(self.room, self.worker)
        self.room, self.node_url, self.worker = None, None, None
        upstream, self._upstream = self._upstream, None
        if upstream is not None and not upstream.closed:
            try:
                await asyncio.wait_for(upstream.close(), 5.0)
            except (asyncio.TimeoutError, ConnectionError, RuntimeError):
                pass

    async def worker_lost(self) -> None:
        """The room's worker died: the client is told to join again (1012) and closed."""
        await self._send(error("worker-restarted", "the room's media worker restarted; join again"))
        if not self.ws.closed:
            await self.ws.close(code=SERVICE_RESTART, message=b"media worker restarted")

    # -- helpers --------------------------------------------------------------------------------
    async def _send(self, message: dict[str, Any]) -> None:
        if self.ws.closed:
            return
        try:
            await self.ws.send_json(message)
        except (ConnectionError, RuntimeError):
            pass

    async def close_with(self, code: str, message: str) -> None:
        """One last error, a 1008 close, and the TCP connection dropped (as the worker does)."""
        self.policy_closed = True
        await self._send(error(code, message))
        if self.ws.closed:
            return
        closing = asyncio.ensure_future(self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=code.encode()))
        await asyncio.sleep(0)
        if self.transport is not None:
            self.transport.close()
        try:
            await asyncio.wait_for(closing, 2.0)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            pass
