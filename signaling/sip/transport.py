"""SIP over UDP and TCP on one port: datagrams in, framed messages in, bytes out to an address.

UDP datagrams are handed over whole.  TCP byte streams are cut into
messages with Content-Length (RFC 3261 18.3), scanning each byte once; a
connection that sends more than a message's worth of garbage is closed.
TCP connections are bounded per source IP and in all.  One that has not
completed a request within ``first_request_s`` of connecting is closed
(slowloris), one without a call after ``idle_s`` of silence; a connection
that carries a call stays.  At the global cap the newcomer is let in and
the oldest connection without a call is closed instead, never-used ones
first, so idle connections cannot lock callers out.  Replies go back the way
the request came: over its TCP connection when it has one, else as a
datagram to its source address.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

Address = tuple[str, int]
MAX_MESSAGE = 65_535
MAX_TCP_CONNECTIONS = 256
MAX_TCP_PER_SOURCE = 16
TCP_FIRST_REQUEST_S = 10.0
TCP_IDLE_S = 120.0
_LENGTH_RE = re.compile(rb"^(?:content-length|l)[ \t]*:[ \t]*(\d{1,6})[ \t]*$", re.IGNORECASE | re.MULTILINE)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, on_message: Callable[[bytes, Address], None]) -> None:
        self.on_message = on_message
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.on_message(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        log.debug("sip udp: %s", exc)


def split_stream(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Cut complete messages off a TCP byte buffer; raises ValueError on a stream that cannot be framed."""
    messages: list[bytes] = []
    while True:
        buffer = buffer.lstrip(b"\r\n")  # keep-alives between messages
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_MESSAGE:
                raise ValueError("header section too large")
            return messages, buffer
        match = _LENGTH_RE.search(buffer[:end])
        length = int(match.group(1)) if match else 0
        total = end + 4 + length
        if total > MAX_MESSAGE:
            raise ValueError("message too large")
        if len(buffer) < total:
            return messages, buffer
        messages.append(buffer[:total])
        buffer = buffer[total:]


