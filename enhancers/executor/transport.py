"""The link between the server's process and the worker process: a pipe of typed messages, shared status.

Only the connection lives here; starting, killing and restarting the worker
process is :mod:`enhancers.executor.process`.  :class:`Channel` is one end of
a duplex ``multiprocessing`` pipe carrying the dataclasses of
:mod:`enhancers.executor.messages` (pickled: both ends are this code on one
machine; the audio itself crosses in shared memory, :mod:`enhancers.executor.shm`);
:class:`ParentChannel` is the parent's end, read and written by the event loop
itself (``add_reader``: no thread hand-off per tick; non-blocking, framed).  :class:`WorkerStatus` is
a small block of shared memory the child writes and the parent reads without
asking: the job and the stage it is running since when, and whether a stage
load is in progress, so the parent can tell a hung stage from a child starved
by loading a model.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import struct
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from multiprocessing.reduction import ForkingPickler
from typing import Any

from enhancers.executor.messages import ToChild, ToParent

SPEC_BYTES = 64  # room for the spec of the running stage
READ_BYTES = 1 << 16


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


class ParentChannel:
    """The parent's end, on the event loop: each message goes to ``on_message``, a lost pipe to ``on_lost``.

    The event loop makes the descriptor non-blocking, so this end frames messages itself
    (``multiprocessing``'s format: a 4-byte big-endian length, then the pickle): reads take what
    is there and keep a partial message for the next wake-up; writes that do not fit the pipe
    wait in a buffer for the descriptor to be writable.  A short read or write is never taken
    for a dead child (it once was: ``BlockingIOError`` is an ``OSError``).
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._fd = conn.fileno()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_message: Callable[[ToParent], None] | None = None
        self._on_lost: Callable[[], None] | None = None
        self._in = bytearray()
        self._out = bytearray()
        self._writing = False
        self._lost = False

    def attach(self, loop: asyncio.AbstractEventLoop, on_message: Callable[[ToParent], None],
               on_lost: Callable[[], None]) -> None:
        self._loop, self._on_message, self._on_lost = loop, on_message, on_lost
        os.set_blocking(self._fd, False)
        loop.add_reader(self._fd, self._readable)

    def send(self, message: ToChild) -> None:
        """Queue ``message``; raises OSError when the other end is gone."""
        if self._lost or self.conn.closed:
            raise OSError("executor worker pipe is closed")
        payload = ForkingPickler.dumps(message)
        self._out += struct.pack("!i", len(payload))
        self._out += payload
        if not self._writing:
            self._flush()

    def _flush(self) -> None:
        try:
            while self._out:
                n = os.write(self._fd, self._out)
                del self._out[:n]
        except BlockingIOError:
            pass
        except OSError:
            self._out.clear()
            self._lose()
            return
        want = bool(self._out)
        if want != self._writing and self._loop is not None:
            if want:
                self._loop.add_writer(self._fd, self._flush)
            else:
                self._loop.remove_writer(self._fd)
            self._writing = want

    def close(self) -> None:
        """Stop reading and writing and close the pipe (idempotent)."""
        if self._loop is not None and not self.conn.closed:
            self._loop.remove_reader(self._fd)
            if self._writing:
                self._loop.remove_writer(self._fd)
        self._loop, self._writing = None, False
        self._out.clear()
        self.conn.close()

    def _lose(self) -> None:
        if not self._lost:
            self._lost = True
            if self._on_lost is not None and not self.conn.closed:
                self._on_lost()

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            return self._lose()
        if not data:
            return self._lose()
        buf = self._in
        buf += data
        on_message = self._on_message
        assert on_message is not None
        while len(buf) >= 4:
            (size,) = struct.unpack_from("!i", buf)
            if size < 0 or len(buf) < 4 + size:
                break  # (a negative size would be a >2 GiB message: never sent by the child)
            message = ForkingPickler.loads(bytes(buf[4:4 + size]))
            del buf[:4 + size]
            on_message(message)
            if self.conn.closed:
                return


def open_pipe(ctx: SpawnContext) -> tuple[ParentChannel, Connection]:
    """A new duplex pipe: the parent's channel, and the connection to hand to the child process."""
    parent, child = ctx.Pipe(duplex=True)
    return ParentChannel(parent), child
