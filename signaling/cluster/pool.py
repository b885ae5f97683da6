"""The media worker processes of a front, and which room lives on which of them.

``WorkerPool`` starts N worker processes (``signaling.cluster.worker_main``),
each serving the whole application on a Unix socket of its own, and watches
them: every ``poll_s`` it reads each worker's ``/internal/state`` (its rooms,
participants and load), and a worker whose process died is started again
after a backoff (1 s doubling to 30 s); its rooms are forgotten, so that
their participants, who lost their WebSocket with it, rejoin on a live one.

``Placement`` is the one table of room -> worker.  A room is placed when
its first participant arrives through the front: on the live worker with
the fewest participants (the front's own joined sockets there, or what the
worker reports if more: phone calls do not pass the front).  A worker may also start hosting a room by itself (a
phone call: the SIP bridge runs on worker 0): the room then spans workers
(signaling/cluster/bus.py) and the placement keeps sending WebSocket joins
to the room's first host.  A room no worker reports any more (it emptied)
is forgotten after a grace period.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import aiohttp

from mediaserver.config import ServerConfig
from mediaserver.room import RoomError

log = logging.getLogger(__name__)

CLAIM_GRACE_S = 10.0  # a room placed on a worker that does not report it yet is kept this long
START_TIMEOUT_S = 180.0  # a worker that is not healthy within this long after its start is restarted
RESTART_MAX_S = 30.0


@dataclass
class WorkerHandle:
    """One worker process as the front sees it."""

    index: int
    socket_path: str
    process: Any = None  # multiprocessing.Process
    ready: bool = False
    started_at: float = 0.0
    restarts: int = 0
    next_start: float = 0.0  # monotonic time the next start may happen (backoff)
    state: dict[str, Any] = field(default_factory=dict)  # the last /internal/state
    polled_at: float = 0.0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    @property
    def participants(self) -> int:
        return int(self.state.get("participants", 0))

    def describe(self) -> dict[str, Any]:
        return {"index": self.index, "pid": self.process.pid if self.process is not None else None,
                "ready": self.ready, "restarts": self.restarts, **self.state}


class Placement:
    """Owns the room -> worker table (front only; every decision on its event loop)."""

    def __init__(self, workers: list[WorkerHandle], spill_after: int = 0) -> None:
        self._workers = workers
        self.spill_after = spill_after
        self._rooms: dict[str, int] = {}
        self._placed_at: dict[str, float] = {}  # rooms placed but not yet reported by their worker
        self._live: dict[tuple[str, int], int] = {}  # the front's joined sockets per (room, worker)

    def worker_of(self, room: str) -> Optional[int]:
        return self._rooms.get(room)

    def rooms_of(self, index: int) -> list[str]:
        return [r for r, i in self._rooms.items() if i == index]

    @property
    def rooms(self) -> dict[str, int]:
        return dict(self._rooms)

    def _in_room(self, room: str, index: int) -> int:
        """Participants of ``room`` on worker ``index``: the front's own live sockets there, or what the
        worker last reported if that is more (phone calls do not come through the front)."""
        reported = int(self._workers[index].state.get("rooms", {}).get(room, 0))
        return max(reported, self._live.get((room, index), 0))

    def load(self, index: int) -> int:
        """Participants on worker ``index``, counted the same way."""
        live = sum(n for (_, i), n in self._live.items() if i == index)
        return max(self._workers[index].participants, live)

    def route(self, room: str, avoid: frozenset[int] = frozenset()) -> int:
        """The worker for the next participant of ``room`` (a socket of the front, until ``release``): the
        room's worker (placing it if new), or, when ``spill_after`` of the room's participants are there
        already, the least loaded worker with room for one more; never one of ``avoid`` (workers that
        just refused this join as full: the room then spans to the least loaded other one)."""
        index = self.place(room)
        if self.spill_after > 0 and self._in_room(room, index) >= self.spill_after:
            fits = [w for w in self._workers if w.ready and self._in_room(room, w.index) < self.spill_after
                    and w.index not in avoid]
            if fits:
                index = min(fits, key=lambda w: (self.load(w.index), w.index)).index
        if index in avoid:
            others = self.others(avoid)
            if not others:
                raise RoomError("server-busy", "every media worker is at capacity; try again later", status=503)
            index = others[0]
        self._live[(room, index)] = self._live.get((room, index), 0) + 1
        return index

    def others(self, avoid: frozenset[int]) -> list[int]:
        """The ready workers not in ``avoid``, least loaded first."""
        ready = [w for w in self._workers if w.ready and w.index not in avoid]
        return [w.index for w in sorted(ready, key=lambda w: (self.load(w.index), w.index))]

    def release(self, room: str, index: int) -> None:
        """A socket routed by ``route`` left its room."""
        n = self._live.get((room, index), 0) - 1
        if n > 0:
            self._live[(room, index)] = n
        else:
            self._live.pop((room, index), None)

    def place(self, room: str, prefer: Optional[int] = None) -> int:
        """The worker of ``room``: where it is, else ``prefer`` (if ready), else the least loaded ready one."""
        index = self._rooms.get(room)
        if index is not None and self._workers[index].ready:
            return index
        ready = [w for w in self._workers if w.ready]
        if not ready:
            raise RoomError("server-busy", "no media worker is ready; retry in a moment", status=503)
        if prefer is not None and self._workers[prefer].ready:
            chosen = prefer
        else:
            chosen = min(ready, key=lambda w: (self.load(w.index), w.index)).index
        self._rooms[room] = chosen
        self._placed_at[room] = time.monotonic()
        return chosen

    def hosted(self, room: str, index: int) -> None:
        """Worker ``index`` hosts ``room`` (room bus): it is where the room's joins go, unless it has one."""
        owner = self._rooms.get(room)
        if owner is None or not self._workers[owner].ready:
            self._rooms[room] = index
        if self._rooms.get(room) == index:
            self._placed_at.pop(room, None)

    def unhosted(self, room: str, index: int, remaining: list[int]) -> None:
        """Worker ``index`` stopped hosting ``room``; ``remaining`` still do (the room stays where they are)."""
        if self._rooms.get(room) != index:
            return
        if remaining:
            self._rooms[room] = remaining[0]
        else:
            self._rooms.pop(room, None)
            self._placed_at.pop(room, None)

    def observe(self, index: int, reported: list[str]) -> None:
        """Worker ``index`` reports hosting ``reported`` (polled): rooms nobody placed are placed there; rooms
        placed there that it no longer reports are forgotten after a grace period (a join on its way)."""
        now = time.monotonic()
        present = set(reported)
        for room in reported:
            owner = self._rooms.get(room)
            if owner is None or not self._workers[owner].ready:
                self._rooms[room] = index
            if self._rooms.get(room) == index:
                self._placed_at.pop(room, None)
        for room in self.rooms_of(index):
            if room not in present and now - self._placed_at.get(room, 0.0) > CLAIM_GRACE_S:
                self._rooms.pop(room, None)
                self._placed_at.pop(room, None)

    def drop_worker(self, index: int) -> list[str]:
        for key in [k for k in self._live if k[1] == index]:
            del self._live[key]
        rooms = self.rooms_of(index)
        for room in rooms:
            self._rooms.pop(room, None)
            self._placed_at.pop(room, None)
        return rooms


