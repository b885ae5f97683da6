"""SIP over UDP and TCP on one port: datagrams in, framed messages in, bytes out to an address.

UDP datagrams are handed over whole.  TCP byte streams are cut into
messages with Content-Length (RFC 3261 18.3); a connection that sends more
than a message's worth of garbage, or stays idle, is closed.  Replies go
back the way the request came: over its TCP connection when it has one,
else as a datagram to its source address.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

Address = tuple[str, int]
MAX_MESSAGE = 65_535
MAX_TCP_CONNECTIONS = 256
TCP_IDLE_S = 300.0
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


class SipTransport:
    """Owns the UDP socket, the TCP listener and the open TCP connections of the SIP endpoint."""

    def __init__(self, on_message: Callable[[bytes, Address], None]) -> None:
        self._on_message = on_message
        self._udp: _Udp | None = None
        self._tcp_server: asyncio.Server | None = None
        self._connections: dict[Address, asyncio.StreamWriter] = {}

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
        writer = self._connections.get(addr)
        if writer is not None:
            if not writer.is_closing():
                writer.write(data)
            return
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.sendto(data, addr)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        addr: Address = (peer[0], peer[1])
        if len(self._connections) >= MAX_TCP_CONNECTIONS:
            writer.close()
            return
        self._connections[addr] = writer
        buffer = b""
        try:
            while True:
                data = await asyncio.wait_for(reader.read(16384), TCP_IDLE_S)
                if not data:
                    break
                messages, buffer = split_stream(buffer + data)
                for message in messages:
                    self._deliver(message, addr)
        except (TimeoutError, ValueError, ConnectionError) as exc:
            log.info("sip tcp %s: closing (%s)", addr, exc or type(exc).__name__)
        finally:
            self._connections.pop(addr, None)
            writer.close()

    def close(self) -> None:
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.close()
        if self._tcp_server is not None:
            self._tcp_server.close()
        for writer in list(self._connections.values()):
            writer.close()
        self._connections.clear()


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
