"""The executor service's network protocol: versioned, authenticated, binary (no pickles on the wire).

A connection carries frames: a 4-byte big-endian length (at most
``MAX_FRAME``), a 1-byte type, then the body.  Numbers are big-endian, strings
are a 2-byte length and UTF-8, small dictionaries (stage options, side info,
timings, stats) are a 4-byte length and JSON, audio is little-endian float32
rows of 480 samples.

Handshake: the service sends ``CHALLENGE`` (protocol version, 16 random bytes);
the client answers ``HELLO`` (version, its name, HMAC-SHA256 of the nonce under
the shared token); the service answers ``WELCOME`` (its device) or ``ERROR``
and closes.  Then, client -> service: ``LOAD`` (a stage spec and its options),
``DECLARE`` (a stream's stages), ``CLOSE_STREAM``, ``JOB`` (rounds of rows: stream
ids, audio, far-end references); service -> client: ``LOADED`` (latency or
error), ``DONE`` (a job's rows processed, failed rows, side info, stage timings),
``STATS`` (stage statistics, at most twice a second).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from enhancers.stage import CHUNK

VERSION = 1
MAX_FRAME = 32 * 1024 * 1024
MAX_ROWS = 8192  # rows of one job (all rounds)

CHALLENGE, HELLO, WELCOME, ERROR = 0x01, 0x02, 0x03, 0x7F
LOAD, LOADED, DECLARE, CLOSE_STREAM = 0x10, 0x11, 0x20, 0x21
JOB, DONE, STATS = 0x30, 0x31, 0x40

_F32 = np.dtype("<f4")


class WireError(ValueError):
    """A frame that does not follow the protocol (the connection is closed)."""


def proof(token: bytes, nonce: bytes) -> bytes:
    return hmac.new(token, b"mediaserver-executor/1:" + nonce, hashlib.sha256).digest()


def verify(token: bytes, nonce: bytes, mac: bytes) -> bool:
    return hmac.compare_digest(proof(token, nonce), mac)


class Writer:
    """Builds one frame's body."""

    def __init__(self, kind: int) -> None:
        self.kind = kind
        self.parts: list[bytes] = []

    def u8(self, v: int) -> "Writer":
        self.parts.append(struct.pack("!B", v))
        return self

    def u16(self, v: int) -> "Writer":
        self.parts.append(struct.pack("!H", v))
        return self

    def u32(self, v: int) -> "Writer":
        self.parts.append(struct.pack("!I", v))
        return self

    def i32(self, v: int) -> "Writer":
        self.parts.append(struct.pack("!i", v))
        return self

    def raw(self, b: bytes) -> "Writer":
        self.parts.append(b)
        return self

    def text(self, s: str) -> "Writer":
        b = s.encode()
        if len(b) > 0xFFFF:
            raise WireError("string too long")
        self.parts.append(struct.pack("!H", len(b)) + b)
        return self

    def obj(self, o: Any) -> "Writer":
        b = json.dumps(o, separators=(",", ":")).encode()
        self.parts.append(struct.pack("!I", len(b)) + b)
        return self

    def u32s(self, values: list[int]) -> "Writer":
        self.parts.append(np.asarray(values, dtype=">u4").tobytes())
        return self

    def audio(self, rows: np.ndarray) -> "Writer":
        self.parts.append(np.ascontiguousarray(rows, dtype=_F32).tobytes())
        return self

    def frame(self) -> bytes:
        body = b"".join(self.parts)
        if len(body) + 1 > MAX_FRAME:
            raise WireError("frame too large")
        return struct.pack("!IB", len(body) + 1, self.kind) + body


