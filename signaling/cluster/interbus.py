"""The room bus between nodes: one Redis pub/sub channel per room (``ms:bus:<room>``).

A node follows the channels of the rooms its workers host.  What its hub
publishes is a host's message with the host's relay address; what arrives from
the other nodes goes to the hub as from a host without a socket here
(signaling/cluster/bus.py).  Media does not pass Redis: the relay sends each
stream once per other host, directly, over UDP (mediaserver/relay.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Optional

from signaling.cluster.bus import RoomBusHub

log = logging.getLogger(__name__)


class ClusterBus:
    """Owns this node's pub/sub connection and which room channels it follows."""

    def __init__(self, redis: Any, hub: RoomBusHub, node_id: str) -> None:
        self.redis = redis
        self.hub = hub
        self.node_id = node_id
        self._pubsub = redis.pubsub()
        self._task: Optional[asyncio.Task[None]] = None
        self._closing = False
        self.following: set[str] = set()
        self.published = 0
        self.received = 0

    async def start(self) -> None:
        await self._pubsub.subscribe(f"ms:node-bus:{self.node_id}")  # keeps the connection subscribed
        self._task = asyncio.get_running_loop().create_task(self._listen(), name="cluster-bus")

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            # redis-py may turn a cancellation that lands inside a read into a connection error, which the
            # loop would survive: the flag ends it, and the wait is bounded so a node's shutdown never hangs
            await asyncio.wait({self._task}, timeout=2.0)
        closing = asyncio.ensure_future(self._pubsub.aclose())  # (it finishes its teardown even if cancelled)
        closing.add_done_callback(_retrieved)  # Redis gone: nothing to close
        await asyncio.wait({closing}, timeout=2.0)

    async def publish(self, room: str, host: str, relay: tuple[str, int] | None, body: dict[str, Any]) -> None:
        message = json.dumps({"node": self.node_id, "host": host, "relay": list(relay) if relay else None,
                              "body": body})
        try:
            await self.redis.publish(f"ms:bus:{room}", message)
            self.published += 1
        except Exception as exc:  # noqa: BLE001 - Redis down: the rooms of this node go on alone
            log.warning("cluster: publishing to room %s failed: %s", room, exc)

    async def follow(self, room: str) -> None:
        if room not in self.following:
            self.following.add(room)
            await self._pubsub.subscribe(f"ms:bus:{room}")

    async def unfollow(self, room: str) -> None:
        if room in self.following:
            self.following.discard(room)
            await self._pubsub.unsubscribe(f"ms:bus:{room}")

    async def _listen(self) -> None:
        while not self._closing:
            try:
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a dropped connection: retried after a pause
                if self._closing:
                    return
                log.warning("cluster: room bus read failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            if message is None or message.get("type") != "message":
                continue
            try:
                data = json.loads(message["data"])
                if data.get("node") == self.node_id:
                    continue
                relay = data.get("relay")
                self.received += 1
                await self.hub.remote(str(data["host"]), (str(relay[0]), int(relay[1])) if relay else None,
                                      dict(data["body"]))
            except Exception:  # noqa: BLE001 - one bad message must not end the bus
                log.exception("cluster: a room bus message failed")


def _retrieved(future: "asyncio.Future[Any]") -> None:
    """Its outcome read, so that an error closing a dead connection is not reported as never retrieved."""
    if not future.cancelled():
        future.exception()
