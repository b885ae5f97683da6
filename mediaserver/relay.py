"""Streams between media processes: one room's audio forwarded once per remote host of the room.

When a room has participants on several media processes (workers of one
server, later nodes), every published stream is encoded once where it is
published and its packets are sent once to each other host of the room
(``RelaySink``: a fan-out subscriber like any other).  The receiving process
knows it as a ``RemoteStream``: a stream of its local room with its own
fan-out to its local subscribers, fed by the relay instead of a pipeline.  Its
audio is decoded there only for what needs PCM (the room's echo references).

A relay datagram is a fixed 18-byte header and the Opus payload as it goes
to subscribers::

    magic "MR" | version (1) | level dBFS (int8) | vad x 100 (uint8) | 0 |
    relay id (uint32) | pts (uint32, 48 kHz) | age of the audio at sending, us (int32, -1: unknown)

``RelayEndpoint`` owns the UDP socket: it accepts datagrams only from the
peers it was told about (the relay addresses of the room's other hosts),
drops malformed ones (counted) and hands the rest to their ``RemoteStream``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, Optional

import numpy as np

from mediaserver.audio_format import CHUNK
from mediaserver.fanout import EncodedPacket, Fanout
from mediaserver.opus import OpusDecoder

log = logging.getLogger(__name__)

HEADER = struct.Struct("!2sBbBxIIi")
MAGIC = b"MR"
VERSION = 1
MAX_DATAGRAM = 1500
Address = tuple[str, int]


class RemoteCounters:
    """What the room reads of a remote stream's level and voice activity (carried in each relay packet)."""

    __slots__ = ("level_dbfs", "vad", "packets", "lost")

    def __init__(self) -> None:
        self.level_dbfs = -100.0
        self.vad = 0.0
        self.packets = 0
        self.lost = 0


class RemoteStream:
    """A stream published on another host of the room: its local fan-out, fed by the relay.

    Duck-types what rooms, sessions and the echo mix read of a ``PublishedStream``.
    """

    remote = True

    def __init__(self, stream_id: str, owner_id: str, kind: str, synthetic: bool, relay_id: int,
                 origin: str, clock_ticks: Callable[[], int]) -> None:
        self.id = stream_id
        self.owner_id = owner_id
        self.kind = kind
        self.synthetic = synthetic
        self.relay_id = relay_id
        self.origin = origin  # the host it comes from
        self.fanout = Fanout()
        self.counters = RemoteCounters()
        self.closed = False
        self.muted = False
        self.current_tick = 0
        self._ticks = clock_ticks
        self._pcm_listeners: list[Callable[[np.ndarray, Optional[float]], None]] = []
        self._decoder: Optional[OpusDecoder] = None
        self._last_pts: Optional[int] = None

    # what a room does with a stream
    def add_pcm_listener(self, listener: Callable[[np.ndarray, Optional[float]], None]) -> None:
        self._pcm_listeners.append(listener)

    def remove_pcm_listener(self, listener: Callable[[np.ndarray, Optional[float]], None]) -> None:
        if listener in self._pcm_listeners:
            self._pcm_listeners.remove(listener)

    def deliver(self, pts: int, payload: bytes, age_s: Optional[float], level: int, vad: int) -> None:
        """One packet from the relay: to the local subscribers, and decoded for PCM listeners."""
        if self.closed:
            return
        c = self.counters
        c.packets += 1
        c.level_dbfs, c.vad = float(level), vad / 100.0
        if self._last_pts is not None and pts - self._last_pts > 960:
            c.lost += (pts - self._last_pts) // 960 - 1
        self._last_pts = pts
        origin = time.monotonic() - age_s if age_s is not None else None
        self.fanout.publish(EncodedPacket(data=payload, pts=pts, origin=origin))
        if self._pcm_listeners:
            if self._decoder is None:
                self._decoder = OpusDecoder()
            pcm = self._decoder.decode(payload)
            tick = self._ticks()
            for k in range(0, len(pcm) - CHUNK + 1, CHUNK):  # 20 ms: two chunks, on this and the next tick
                self.current_tick = tick + k // CHUNK
                for listener in list(self._pcm_listeners):
                    try:
                        listener(pcm[k:k + CHUNK], origin)
                    except Exception:
                        log.exception("pcm listener failed on remote stream %s", self.id)

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {"stream": self.id, "participant": self.owner_id, "kind": self.kind, "remote": True,
                "host": self.origin, "level_dbfs": round(c.level_dbfs, 1), "vad": round(c.vad, 2),
                "received": c.packets, "lost": c.lost, "subscribers": self.fanout.subscriber_count,
                "stages": [], "requested_stages": [], "degraded_reason": None}

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.fanout.close()
        self._pcm_listeners.clear()
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None


