"""The nodes of a cluster and which room lives on which, in Redis (``mediaserver serve --redis URL``).

Every node (a front with its media workers) writes its entry every second
(``ms:node:<id>``: public URL, participants, rooms; it expires after
``NODE_TTL_S`` without a refresh) and the participants each of its rooms has
there (``ms:roomnodes:<room>``, a hash node -> count, expiring with them).
A room belongs to the node that claimed it first (``ms:room:<room>``, set only
if absent, refreshed by that node while it hosts the room, expiring
``ROOM_TTL_S`` after it stops): joins that reach another node are proxied to
it, unless the owner already has ``spill_after`` of the room's participants,
in which case the room spans both nodes (signaling/cluster/interbus.py).  A
node whose entry expired is gone: ``on_node_lost`` runs for it on every
other node.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

log = logging.getLogger(__name__)

NODE_TTL_S = 4
ROOM_TTL_S = 4
REFRESH_S = 1.0


@dataclass(frozen=True)
class NodeInfo:
    """A live node as its entry says."""

    id: str
    url: str  # its public HTTP base, e.g. http://10.0.0.2:8080
    participants: int
    rooms: int


class NodeDirectory:
    """Owns this node's entries in Redis, and the view of the other nodes."""

    def __init__(self, redis: Any, node_id: str, url: str,
                 local_state: Callable[[], tuple[int, dict[str, int]]]) -> None:
        self.redis = redis
        self.node_id = node_id
        self.url = url
        self._local_state = local_state  # () -> (participants, {room: participants here})
        self.nodes: dict[str, NodeInfo] = {}
        self.on_node_lost: list[Callable[[str], Any]] = []
        self._task: Optional[asyncio.Task[None]] = None
        self._closing = False
        self._hosted: set[str] = set()  # rooms with participants here at the last refresh

    async def start(self) -> None:
        await self._refresh()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="node-directory")

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()  # (bounded: see ClusterBus.close)
            await asyncio.wait({self._task}, timeout=2.0)
        try:
            await self.redis.delete(f"ms:node:{self.node_id}")
            for room in self._hosted:
                await self._release(room)
        except Exception:  # noqa: BLE001 - Redis gone too: the entries expire
            pass

    async def _run(self) -> None:
        while not self._closing:
            await asyncio.sleep(REFRESH_S)
            try:
                await self._refresh()
            except Exception as exc:  # noqa: BLE001 - Redis down: keep serving what is here, retry
                if self._closing:
                    return
                log.warning("cluster: Redis refresh failed: %s", exc)

    async def _refresh(self) -> None:
        participants, rooms = self._local_state()
        names = list(rooms)
        owners = await self.redis.mget([f"ms:room:{r}" for r in names]) if names else []
        pipe = self.redis.pipeline()
        pipe.set(f"ms:node:{self.node_id}", json.dumps({"url": self.url, "participants": participants,
                                                        "rooms": len(rooms), "at": time.time()}), ex=NODE_TTL_S)
        pipe.sadd("ms:nodes", self.node_id)
        for room, owner in zip(names, owners):
            pipe.hset(f"ms:roomnodes:{room}", self.node_id, rooms[room])
            pipe.expire(f"ms:roomnodes:{room}", ROOM_TTL_S * 4)
            if owner is None or _text(owner) == self.node_id:  # ours (or nobody's while we host it)
                pipe.set(f"ms:room:{room}", self.node_id, ex=ROOM_TTL_S)
        await pipe.execute()
        for room in self._hosted - set(names):
            await self._release(room)
        self._hosted = set(names)
        await self._read_nodes()

    async def _release(self, room: str) -> None:
        """No participant of ``room`` is here any more: give up its ownership (if ours) and our count."""
        owner = await self.redis.get(f"ms:room:{room}")
        if owner is not None and _text(owner) == self.node_id:
            await self.redis.delete(f"ms:room:{room}")
        await self.redis.hdel(f"ms:roomnodes:{room}", self.node_id)

    async def _read_nodes(self) -> None:
        ids = [_text(i) for i in await self.redis.smembers("ms:nodes")]
        values = await self.redis.mget([f"ms:node:{i}" for i in ids]) if ids else []
        alive: dict[str, NodeInfo] = {}
        for node_id, raw in zip(ids, values):
            if raw is None:
                continue
            entry = json.loads(raw)
            alive[node_id] = NodeInfo(node_id, str(entry["url"]), int(entry["participants"]), int(entry["rooms"]))
        lost = [n for n in self.nodes if n not in alive and n != self.node_id]
        gone = [i for i, raw in zip(ids, values) if raw is None]
        if gone:
            await self.redis.srem("ms:nodes", *gone)
        self.nodes = alive
        for node_id in lost:
            log.warning("cluster: node %s is gone", node_id)
            for callback in self.on_node_lost:
                result = callback(node_id)
                if asyncio.iscoroutine(result):
                    await result

    # -- rooms ---------------------------------------------------------------------------------------
    async def owner(self, room: str) -> str:
        """The node ``room`` belongs to, claiming it for the least loaded live node when it has none."""
        current = await self.redis.get(f"ms:room:{room}")
        if current is not None and _text(current) in self.nodes:
            return _text(current)
        candidates = sorted(self.nodes.values(), key=lambda n: (n.participants, n.id)) or [
            NodeInfo(self.node_id, self.url, 0, 0)]
        chosen = candidates[0].id
        if current is not None:  # its owner is gone: take it over
            await self.redis.delete(f"ms:room:{room}")
        if await self.redis.set(f"ms:room:{room}", chosen, nx=True, ex=ROOM_TTL_S * 4):
            return chosen
        won = await self.redis.get(f"ms:room:{room}")  # another node claimed it at the same moment
        return _text(won) if won is not None else self.node_id

    async def in_room(self, room: str, node_id: str) -> int:
        """Participants ``room`` has on node ``node_id`` (as that node last wrote)."""
        value = await self.redis.hget(f"ms:roomnodes:{room}", node_id)
        return int(value) if value is not None else 0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ClusterRouter:
    """Decides, for a join reaching this node, whether the room is hosted here or proxied to its owner;
    owns the HTTP client to the other nodes."""

    def __init__(self, directory: NodeDirectory, token: str, spill_after: int = 0) -> None:
        self.directory = directory
        self.token = token
        self.spill_after = spill_after
        self._session: Any = None
        self.proxied = 0

    def session(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=5))
        return self._session

    async def route(self, room: str) -> Optional[str]:
        """None: host the participant here; else the URL of the room's node.  Here too when the owner has
        ``spill_after`` of the room's participants already (the room then spans nodes) or Redis fails."""
        d = self.directory
        try:
            owner = await d.owner(room)
            if owner == d.node_id:
                return None
            if self.spill_after > 0 and await d.in_room(room, owner) >= self.spill_after:
                return None
        except Exception as exc:  # noqa: BLE001 - no Redis: this node serves what reaches it
            log.warning("cluster: routing room %s locally, Redis failed: %s", room, exc)
            return None
        info = d.nodes.get(owner)
        if info is None:
            return None
        self.proxied += 1
        return info.url

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