class StreamFramer:
    """Cuts SIP messages off one TCP stream; each byte is scanned once, however it is trickled in."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self._scanned = 0  # bytes of the buffer known to hold no end of headers
        self._total: int | None = None  # size of the message whose headers are complete

    def feed(self, data: bytes) -> list[bytes]:
        """Append ``data``; the complete messages.  ValueError on a stream that cannot be framed."""
        buf = self.buffer
        buf += data
        messages: list[bytes] = []
        while True:
            if self._total is None:
                if buf[:1] in (b"\r", b"\n"):
                    stripped = len(buf) - len(buf.lstrip(b"\r\n"))  # keep-alives between messages
                    del buf[:stripped]
                    self._scanned = 0
                end = buf.find(b"\r\n\r\n", max(0, self._scanned - 3))
                if end < 0:
                    self._scanned = len(buf)
                    if len(buf) > MAX_MESSAGE:
                        raise ValueError("header section too large")
                    return messages
                match = _LENGTH_RE.search(bytes(buf[:end]))
                self._total = end + 4 + (int(match.group(1)) if match else 0)
                if self._total > MAX_MESSAGE:
                    raise ValueError("message too large")
            if len(buf) < self._total:
                return messages
            messages.append(bytes(buf[:self._total]))
            del buf[:self._total]
            self._total, self._scanned = None, 0


@dataclass
class _Connection:
    writer: asyncio.StreamWriter
    opened: float
    active: float
    used: bool = False  # delivered a complete message


class SipTransport:
    """Owns the UDP socket, the TCP listener and the open TCP connections of the SIP endpoint."""

    def __init__(self, on_message: Callable[[bytes, Address], None], *, max_tcp: int = MAX_TCP_CONNECTIONS,
                 max_tcp_per_source: int = MAX_TCP_PER_SOURCE, first_request_s: float = TCP_FIRST_REQUEST_S,
                 idle_s: float = TCP_IDLE_S, busy: Callable[[Address], bool] = lambda addr: False) -> None:
        self._on_message = on_message
        self._udp: _Udp | None = None
        self._tcp_server: asyncio.Server | None = None
        self._connections: dict[Address, _Connection] = {}
        self._per_source: dict[str, int] = {}
        self.max_tcp, self.max_tcp_per_source = max_tcp, max_tcp_per_source
        self.first_request_s, self.idle_s = first_request_s, idle_s
        self.busy = busy  # does this flow carry a call?  (those are never closed for idleness)
        self.tcp_refused = 0
        self.tcp_evicted = 0
        self.tcp_timed_out = 0

    async def open(self, host: str, port: int) -> int:
        """Bind UDP (``port`` 0: any free one) and TCP on the same port number; the port."""
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(lambda: _Udp(self._deliver), local_addr=(host, port))
        self._udp = protocol
        port = transport.get_extra_info("sockname")[1]
        try:
            self._tcp_server = await asyncio.start_server(self._serve_tcp, host, port)
        except OSError as exc:
            log.warning("sip: TCP port %d unavailable (%s); UDP only", port, exc)
        return int(port)

    def _deliver(self, data: bytes, addr: Address) -> None:
        try:
            self._on_message(data, addr)
        except Exception:  # nothing a peer sends may stop the socket
            log.exception("sip: message handler failed")

    def is_reliable(self, addr: Address) -> bool:
        return addr in self._connections

    def send(self, data: bytes, addr: Address) -> None:
        conn = self._connections.get(addr)
        if conn is not None:
            if not conn.writer.is_closing() and conn.writer.transport.get_write_buffer_size() < 4 * MAX_MESSAGE:
                conn.writer.write(data)  # a peer that does not read gets no more than a few messages queued
            return
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.sendto(data, addr)

    def tcp_connections(self, ip: str | None = None) -> int:
        return len(self._connections) if ip is None else self._per_source.get(ip, 0)

    def _evict_one(self) -> bool:
        """Close the oldest connection without a call (never-used ones first) to make room."""
        idle = [(c.used, c.active, a) for a, c in self._connections.items() if not self.busy(a)]
        if not idle:
            return False
        _, _, addr = min(idle)
        self._drop(addr).writer.close()
        self.tcp_evicted += 1
        log.info("sip tcp: at %d connections, closed the idle %s to let a new one in", self.max_tcp, addr)
        return True

    def _drop(self, addr: Address) -> _Connection:
        conn = self._connections.pop(addr)
        left = self._per_source.get(addr[0], 1) - 1
        if left > 0:
            self._per_source[addr[0]] = left
        else:
            self._per_source.pop(addr[0], None)
        return conn

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        addr: Address = (peer[0], peer[1])
        if self._per_source.get(addr[0], 0) >= self.max_tcp_per_source or (
                len(self._connections) >= self.max_tcp and not self._evict_one()):
            self.tcp_refused += 1
            if self.tcp_refused in (1, 10, 100) or self.tcp_refused % 1000 == 0:
                log.warning("sip tcp: refused a connection from %s (%d refused)", addr[0], self.tcp_refused)
            writer.close()
            return
        now = time.monotonic()
        conn = _Connection(writer, now, now)
        self._connections[addr] = conn
        self._per_source[addr[0]] = self._per_source.get(addr[0], 0) + 1
        framer = StreamFramer()
        try:
            while not writer.is_closing():
                if conn.used:
                    timeout = self.idle_s
                else:
                    timeout = conn.opened + self.first_request_s - time.monotonic()
                    if timeout <= 0:
                        raise TimeoutError("no complete request in time")
                try:
                    data = await asyncio.wait_for(reader.read(16384), timeout)
                except TimeoutError:
                    if conn.used and self.busy(addr):
                        continue  # a call's flow: quiet between in-dialog requests
                    self.tcp_timed_out += 1
                    raise
                if not data:
                    break
                conn.active = time.monotonic()
                for message in framer.feed(data):
                    conn.used = True
                    self._deliver(message, addr)
        except (TimeoutError, ValueError, ConnectionError) as exc:
            log.debug("sip tcp %s: closing (%s)", addr, exc or type(exc).__name__)
        finally:
            if self._connections.get(addr) is conn:
                self._drop(addr)
            writer.close()

    def close(self) -> None:
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.close()
        if self._tcp_server is not None:
            self._tcp_server.close()
        for conn in list(self._connections.values()):
            conn.writer.close()
        self._connections.clear()
        self._per_source.clear()


def local_address_towards(remote_ip: str, bind_host: str, public: str | None = None) -> str:
    """The address to put in SDP and Contact for a caller at ``remote_ip``."""
    if public:
        return public
    if bind_host not in ("", "0.0.0.0", "::"):
        return bind_host
    family = socket.AF_INET6 if ":" in remote_ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:  # the interface the route to the caller uses
        try:
            probe.connect((remote_ip, 9))
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


class TokenBucket:
    """Owns the budget of new calls: ``rate`` per second, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens = float(burst)
        self.updated = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
