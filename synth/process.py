"""Synthesis in a process of its own, so that none of its work holds the media server's interpreter lock.

Synthesizing a 5000-character prompt (the engine, its watermark, resampling to 48 kHz, peak
normalization, padding) is seconds of CPU and passes over tens of MiB of samples.  On a thread of the
media server's process that work held the GIL against the event loop that paces the audio (150 ms gaps
in a call while ten such prompts were queued) and its buffers stayed in the server's heap.  Here one
niced child (``ms-synth``) owns the engine; :class:`SynthProcess` is the parent's side.  The child is a
fresh interpreter (``python -m synth.child``, :mod:`synth.child`) that imports only ``synth``, numpy and
scipy (~120 MiB): multiprocessing's spawn would import the server's ``__main__`` again (torch,
aiortc: ~360 MiB).

* Started on the first request (the media server's warm-up phrase makes that its start), started again
  on the next request after it died (killed, out of memory) or hung (no answer in
  ``request_timeout_s``: killed); the request it was running fails with ``EngineFailure``, the requests
  queued behind it go to the new child.  One request is in the child at a time.
* The child validates, synthesizes and renders (:func:`synth.render.render`) and converts to 16-bit
  samples.  It hands them back in a memory file (``memfd_create``) whose descriptor crosses the socket
  (SCM_RIGHTS); the parent maps it (libc ``mmap``, private; the descriptor is closed at once) and the
  int16 array, read-only, is a view of that mapping.  Nothing is copied, pickled or converted in the
  parent, its pages count in the server's RSS only as they are read (played), and unmapping (the last
  reference to the array gone: the prompt played, cut or dropped) frees them.  Short results (at most
  ``INLINE_BYTES``) travel inside the reply message instead.
* The socket is read by one thread of the parent (blocking reads, no Python work per sample), which
  hands each reply to the event loop.
* Errors cross as (class name, message, attributes) and are raised again as the same ``SynthError``
  subclass; anything else becomes ``EngineFailure``.
* The child's own disk cache: when the service's cache has a directory, the child reads and writes it
  (the parent keeps only the memory LRU, so no disk access happens on the event loop).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import itertools
import logging
import mmap
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from pathlib import Path
from typing import Any, cast

import numpy as np

import synth.engine as engine_module
from synth.cache import PromptCache
from synth.engine import EngineFailure, SynthEngine, SynthError, SynthResult, VoiceOptions
from synth.render import release_heap, render, to_pcm16

log = logging.getLogger("synth")

PROCESS_NAME = "ms-synth"
INLINE_BYTES = 256 * 1024  # results up to this size travel inside the reply (a few seconds of speech)
START_TIMEOUT_S = 120.0  # spawn + imports + engine load, on a busy machine
REQUEST_TIMEOUT_S = 300.0  # a child that has not answered one request by then is taken as hung
RESTART_BACKOFF_S = 2.0  # after a child that failed to start, requests fail at once for this long
_WRITE_BLOCK = 1 << 20


@dataclass(frozen=True)
class EngineInfo:
    """What the parent needs to know of the child's engine (cache keys, the text limit)."""

    name: str
    identity: str
    default_voice: str
    max_chars: int

    @classmethod
    def of(cls, engine: SynthEngine) -> EngineInfo:
        return cls(engine.name, engine.identity(), engine.default_voice(), engine.max_chars)


@dataclass(frozen=True)
class ChildSettings:
    """What the child is started with (picklable: it crosses the process boundary)."""

    engine_factory: Callable[[], SynthEngine]
    output_rate: int
    peak_dbfs: float | None
    cache_dir: str | None = None
    nice: int = 10


