"""Every datagram at a participant's media ports is hostile: one bad packet is dropped, never fatal.

aiortc/aioice trust their input in a few places.  In aiortc 1.16 / aioice 0.13, one datagram
can end a participant's media for good:

- ``RTCDtlsTransport._recv_next`` (called by its ``__run`` loop and by the DTLS handshake)
  catches only ``pylibsrtp.Error``: a 1600-byte datagram starting with 0x80 makes
  ``Session.unprotect`` raise ``ValueError("packet is too long")``, an empty one raises
  ``IndexError`` on ``data[0]``; either ends the receive loop, and the participant's audio stops
  both ways until the liveness watchdog evicts it.  The same holds for any exception of the
  RTP/RTCP parsers or of a receiver's packet handler.
- ``StunProtocol.datagram_received`` catches only ``ValueError`` from the STUN parser; anything
  else (``struct.error`` from a short attribute) escapes into asyncio, which logs it unthrottled.
- aioice queues every datagram that is not STUN, from any source address, in an unbounded
  queue the DTLS loop reads: a flood of junk delays the real packets behind it (silence for
  the listeners) and grows memory on a port nobody reads.

``TransportGuard`` hooks the objects of one ``RTCPeerConnection`` (instance attributes only,
the same kind of hook as ``mediaserver/liveness.py``; site-packages stay untouched):

1. at the socket (``datagram_received``), before any parsing, O(1) per datagram: empty and
   oversized datagrams are dropped; a source that is not a remote ICE candidate, a pair of the
   check list or the nominated pair may only send STUN (ICE from new addresses keeps working);
   a token bucket per source address bounds the rest; a full receive queue drops;
2. around what aiortc does with one datagram (``_recv_next``: DTLS, SRTP unprotect, RTP/RTCP
   parsing, the receivers): any exception is counted and the datagram dropped; the loop goes on.

Drops are counted per guard (``dropped``, in the stream stats) and for the process
(``PROCESS_DROPS``, ``mediaserver_media_packets_dropped_total{reason}`` in ``/metrics``), and
logged at most once per ``LOG_INTERVAL_S`` for the whole process.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiortc import RTCPeerConnection

from mediaserver.config import LimitsConfig

log = logging.getLogger(__name__)

REASONS = ("empty", "oversize", "unknown-source", "rate-limit", "queue-full",
           "stun-error", "dtls-error", "rtp-error", "error")
STUN_COOKIE = b"\x21\x12\xa4\x42"
MAX_SOURCES = 256  # token buckets kept per connection; the oldest is forgotten first
LOG_INTERVAL_S = 10.0

PROCESS_DROPS: dict[str, int] = dict.fromkeys(REASONS, 0)  # every guard of the process, for /metrics


class _DropLog:
    """One log line per ``LOG_INTERVAL_S`` for the whole process, however many datagrams are dropped."""

    def __init__(self) -> None:
        self.next_at = 0.0
        self.suppressed = 0

    def note(self, participant: str, reason: str, detail: str) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.suppressed += 1
            return
        log.warning("participant %s: dropped a media datagram (%s%s); %d more dropped since the last line",
                    participant, reason, f": {detail}" if detail else "", self.suppressed)
        self.next_at = now + LOG_INTERVAL_S
        self.suppressed = 0


_LOG = _DropLog()


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class TransportGuard:
    """Drops and counts bad datagrams of one peer connection; keeps its receive loops running."""

    def __init__(self, participant_id: str, limits: LimitsConfig) -> None:
        self.participant_id = participant_id
        self.max_bytes = limits.media_max_datagram_bytes
        self.rate = limits.media_packets_per_second
        self.burst = float(limits.media_packet_burst)
        self.stun_rate = limits.media_stun_per_second
        self.stun_burst = float(limits.media_stun_burst)
        self.queue_max = limits.media_receive_queue_packets
        self.receive_buffer = limits.media_socket_receive_bytes
        self.dropped: dict[str, int] = dict.fromkeys(REASONS, 0)
        self._hooked: set[int] = set()
        self._known: dict[int, tuple[tuple[int, int, int], frozenset[tuple[str, int]]]] = {}

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def drop(self, reason: str, detail: str = "") -> None:
        self.dropped[reason] += 1
        PROCESS_DROPS[reason] += 1
        _LOG.note(self.participant_id, reason, detail)

    # -- hooking ---------------------------------------------------------------------
    def attach(self, pc: RTCPeerConnection) -> bool:
        """Guard the transports the connection has now (call again after each negotiation); False: unsupported."""
        ok = True
        for dtls in _dtls_transports(pc):
            recv_next = getattr(dtls, "_recv_next", None)
            if recv_next is None:
                ok = False
            elif id(dtls) not in self._hooked:
                self._hooked.add(id(dtls))
                dtls._recv_next = self._guarded_recv_next(dtls, recv_next)
            ice: Any = getattr(dtls, "transport", None)
            connection = getattr(ice, "_connection", None)
            protocols = getattr(connection, "_protocols", None)
            if connection is None or protocols is None or not hasattr(connection, "_queue"):
                ok = False
                continue
            if id(ice) not in self._hooked and hasattr(ice, "_recv"):
                self._hooked.add(id(ice))
                ice._recv = self._noting_recv(dtls, ice._recv)
            for protocol in protocols:
                if id(protocol) not in self._hooked:
                    self._hooked.add(id(protocol))
                    protocol.datagram_received = self._screen(connection, protocol.datagram_received)
                    self._widen_receive_buffer(protocol)
        if not ok:
            log.warning("this aiortc/aioice has no hooks for the media transport guard: "
                        "bad datagrams at the media ports are not screened")
        return ok

    # -- 1. at the socket ------------------------------------------------------------
    def _widen_receive_buffer(self, protocol: Any) -> None:
        sock = getattr(getattr(protocol, "transport", None), "get_extra_info", lambda name: None)("socket")
        if self.receive_buffer > 0 and sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
            except OSError:
                log.debug("cannot set SO_RCVBUF of a media socket", exc_info=True)

    def known_sources(self, connection: Any) -> frozenset[tuple[str, int]]:
        """Remote candidates and the remote ends of the check list (cached while their counts stay)."""
        checks = connection._check_list
        remotes = connection._remote_candidates
        key = (id(checks), len(checks), len(remotes))
        cached = self._known.get(id(connection))
        if cached is not None and cached[0] == key:
            return cached[1]
        addrs = {(getattr(c, "_network_host", c.host), c.port) for c in remotes}
        addrs.update(p.remote_addr for p in checks)
        known = frozenset(addrs)
        self._known[id(connection)] = (key, known)
        return known

    def _screen(self, connection: Any, original: Callable[[bytes, Any], None]) -> Callable[[bytes, Any], None]:
        buckets: dict[tuple[str, int], _Bucket] = {}
        queue = connection._queue
        nominated = connection._nominated

        def datagram_received(data: bytes, addr: Any) -> None:
            size = len(data)
            if size == 0:
                self.drop("empty")
                return
            if size > self.max_bytes:
                self.drop("oversize", f"{size} bytes")
                return
            source = (addr[0], addr[1])
            stun = size >= 20 and data[0] < 4 and data[4:8] == STUN_COOKIE
            known = source in self.known_sources(connection) or any(
                p.remote_addr == source for p in nominated.values())
            if not known and not stun:
                self.drop("unknown-source")
                return
            rate, burst = (self.rate, self.burst) if known else (self.stun_rate, self.stun_burst)
            now = time.monotonic()
            bucket = buckets.get(source)
            if bucket is None:
                if len(buckets) >= MAX_SOURCES:
                    del buckets[next(iter(buckets))]
                bucket = buckets[source] = _Bucket(burst, now)
            else:
                bucket.tokens = min(burst, bucket.tokens + (now - bucket.stamp) * rate)
                bucket.stamp = now
            if bucket.tokens < 1.0:
                self.drop("rate-limit")
                return
            bucket.tokens -= 1.0
            if not stun and queue.qsize() >= self.queue_max:
                self.drop("queue-full")
                return
            try:
                original(data, addr)
            except Exception as exc:  # a STUN message aioice's parser or request handler choked on
                self.drop("stun-error", repr(exc))

        return datagram_received

    # -- 2. what aiortc does with one datagram -----------------------------------------
    def _noting_recv(self, dtls: Any, original: Callable[[], Awaitable[bytes]]) -> Callable[[], Awaitable[bytes]]:
        async def recv() -> bytes:
            data = await original()
            dtls._guard_first_byte = data[0] if data else -1
            return data

        return recv

    def _guarded_recv_next(self, dtls: Any, original: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        async def recv_next() -> None:
            try:
                await original()
            except (ConnectionError, asyncio.CancelledError):
                raise  # the connection really ended (DTLS close_notify, ICE closed) or is being stopped
            except Exception as exc:
                self.drop(_layer(getattr(dtls, "_guard_first_byte", -1)), repr(exc))

        return recv_next


def _layer(first_byte: int) -> str:
    """The drop reason for an exception while aiortc handled a datagram starting with ``first_byte``."""
    if 0 <= first_byte <= 3:
        return "stun-error"
    if 20 <= first_byte <= 63:
        return "dtls-error"
    if 128 <= first_byte <= 191:
        return "rtp-error"
    return "error"


def _dtls_transports(pc: RTCPeerConnection) -> list[Any]:
    seen: dict[int, Any] = {}
    for transport in getattr(pc, "_RTCPeerConnection__dtlsTransports", ()):
        seen.setdefault(id(transport), transport)
    for t in pc.getTransceivers():
        for end in (t.receiver, t.sender):
            transport = getattr(end, "transport", None)
            if transport is not None:
                seen.setdefault(id(transport), transport)
    return list(seen.values())