class RelaySink:
    """One published stream's packets to one remote host (a subscriber of the stream's fan-out)."""

    def __init__(self, endpoint: "RelayEndpoint", peer: Address, relay_id: int, stream: Any) -> None:
        self.endpoint = endpoint
        self.peer = peer
        self.relay_id = relay_id
        self.stream = stream  # the PublishedStream: its level and VAD ride along
        self.sent = 0

    def offer(self, packet: EncodedPacket) -> None:
        c = self.stream.counters
        level = int(max(-127.0, min(0.0, c.level_dbfs))) if math.isfinite(c.level_dbfs) else -127
        vad = int(max(0.0, min(1.0, c.vad)) * 100)
        age = int((time.monotonic() - packet.origin) * 1e6) if packet.origin is not None else -1
        header = HEADER.pack(MAGIC, VERSION, level, vad, self.relay_id, packet.pts & 0xFFFFFFFF,
                             max(-1, min(age, 2**31 - 1)))
        if self.endpoint.send(header + packet.data, self.peer):
            self.sent += 1


class _RelayProtocol(asyncio.DatagramProtocol):
    def __init__(self, endpoint: "RelayEndpoint") -> None:
        self.endpoint = endpoint

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.endpoint.received(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        self.endpoint.dropped["socket-error"] = self.endpoint.dropped.get("socket-error", 0) + 1


class RelayEndpoint:
    """Owns this process's relay socket, the remote streams it feeds and who may send to it."""

    def __init__(self) -> None:
        self.address: Optional[Address] = None
        self._transport: Optional[asyncio.DatagramTransport] = None
        self.streams: dict[tuple[Address, int], RemoteStream] = {}  # by (sending host's address, relay id)
        self.peers: set[Address] = set()  # relay addresses of hosts sharing a room with this one
        self.dropped: dict[str, int] = {}
        self.received_packets = 0
        self.sent_packets = 0
        self._next_id = 1

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> Address:
        """Bind ``host`` (``auto``: this machine's own address, for relays between nodes)."""
        loop = asyncio.get_running_loop()
        if host == "auto":
            host = socket.gethostbyname(socket.gethostname())
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((host, port))
        transport, _ = await loop.create_datagram_endpoint(lambda: _RelayProtocol(self), sock=sock)
        self._transport = transport  # type: ignore[assignment]
        addr = sock.getsockname()
        self.address = (addr[0], int(addr[1]))
        return self.address

    def new_relay_id(self) -> int:
        rid = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
        return rid

    def send(self, data: bytes, peer: Address) -> bool:
        if self._transport is None:
            return False
        try:
            self._transport.sendto(data, peer)
        except OSError:
            self._drop("send-error")
            return False
        self.sent_packets += 1
        return True

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def received(self, data: bytes, addr: Address) -> None:
        if addr not in self.peers:
            return self._drop("unknown-peer")
        if len(data) <= HEADER.size or len(data) > MAX_DATAGRAM:
            return self._drop("size")
        magic, version, level, vad, relay_id, pts, age_us = HEADER.unpack_from(data)
        if magic != MAGIC or version != VERSION:
            return self._drop("header")
        stream = self.streams.get((addr, relay_id))
        if stream is None:
            return self._drop("unknown-stream")
        self.received_packets += 1
        stream.deliver(pts, data[HEADER.size:], age_us / 1e6 if age_us >= 0 else None, level, min(vad, 100))

    def stats(self) -> dict[str, Any]:
        return {"address": list(self.address) if self.address else None, "remote_streams": len(self.streams),
                "peers": len(self.peers), "received": self.received_packets, "sent": self.sent_packets,
                "dropped": dict(self.dropped)}

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