# -- errors across the boundary -------------------------------------------------------------------------
def error_payload(exc: BaseException) -> tuple[str, str, dict[str, Any]]:
    """(class name, message, attributes) of a SynthError; other errors as an EngineFailure."""
    if isinstance(exc, SynthError) and getattr(engine_module, type(exc).__name__, None) is type(exc):
        attrs = {k: v for k, v in vars(exc).items() if isinstance(v, (str, int, float, bool, type(None)))}
        return type(exc).__name__, str(exc), attrs
    return "EngineFailure", f"{type(exc).__name__}: {exc}", {}


def error_from(payload: tuple[str, str, dict[str, Any]]) -> SynthError:
    """The exception an ``error_payload`` describes."""
    name, message, attrs = payload
    cls = getattr(engine_module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SynthError)):
        return EngineFailure(message)
    exc = cls.__new__(cls)
    exc.args = (message,)
    exc.__dict__.update(attrs)
    return exc


# -- the child ---------------------------------------------------------------------------------------------------
def _prctl(option: int, arg: object) -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").prctl(option, arg, 0, 0, 0)
        except (OSError, AttributeError):
            pass


def _become_child(nice: int) -> None:
    _prctl(15, ctypes.c_char_p(PROCESS_NAME.encode()))  # PR_SET_NAME: ms-synth in top and ps
    _prctl(1, ctypes.c_int(15))  # PR_SET_PDEATHSIG: SIGTERM when the media process dies, however it dies
    if nice > 0 and hasattr(os, "nice"):
        try:
            os.nice(nice)
        except OSError:
            pass


def _memory_file(pcm: np.ndarray) -> int:
    """A memfd holding ``pcm``'s bytes (written with write(2): nothing of it stays mapped in the child)."""
    fd = os.memfd_create("synth-prompt", os.MFD_CLOEXEC)
    try:
        view = memoryview(np.ascontiguousarray(pcm).data).cast("B")
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:done + _WRITE_BLOCK])
        return fd
    except BaseException:
        os.close(fd)
        raise


def child_main(conn: Connection, settings: ChildSettings) -> None:
    """The synthesis process: load the engine, say hello, then answer one request at a time."""
    _become_child(settings.nice)
    try:
        engine = settings.engine_factory()
        info = EngineInfo.of(engine)
        disk = PromptCache(settings.cache_dir, memory_items=0) if settings.cache_dir else None
    except BaseException as exc:  # noqa: BLE001 - whatever it is, the parent must hear of it
        conn.send(("failed", error_payload(exc)))
        return
    conn.send(("hello", info, os.getpid()))
    parent = os.getppid()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        op, req_id = msg[0], msg[1]
        if op == "close":
            return
        try:
            if op == "voices":
                conn.send(("voices", req_id, engine.voices()))
            elif op == "synth":
                _answer(conn, req_id, parent, engine, disk, settings, *msg[2:])
        except Exception as exc:  # noqa: BLE001 - the request fails, the child goes on
            conn.send(("error", req_id, error_payload(exc)))
        finally:
            release_heap()


def _answer(conn: Connection, req_id: int, parent: int, engine: SynthEngine, disk: PromptCache | None,
            settings: ChildSettings, key: str, text: str, options: VoiceOptions) -> None:
    result = disk.get(key) if disk is not None else None
    hit = result is not None
    if result is None:
        result = render(engine, text, options, settings.output_rate, settings.peak_dbfs)
    pcm = to_pcm16(result.audio)
    result.audio = pcm
    if disk is not None and not hit:
        disk.put(key, result)
    meta = {"sample_rate": result.sample_rate, "engine": result.engine, "voice": result.voice,
            "extra": result.extra, "cache_hit": hit, "samples": len(pcm)}
    del result
    if pcm.nbytes <= INLINE_BYTES or not hasattr(os, "memfd_create"):
        conn.send(("audio", req_id, meta, pcm.tobytes()))
        return
    fd = _memory_file(pcm)
    del pcm
    try:
        conn.send(("audio", req_id, meta, None))
        send_handle(conn, fd, parent)
    finally:
        os.close(fd)