class Reader:
    """Reads one frame's body; any short or malformed field raises WireError."""

    def __init__(self, body: bytes) -> None:
        self.body = memoryview(body)
        self.at = 0

    def _take(self, n: int) -> memoryview:
        if n < 0 or self.at + n > len(self.body):
            raise WireError("frame ends early")
        out = self.body[self.at:self.at + n]
        self.at += n
        return out

    def u8(self) -> int:
        return int(self._take(1)[0])

    def u16(self) -> int:
        return int(struct.unpack("!H", self._take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack("!I", self._take(4))[0])

    def i32(self) -> int:
        return int(struct.unpack("!i", self._take(4))[0])

    def raw(self, n: int) -> bytes:
        return bytes(self._take(n))

    def text(self) -> str:
        try:
            return bytes(self._take(self.u16())).decode()
        except UnicodeDecodeError as exc:
            raise WireError("bad text") from exc

    def obj(self) -> Any:
        try:
            return json.loads(bytes(self._take(self.u32())))
        except (ValueError, RecursionError) as exc:
            raise WireError("bad JSON") from exc

    def u32s(self, n: int) -> list[int]:
        return np.frombuffer(self._take(4 * n), dtype=">u4").astype(np.int64).tolist()

    def audio(self, rows: int) -> np.ndarray:
        if rows < 0 or rows > MAX_ROWS:
            raise WireError("too many rows")
        return np.frombuffer(self._take(rows * CHUNK * 4), dtype=_F32).reshape(rows, CHUNK).astype(np.float32)

    def done(self) -> None:
        if self.at != len(self.body):
            raise WireError("trailing bytes in frame")


async def read_frame(reader: Any) -> tuple[int, Reader]:
    """The next frame from an asyncio StreamReader: (type, body reader)."""
    head = await reader.readexactly(4)
    (size,) = struct.unpack("!I", head)
    if size < 1 or size > MAX_FRAME:
        raise WireError(f"frame size {size} out of bounds")
    data = await reader.readexactly(size)
    return data[0], Reader(data[1:])


# -- jobs ------------------------------------------------------------------------------------------
@dataclass
class WireJobRound:
    stream_ids: list[int]
    audio: np.ndarray  # [n, 480]
    reference: np.ndarray | None


def encode_job(job_id: int, rounds: list[WireJobRound]) -> bytes:
    w = Writer(JOB).u32(job_id).u16(len(rounds))
    for r in rounds:
        w.u16(len(r.stream_ids)).u8(1 if r.reference is not None else 0).u32s(r.stream_ids)
    for r in rounds:
        w.audio(r.audio)
        if r.reference is not None:
            w.audio(r.reference)
    return w.frame()


def decode_job(r: Reader) -> tuple[int, list[WireJobRound]]:
    job_id, n = r.u32(), r.u16()
    heads = []
    total = 0
    for _ in range(n):
        rows, has_ref = r.u16(), r.u8()
        total += rows
        if total > MAX_ROWS:
            raise WireError("too many rows")
        heads.append((r.u32s(rows), bool(has_ref)))
    rounds = []
    for sids, has_ref in heads:
        audio = r.audio(len(sids))
        reference = r.audio(len(sids)) if has_ref else None
        rounds.append(WireJobRound(sids, audio, reference))
    r.done()
    return job_id, rounds


@dataclass
class WireDoneRound:
    audio: np.ndarray
    failed: list[int]
    passthrough: bool
    side: list[dict[str, float]] | None
    timings: list[tuple[str, int, float]]


def encode_done(job_id: int, rounds: list[WireDoneRound]) -> bytes:
    w = Writer(DONE).u32(job_id).u16(len(rounds))
    for r in rounds:
        w.u16(len(r.audio)).u8(1 if r.passthrough else 0).u16(len(r.failed)).u32s(r.failed)
        w.obj({"side": r.side, "timings": r.timings})
    for r in rounds:
        w.audio(r.audio)
    return w.frame()


def decode_done(r: Reader) -> tuple[int, list[WireDoneRound]]:
    job_id, n = r.u32(), r.u16()
    heads = []
    for _ in range(n):
        rows, passthrough, nfailed = r.u16(), r.u8(), r.u16()
        failed = r.u32s(nfailed)
        extra = r.obj()
        if not isinstance(extra, dict):
            raise WireError("bad round extras")
        timings = [(str(t[0]), int(t[1]), float(t[2])) for t in extra.get("timings") or []]
        heads.append((rows, bool(passthrough), failed, extra.get("side"), timings))
    out = []
    for rows, passthrough, failed, side, timings in heads:
        out.append(WireDoneRound(r.audio(rows), failed, passthrough, side, timings))
    r.done()
    return job_id, out
