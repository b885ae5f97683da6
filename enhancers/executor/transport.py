"""The link between the server's process and the worker process: a pipe of typed messages, shared status.

Only the connection lives here; starting, killing and restarting the worker
process is :mod:`enhancers.executor.process`.  :class:`Channel` is one end of
a duplex ``multiprocessing`` pipe carrying the dataclasses of
:mod:`enhancers.executor.messages` (pickled: both ends are this code on one
machine); :class:`ParentChannel` is the parent's end, read by the event loop
itself (``add_reader``: no thread hand-off per tick).  :class:`WorkerStatus` is
a small block of shared memory the child writes and the parent reads without
asking: the job and the stage it is running since when, and whether a stage
load is in progress, so the parent can tell a hung stage from a child starved
by loading a model.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from typing import Any

from enhancers.executor.messages import ToChild, ToParent

SPEC_BYTES = 64  # room for the spec of the running stage


class _Shared(ctypes.Structure):
    _fields_ = [
        ("spec", ctypes.c_char * SPEC_BYTES),  # the stage running now ("" between stages)
        ("job_id", ctypes.c_longlong),  # the job running now (-1: none)
        ("job_started", ctypes.c_double),  # monotonic time it began
        ("loads", ctypes.c_int),  # stage loads running now
        ("load_started", ctypes.c_double),  # monotonic time the running load began
        ("load_ended", ctypes.c_double),  # monotonic time the last load ended
    ]


class WorkerStatus:
    """Owns the shared status block of one worker process (child writes, parent reads; no lock).

    Writers: the child's main thread (job and stage marks), its one loader
    thread (load marks).  ``time.monotonic`` is the system-wide clock, the
    same in both processes.
    """

    def __init__(self, ctx: SpawnContext) -> None:
        self.block: Any = ctx.RawValue(_Shared)
        self.block.job_id = -1

    # -- child side ------------------------------------------------------------------
    def set_stage(self, spec: str | None) -> None:
        self.block.spec = (spec or "").encode()[: SPEC_BYTES - 1]

    def begin_job(self, job_id: int) -> None:
        self.block.job_started = time.monotonic()
        self.block.job_id = job_id

    def end_job(self) -> None:
        self.block.job_id = -1
        self.set_stage(None)  # between jobs no stage runs: a hang or a death now is not a stage's fault

    def begin_load(self) -> None:
        self.block.load_started = time.monotonic()
        self.block.loads += 1

    def end_load(self) -> None:
        self.block.load_ended = time.monotonic()
        self.block.loads -= 1

    # -- parent side -----------------------------------------------------------------
    def running_spec(self) -> str:
        return bytes(self.block.spec).rstrip(b"\0").decode(errors="replace")

    def loading(self, now: float, timeout_s: float) -> bool:
        """A stage load is running in the child, for less than ``timeout_s`` so far."""
        return self.block.loads > 0 and now - self.block.load_started < timeout_s

    def job_started(self, job_id: int) -> float | None:
        """When the child began job ``job_id``; None when it is not running it."""
        block = self.block
        started = float(block.job_started)
        return started if block.job_id == job_id else None

    @property
    def load_ended(self) -> float:
        return float(self.block.load_ended)


class Channel:
    """One end of the worker pipe: typed messages out (from any thread), in (one reader)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._send_lock = threading.Lock()

    def send(self, message: ToChild | ToParent) -> None:
        """Raises OSError when the other end is gone."""
        with self._send_lock:
            self.conn.send(message)

    def recv(self) -> Any:
        """The next message; raises EOFError/OSError when the other end is gone."""
        return self.conn.recv()

    def close(self) -> None:
        self.conn.close()


class ParentChannel(Channel):
    """The parent's end, read on the event loop: each message goes to ``on_message``, a lost pipe to ``on_lost``."""

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_message: Callable[[ToParent], None] | None = None
        self._on_lost: Callable[[], None] | None = None

    def attach(self, loop: asyncio.AbstractEventLoop, on_message: Callable[[ToParent], None],
               on_lost: Callable[[], None]) -> None:
        self._loop, self._on_message, self._on_lost = loop, on_message, on_lost
        loop.add_reader(self.conn.fileno(), self._readable)

    def close(self) -> None:
        """Stop reading and close the pipe (idempotent)."""
        if self._loop is not None:
            self._loop.remove_reader(self.conn.fileno())
            self._loop = None
        self.conn.close()

    def _readable(self) -> None:
        conn, on_message = self.conn, self._on_message
        assert on_message is not None
        try:
            while not conn.closed and conn.poll():
                on_message(conn.recv())
        except (EOFError, OSError):
            if self._on_lost is not None and not conn.closed:
                self._on_lost()


def open_pipe(ctx: SpawnContext) -> tuple[ParentChannel, Connection]:
    """A new duplex pipe: the parent's channel, and the connection to hand to the child process."""
    parent, child = ctx.Pipe(duplex=True)
    return ParentChannel(parent), child