class WorkerPool:
    """Owns the worker processes, their Unix sockets, the HTTP client to them and the placement."""

    def __init__(self, config: ServerConfig, count: int, socket_dir: str, front_socket: str,
                 poll_s: float = 1.0) -> None:
        self.config = config
        self.socket_dir = socket_dir
        self.front_socket = front_socket
        self.poll_s = poll_s
        self.workers = [WorkerHandle(i, os.path.join(socket_dir, f"worker-{i}.sock")) for i in range(count)]
        self.placement = Placement(self.workers, config.room_spill_after)
        self._ctx = multiprocessing.get_context("spawn")
        self._sessions: dict[int, aiohttp.ClientSession] = {}
        self._monitor: Optional[asyncio.Task[None]] = None
        self._closing = False
        self.on_worker_lost: list[Any] = []  # callbacks(index): its proxied sockets are closed

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self, wait_ready: bool = True) -> None:
        for w in self.workers:
            self._spawn(w)
        self._monitor = asyncio.get_running_loop().create_task(self._watch(), name="worker-pool")
        if wait_ready:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not all(w.ready for w in self.workers):
                if time.monotonic() > deadline:
                    raise RuntimeError("media workers did not become ready: "
                                       + ", ".join(str(w.index) for w in self.workers if not w.ready))
                await asyncio.sleep(0.1)

    def _spawn(self, w: WorkerHandle) -> None:
        from signaling.cluster.worker_main import run_worker

        try:
            os.unlink(w.socket_path)
        except FileNotFoundError:
            pass
        w.ready, w.state = False, {}
        w.process = self._ctx.Process(target=run_worker, name=f"ms-worker{w.index}",
                                      args=(self.config, w.index, len(self.workers), w.socket_path,
                                            self.front_socket))
        w.process.start()
        w.started_at = time.monotonic()
        log.info("media worker %d started (pid %d)", w.index, w.process.pid)

    async def close(self) -> None:
        self._closing = True
        if self._monitor is not None:
            self._monitor.cancel()
            try:
                await self._monitor
            except asyncio.CancelledError:
                pass
        for w in self.workers:
            if w.alive:
                w.process.terminate()  # SIGTERM: the worker drains its participants
        deadline = time.monotonic() + 15.0
        for w in self.workers:
            if w.process is None:
                continue
            while w.process.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if w.process.is_alive():
                w.process.kill()
            w.process.join(1.0)
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()

    # -- talking to workers ----------------------------------------------------------------------
    def session(self, index: int) -> aiohttp.ClientSession:
        session = self._sessions.get(index)
        if session is None or session.closed:
            connector = aiohttp.UnixConnector(path=self.workers[index].socket_path, limit=256)
            session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30))
            self._sessions[index] = session
        return session

    async def get_json(self, index: int, path: str, timeout_s: float = 5.0) -> Any:
        async with self.session(index).get(f"http://worker{path}",
                                           timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            return await resp.json()

    async def get_bytes(self, index: int, path: str, timeout_s: float = 10.0) -> tuple[int, bytes]:
        async with self.session(index).get(f"http://worker{path}",
                                           timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            return resp.status, await resp.read()

    # -- watching ---------------------------------------------------------------------------------
    async def _watch(self) -> None:
        while not self._closing:
            await asyncio.gather(*(self._check(w) for w in self.workers))
            await asyncio.sleep(self.poll_s)

    async def _check(self, w: WorkerHandle) -> None:
        now = time.monotonic()
        if w.process is None:
            if now >= w.next_start:
                self._spawn(w)
            return
        if not w.process.is_alive():
            self._lost(w, f"exited with code {w.process.exitcode}")
            return
        try:
            state = await self.get_json(w.index, "/internal/state", timeout_s=max(2.0, 3 * self.poll_s))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            if w.ready and now - w.polled_at > 15.0:
                log.error("media worker %d has not answered for %.0f s; restarting it", w.index, now - w.polled_at)
                w.process.kill()
            elif not w.ready and now - w.started_at > START_TIMEOUT_S:
                log.error("media worker %d did not start within %.0f s; restarting it", w.index, START_TIMEOUT_S)
                w.process.kill()
            return
        w.state, w.polled_at = state, now
        if not w.ready:
            w.ready = True
            log.info("media worker %d ready", w.index)
        self.placement.observe(w.index, list(state.get("rooms", {})))

    def _lost(self, w: WorkerHandle, why: str) -> None:
        rooms = self.placement.drop_worker(w.index)
        log.error("media worker %d %s; its %d rooms are gone, it starts again", w.index, why, len(rooms))
        w.process.join(0.1)
        w.process, w.ready, w.state = None, False, {}
        delay = min(RESTART_MAX_S, 2.0 ** min(w.restarts, 5))
        w.restarts += 1
        w.next_start = time.monotonic() + delay
        for callback in self.on_worker_lost:
            callback(w.index)