# -- the parent's side -------------------------------------------------------------------------------------
class _Mapping:
    """Owns one private mapping of a memory file (libc mmap: Python's mmap module keeps a duplicate of the
    file descriptor open for as long as the mapping lives, one per queued prompt); unmapped when garbage."""

    _libc: ctypes.CDLL | None = None

    def __init__(self, fd: int, size: int) -> None:
        libc = self._load()
        # private and writable: copy-on-write, so a stray write cannot fault; reads share the file's pages
        address = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, 0)
        if address is None or address == ctypes.c_void_p(-1).value:
            raise OSError(ctypes.get_errno(), "mmap of a prompt's memory file failed")
        self.address, self.size = int(address), size

    @classmethod
    def _load(cls) -> ctypes.CDLL:
        if cls._libc is None:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_long]
            libc.munmap.restype = ctypes.c_int
            libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            cls._libc = libc
        return cls._libc

    def __del__(self) -> None:
        if self._libc is not None:
            self._libc.munmap(self.address, self.size)


def _mapped_pcm(fd: int, samples: int) -> np.ndarray:
    """The int16 samples of a memfd, as a read-only view of a mapping that is unmapped with the array
    (and every view of it); the descriptor is closed at once."""
    try:
        mapping = _Mapping(fd, samples * 2)
    finally:
        os.close(fd)
    memory = (ctypes.c_char * mapping.size).from_address(mapping.address)
    memory._mapping = mapping  # type: ignore[attr-defined]  # the array's base keeps the mapping alive
    audio = np.frombuffer(cast(Any, memory), dtype=np.int16, count=samples)
    audio.flags.writeable = False
    return audio


class _ChildGone(EngineFailure):
    """The child died (or its socket closed) before answering."""


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


@dataclass
class _Request:
    op: str
    args: tuple[Any, ...]
    future: asyncio.Future[Any]


