"""Bot hosts in worker processes (each with its own event loop), driven from the coordinator.

``RemoteHost`` starts one spawned process running a ``BotHost`` and turns
its commands into awaitable calls over a ``multiprocessing`` pipe: requests
``(id, command, kwargs)`` go one way, replies ``(id, ok, result)`` the other.
A reader thread on each side keeps the event loops free.  ``LocalHost``
offers the same ``call`` on a ``BotHost`` in the caller's own loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import threading
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Protocol

from loadtest.host import BotHost
from loadtest.sources import SourceConfig, SourceLibrary

log = logging.getLogger(__name__)

COMMANDS = ("add", "status", "sendlogs", "trim", "analyze", "halt", "stop")


class WorkerError(RuntimeError):
    """A command failed in a worker process (the message carries its traceback)."""


class Host(Protocol):
    """What the coordinator drives: a ``BotHost`` here or in a worker process."""

    async def call(self, command: str, **kwargs: Any) -> Any: ...

    async def close(self) -> None: ...


class LocalHost:
    """A ``BotHost`` in the coordinator's own event loop (``--processes 0``)."""

    def __init__(self, sources: SourceConfig, url: str, light: bool = True, decode_share: float = 1.0,
                 fast: bool = True) -> None:
        self.host = BotHost(SourceLibrary(sources), url, light=light, decode_share=decode_share, fast=fast)

    async def call(self, command: str, **kwargs: Any) -> Any:
        if command not in COMMANDS:
            raise ValueError(f"unknown command {command!r}")
        return await getattr(self.host, command)(**kwargs)

    async def close(self) -> None:
        await self.host.stop()


def _pump(conn: Connection, loop: asyncio.AbstractEventLoop, inbox: asyncio.Queue[Any]) -> None:
    """Reader thread: every message from ``conn`` into ``inbox`` on ``loop``; None at end of pipe."""
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            msg = None
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, msg)
        except RuntimeError:  # loop closed
            return
        if msg is None:
            return


async def _serve(conn: Connection, sources: SourceConfig, url: str, light: bool, decode_share: float,
                 fast: bool) -> None:
    host = BotHost(SourceLibrary(sources), url, light=light, decode_share=decode_share, fast=fast)
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    threading.Thread(target=_pump, args=(conn, loop, inbox), daemon=True).start()
    tasks: set[asyncio.Task[None]] = set()

    async def handle(req_id: int, command: str, kwargs: dict[str, Any]) -> None:
        try:
            if command not in COMMANDS:
                raise ValueError(f"unknown command {command!r}")
            result = await getattr(host, command)(**kwargs)
            conn.send((req_id, True, result))
        except Exception:  # noqa: BLE001 - any failure goes back to the coordinator with its traceback
            conn.send((req_id, False, traceback.format_exc()))

    while True:
        msg = await inbox.get()
        if msg is None:
            await host.stop()
            return
        req_id, command, kwargs = msg
        if command == "stop":
            for t in tasks:
                t.cancel()
            await handle(req_id, command, kwargs)
            return
        task = loop.create_task(handle(req_id, command, kwargs))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def _loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if not use_uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def worker_main(conn: Connection, sources: SourceConfig, url: str, light: bool = True,
                log_level: int = logging.WARNING, decode_share: float = 1.0, fast: bool = True,
                use_uvloop: bool = True) -> None:
    """Entry point of a worker process (on uvloop when installed and asked for: cheaper per datagram)."""
    logging.basicConfig(level=log_level, format="%(asctime)s worker %(levelname)s %(name)s: %(message)s")
    try:
        with asyncio.Runner(loop_factory=_loop_factory(use_uvloop)) as runner:
            runner.run(_serve(conn, sources, url, light, decode_share, fast))
    finally:
        conn.close()


class RemoteHost:
    """A ``BotHost`` in a spawned worker process."""

    def __init__(self, sources: SourceConfig, url: str, name: str = "loadtest-worker", light: bool = True,
                 decode_share: float = 1.0, fast: bool = True, use_uvloop: bool = True) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=True)
        level = logging.getLogger("loadtest").getEffectiveLevel()
        self.process = ctx.Process(target=worker_main,
                                   args=(child, sources, url, light, level, decode_share, fast, use_uvloop),
                                   name=name, daemon=True)
        self.process.start()
        child.close()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._loop = asyncio.get_running_loop()
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        threading.Thread(target=_pump, args=(self._conn, self._loop, self._inbox), daemon=True).start()
        self._dispatcher = self._loop.create_task(self._dispatch())
        self._send_lock = asyncio.Lock()

    async def _dispatch(self) -> None:
        while True:
            msg = await self._inbox.get()
            if msg is None:
                for waiting in self._pending.values():
                    if not waiting.done():
                        waiting.set_exception(WorkerError(f"worker {self.process.pid} exited"))
                self._pending.clear()
                return
            req_id, ok, result = msg
            if req_id not in self._pending:
                continue
            fut = self._pending.pop(req_id)
            if fut.done():
                continue
            if ok:
                fut.set_result(result)
            else:
                fut.set_exception(WorkerError(str(result)))

    async def call(self, command: str, **kwargs: Any) -> Any:
        if self._dispatcher.done():
            raise WorkerError(f"worker {self.process.pid} is gone")
        req_id = next(self._ids)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._pending[req_id] = fut
        async with self._send_lock:
            await self._loop.run_in_executor(None, self._conn.send, (req_id, command, kwargs))
        return await fut

    async def close(self) -> None:
        if self.process.is_alive():
            try:
                await asyncio.wait_for(self.call("stop"), 15.0)
            except (TimeoutError, WorkerError, OSError):
                pass
        await self._loop.run_in_executor(None, self.process.join, 10.0)
        if self.process.is_alive():
            self.process.terminate()
            await self._loop.run_in_executor(None, self.process.join, 5.0)
        self._conn.close()
        self._dispatcher.cancel()