class _Child:
    """One running child: its process, the parent's end of the socket and the thread reading it."""

    def __init__(self, settings: ChildSettings, loop: asyncio.AbstractEventLoop,
                 deliver: Callable[[_Child, tuple[Any, ...]], None]) -> None:
        parent_end, child_end = socket.socketpair()
        try:
            # a fresh interpreter that imports only synth (multiprocessing's spawn would import the server's
            # __main__ again: torch, aiortc ... hundreds of MiB for a process that needs numpy and scipy)
            self.process = subprocess.Popen([sys.executable, "-m", "synth.child", str(child_end.fileno())],
                                            pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL)
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        self.conn = Connection(parent_end.detach())
        self.conn.send(list(sys.path))  # so that the engine factory unpickles there as it would here
        self.conn.send(settings)
        self.hello: asyncio.Future[EngineInfo] = loop.create_future()
        self.hello.add_done_callback(lambda f: f.cancelled() or f.exception())  # failures are read when awaited
        self.dead = False
        self._closing = threading.Lock()
        self._closed = False
        self._loop = loop
        self._deliver = deliver
        self._reader = threading.Thread(target=self._read, name="synth-reader", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def _read(self) -> None:
        """Reader thread: every message of the child, handed to the event loop; EOF when it is gone."""
        while True:
            try:
                msg = self.conn.recv()
                if msg[0] == "audio":
                    _, req_id, meta, inline = msg
                    if inline is not None:
                        audio = np.frombuffer(inline, dtype=np.int16)
                    elif meta["samples"]:
                        audio = _mapped_pcm(recv_handle(self.conn), int(meta["samples"]))
                    else:
                        audio = np.zeros(0, dtype=np.int16)
                    msg = ("audio", req_id, meta, audio)
                    del audio
            except (EOFError, OSError, RuntimeError, ValueError):
                msg = ("eof",)
            eof = msg[0] == "eof"
            try:
                self._loop.call_soon_threadsafe(self._deliver, self, msg)
            except RuntimeError:  # the loop is closed
                return
            del msg  # not held here while waiting for the next message: the audio is let go with its prompt
            if eof:
                return

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()

    def close(self, timeout_s: float = 5.0) -> None:
        """Blocking: ask the child to stop, kill it if it does not, and wait for the reader (once; any thread)."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            try:
                self.conn.send(("close", 0))
            except (OSError, ValueError):
                pass
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)
            if threading.current_thread() is not self._reader:
                self._reader.join(timeout_s)  # the child is gone: its reader has read EOF
            self.conn.close()


def _reap(child: _Child, unexpected: bool) -> None:
    try:
        child.close(1.0)
    except Exception:  # noqa: BLE001 - a reaper thread has nobody to tell but the log
        log.debug("closing a synthesis process failed", exc_info=True)
    if unexpected:
        log.error("the synthesis process (pid %s) exited with %s; the next request starts another",
                  child.pid, child.process.returncode)


class SynthProcess:
    """The parent's side: owns the child (spawn, restart, kill), the queue of requests and the one in the child.

    Use from one event loop.  ``synthesize`` returns int16 audio (read-only, possibly a view of a shared
    mapping); errors are the engine's ``SynthError`` subclasses.
    """

    def __init__(self, settings: ChildSettings, *, start_timeout_s: float = START_TIMEOUT_S,
                 request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.settings = settings
        self.start_timeout_s = start_timeout_s
        self.request_timeout_s = request_timeout_s
        self.info: EngineInfo | None = None  # known after the first child said hello
        self.starts = 0  # children started (restarts: starts - 1)
        self._child: _Child | None = None
        self._queue: asyncio.Queue[_Request] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._failed_at = 0.0
        self._failure: SynthError | None = None
        self._starting: asyncio.Lock | None = None
        self._closed = False

    @property
    def pid(self) -> int | None:
        """The running child's pid, or None."""
        child = self._child
        return child.pid if child is not None and not child.dead else None

    async def engine_info(self) -> EngineInfo:
        """The engine's name, identity, default voice and text limit (starting the child if needed)."""
        if self.info is None:
            await self._ensure_child()
            assert self.info is not None
        return self.info

    async def synthesize(self, key: str, text: str, options: VoiceOptions) -> SynthResult:
        meta, audio = await self._call("synth", key, text, options)
        audio.flags.writeable = False
        return SynthResult(audio=audio, sample_rate=int(meta["sample_rate"]), engine=str(meta["engine"]),
                           voice=str(meta["voice"]), cache_hit=bool(meta["cache_hit"]), extra=dict(meta["extra"]))

    async def voices(self) -> list[str]:
        return list(await self._call("voices"))

    async def _call(self, op: str, *args: Any) -> Any:
        if self._closed:
            raise RuntimeError("the synthesis process is closed")
        loop = asyncio.get_running_loop()
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run(), name="synth-process")
        request = _Request(op, args, loop.create_future())
        self._queue.put_nowait(request)
        return await request.future

    async def _run(self) -> None:
        """Send the queued requests to the child one at a time."""
        assert self._queue is not None
        while True:
            request = await self._queue.get()
            if request.future.done():  # its caller was cancelled
                continue
            try:
                try:
                    result = await self._send(request)
                except _ChildGone:  # the child was gone before it could answer: once more, on a new one
                    result = await self._send(request)
            except asyncio.CancelledError:
                _fail(request.future, EngineFailure("the synthesis service is closing"))
                raise
            except Exception as exc:
                _fail(request.future, exc)
            else:
                if not request.future.done():
                    request.future.set_result(result)
                del result
            del request  # nor here, while waiting for the next request

    async def _send(self, request: _Request) -> Any:
        child = await self._ensure_child()
        req_id = next(self._ids)
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[req_id] = answer
        try:
            child.conn.send((request.op, req_id, *request.args))
            return await asyncio.wait_for(asyncio.shield(answer), self.request_timeout_s)
        except TimeoutError:
            log.error("the synthesis process did not answer in %.0f s; it is started again", self.request_timeout_s)
            child.kill()
            raise EngineFailure(f"speech synthesis did not finish in {self.request_timeout_s:.0f} s") from None
        except (OSError, ValueError) as exc:  # the socket is gone: the child died a moment ago
            raise _ChildGone("the synthesis process is gone") from exc
        finally:
            self._waiting.pop(req_id, None)

    async def _ensure_child(self) -> _Child:
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:  # engine_info() and the request runner may both get here
            child = self._child
            if child is None or child.dead:
                child = await self._start()
        self.info = await asyncio.wait_for(asyncio.shield(child.hello), self.start_timeout_s)
        return child

    async def _start(self) -> _Child:
        if self._failure is not None and time.monotonic() - self._failed_at < RESTART_BACKOFF_S:
            raise self._failure
        # started from the event loop's thread (a vfork and exec: milliseconds), which lives as long as the
        # process: the child's parent-death signal follows the thread that started it
        child = _Child(self.settings, asyncio.get_running_loop(), self._deliver)
        self._child = child
        self.starts += 1
        try:
            self.info = await asyncio.wait_for(asyncio.shield(child.hello), self.start_timeout_s)
        except TimeoutError:
            child.kill()
            raise self._start_failed(EngineFailure("the synthesis process did not start in time")) from None
        except SynthError as exc:
            raise self._start_failed(exc) from None
        self._failure = None
        if self.starts > 1:
            log.warning("synthesis process started again (pid %s)", child.pid)
        return child

    def _start_failed(self, exc: SynthError) -> SynthError:
        self._failure, self._failed_at = exc, time.monotonic()
        return exc

    def _deliver(self, child: _Child, msg: tuple[Any, ...]) -> None:
        """On the event loop: one message from ``child``'s reader thread."""
        kind = msg[0]
        if kind == "hello":
            if not child.hello.done():
                child.hello.set_result(msg[1])
        elif kind == "failed":
            if not child.hello.done():
                child.hello.set_exception(error_from(msg[1]))
        elif kind == "eof":
            child.dead = True
            if not child.hello.done():
                child.hello.set_exception(EngineFailure("the synthesis process exited while starting"))
            unexpected = child is self._child and not self._closed
            if child is self._child:
                for waiting in self._waiting.values():
                    _fail(waiting, _ChildGone("the synthesis process died"))
            threading.Thread(target=_reap, args=(child, unexpected), name="synth-reap", daemon=True).start()
        else:
            answer = self._waiting.get(msg[1])
            if answer is None or answer.done():
                return
            if kind == "error":
                answer.set_exception(error_from(msg[2]))
            elif kind == "audio":
                answer.set_result((msg[2], msg[3]))
            else:
                answer.set_result(msg[2])

    def kill(self) -> None:
        """Kill the child now (tests, a hung child); the next request starts another."""
        if self._child is not None:
            self._child.kill()

    async def aclose(self) -> None:
        self._closed = True
        if self._runner is not None:
            self._runner.cancel()
            try:
                await self._runner
            except asyncio.CancelledError:
                pass
        while self._queue is not None and not self._queue.empty():
            _fail(self._queue.get_nowait().future, EngineFailure("the synthesis service is closing"))
        child, self._child = self._child, None
        if child is not None:
            await asyncio.to_thread(child.close)


def settings_for(engine_factory: Callable[[], SynthEngine] | None, output_rate: int, peak_dbfs: float | None,
                 cache_dir: Path | None, nice: int) -> ChildSettings:
    if engine_factory is None:
        from synth.espeak import EspeakEngine

        engine_factory = EspeakEngine
    return ChildSettings(engine_factory=engine_factory, output_rate=output_rate, peak_dbfs=peak_dbfs,
                         cache_dir=str(cache_dir) if cache_dir is not None else None, nice=nice)


