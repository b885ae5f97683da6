"""RTP and RTCP (RFC 3550) over plain UDP for one phone call.

``RtpSession`` owns the call's two UDP sockets (an even RTP port from the
configured range and the RTCP port above it), hands every accepted RTP
packet to a callback, sends G.711 / telephone-event packets, and every few
seconds a sender report with one reception report block and an SDES CNAME.
Packets are accepted from the negotiated remote address, or from the
caller's signaling address (which the session then latches to: phones
behind NAT announce private addresses).
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

RTCP_INTERVAL_S = 5.0
_NTP_EPOCH = 2_208_988_800


class RtpError(ValueError):
    """A datagram that is not a usable RTP packet."""


@dataclass
class RtpPacket:
    """One RTP packet: the header fields the bridge uses and the payload."""

    payload_type: int
    seq: int
    timestamp: int
    ssrc: int
    payload: bytes
    marker: bool = False

    @classmethod
    def parse(cls, data: bytes) -> RtpPacket:
        if len(data) < 12 or data[0] >> 6 != 2:
            raise RtpError("not RTP version 2")
        first, second, seq, ts, ssrc = struct.unpack("!BBHII", data[:12])
        offset = 12 + 4 * (first & 0x0F)
        if first & 0x10:  # header extension
            if len(data) < offset + 4:
                raise RtpError("truncated extension")
            words = struct.unpack("!H", data[offset + 2:offset + 4])[0]
            offset += 4 + 4 * words
        end = len(data)
        if first & 0x20:  # padding
            pad = data[-1]
            if pad == 0 or pad > end - offset:
                raise RtpError("bad padding")
            end -= pad
        if offset > end:
            raise RtpError("truncated packet")
        return cls(second & 0x7F, seq, ts, ssrc, data[offset:end], bool(second & 0x80))

    def serialize(self) -> bytes:
        return struct.pack("!BBHII", 0x80, (0x80 if self.marker else 0) | (self.payload_type & 0x7F),
                           self.seq & 0xFFFF, self.timestamp & 0xFFFFFFFF, self.ssrc) + self.payload


def is_rtcp(data: bytes) -> bool:
    return len(data) >= 8 and data[0] >> 6 == 2 and 192 <= data[1] <= 223


@dataclass
class ReceptionStats:
    """What the sender report's reception block says about the phone's stream."""

    ssrc: int = 0
    base_seq: int | None = None
    max_seq: int = 0
    cycles: int = 0
    received: int = 0
    expected_prior: int = 0
    received_prior: int = 0
    jitter: float = 0.0  # in 8 kHz timestamp units
    last_transit: float | None = None
    last_sr_ntp: int = 0  # middle 32 bits of the phone's last SR
    last_sr_at: float = 0.0

    def update(self, pkt: RtpPacket, arrival: float) -> None:
        self.received += 1
        delta = (pkt.seq - self.max_seq) & 0xFFFF
        if 0 < delta < 3000:
            if pkt.seq < self.max_seq:
                self.cycles += 1 << 16
            self.max_seq = pkt.seq
        transit = arrival * 8000.0 - pkt.timestamp
        if self.last_transit is not None:
            self.jitter += (abs(transit - self.last_transit) - self.jitter) / 16.0
        self.last_transit = transit

    def report_block(self, now: float) -> bytes:
        base = self.base_seq or 0
        extended = self.cycles + self.max_seq
        expected = extended - base + 1
        lost = max(0, expected - self.received)
        interval_expected = expected - self.expected_prior
        interval_lost = interval_expected - (self.received - self.received_prior)
        self.expected_prior, self.received_prior = expected, self.received
        fraction = (interval_lost << 8) // interval_expected if interval_expected > 0 and interval_lost > 0 else 0
        dlsr = int((now - self.last_sr_at) * 65536) if self.last_sr_at else 0
        return struct.pack("!IIIIII", self.ssrc, (min(fraction, 255) << 24) | min(lost, 0x7FFFFF),
                           extended & 0xFFFFFFFF, int(self.jitter), self.last_sr_ntp, dlsr)


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, tuple[str, int]], None]) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.on_datagram(data, addr)
        except Exception:  # one bad packet must never stop the socket
            log.exception("rtp: datagram handler failed")

    def error_received(self, exc: Exception) -> None:
        log.debug("rtp socket error: %s", exc)


class PortAllocator:
    """Hands out even RTP ports (RTCP on the next odd one) from a range, round-robin."""

    def __init__(self, low: int, high: int) -> None:
        self.low = low + (low % 2)
        self.high = high
        self._next = self.low + 2 * random.randrange(max(1, (high - self.low) // 2))

    async def open(self, host: str, on_rtp: Callable[[bytes, tuple[str, int]], None],
                   on_rtcp: Callable[[bytes, tuple[str, int]], None]) -> tuple[_Endpoint, _Endpoint, int]:
        loop = asyncio.get_running_loop()
        slots = max(1, (self.high - self.low) // 2)
        for _ in range(slots):
            port = self._next
            self._next = self.low if self._next + 2 >= self.high else self._next + 2
            rtp = rtcp = None
            try:
                _, rtp = await loop.create_datagram_endpoint(lambda: _Endpoint(on_rtp), local_addr=(host, port))
                _, rtcp = await loop.create_datagram_endpoint(lambda: _Endpoint(on_rtcp), local_addr=(host, port + 1))
                return rtp, rtcp, port
            except OSError:
                for ep in (rtp, rtcp):
                    if ep is not None and ep.transport is not None:
                        ep.transport.close()
        raise OSError(f"no free RTP port pair in {self.low}-{self.high}")


class RtpSession:
    """Owns one call's RTP/RTCP sockets, the outbound sequence/timestamp state and RTCP reports."""

    def __init__(self, rtp: _Endpoint, rtcp: _Endpoint, local_port: int, signaling_ip: str,
                 on_packet: Callable[[RtpPacket, float], None]) -> None:
        self.local_port = local_port
        self._rtp = rtp
        self._rtcp = rtcp
        rtp.on_datagram = self._on_rtp
        rtcp.on_datagram = self._on_rtcp
        self._signaling_ip = signaling_ip
        self.on_packet = on_packet
        self.remote: tuple[str, int] | None = None
        self.remote_rtcp: tuple[str, int] | None = None
        self.ssrc = secrets.randbits(32)
        self.seq = secrets.randbits(16)
        self.timestamp = secrets.randbits(32)
        self.sent_packets = 0
        self.sent_octets = 0
        self.received_packets = 0
        self.dropped_foreign = 0
        self.last_received = time.monotonic()
        self.rtt_ms: float | None = None
        self.reception = ReceptionStats()
        self._rtcp_task: asyncio.Task[None] | None = None
        self.cname = f"mediaserver-{secrets.token_hex(4)}"

    @classmethod
    async def open(cls, allocator: PortAllocator, host: str, signaling_ip: str,
                   on_packet: Callable[[RtpPacket, float], None]) -> RtpSession:
        rtp, rtcp, port = await allocator.open(host, lambda d, a: None, lambda d, a: None)
        session = cls(rtp, rtcp, port, signaling_ip, on_packet)
        session._rtcp_task = asyncio.get_running_loop().create_task(session._rtcp_loop())
        return session

    def set_remote(self, ip: str, port: int, rtcp_port: int) -> None:
        self.remote = (ip, port)
        self.remote_rtcp = (ip, rtcp_port)

    # -- receiving --------------------------------------------------------------
    def _accept_from(self, addr: tuple[str, int], rtcp: bool) -> bool:
        remote = self.remote_rtcp if rtcp else self.remote
        if remote is not None and addr == remote:
            return True
        if addr[0] == self._signaling_ip:  # symmetric RTP from the caller's host: latch to it
            if rtcp:
                self.remote_rtcp = addr
            else:
                self.remote = addr
            return True
        return remote is not None and addr[0] == remote[0]

    def _on_rtp(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self._accept_from(addr, rtcp=False):
            self.dropped_foreign += 1
            return
        if is_rtcp(data):  # rtcp-mux from a phone that ignored our separate port
            self._on_rtcp(data, addr)
            return
        try:
            pkt = RtpPacket.parse(data)
        except RtpError:
            return
        now = time.monotonic()
        self.received_packets += 1
        self.last_received = now
        if self.reception.base_seq is None or pkt.ssrc != self.reception.ssrc:  # new source: new statistics
            self.reception = ReceptionStats(ssrc=pkt.ssrc, base_seq=pkt.seq, max_seq=pkt.seq,
                                            last_sr_ntp=self.reception.last_sr_ntp,
                                            last_sr_at=self.reception.last_sr_at)
        self.reception.update(pkt, now)
        self.on_packet(pkt, now)

    def _on_rtcp(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self._accept_from(addr, rtcp=True):
            return
        offset = 0
        now = time.monotonic()
        while offset + 8 <= len(data) and data[offset] >> 6 == 2:
            first, ptype, words = struct.unpack("!BBH", data[offset:offset + 4])
            end = offset + 4 * (words + 1)
            if end > len(data):
                return
            if ptype == 200 and end - offset >= 28:  # SR: remember its NTP time for our DLSR
                ntp_hi, ntp_lo = struct.unpack("!II", data[offset + 8:offset + 16])
                self.reception.last_sr_ntp = ((ntp_hi & 0xFFFF) << 16) | (ntp_lo >> 16)
                self.reception.last_sr_at = now
            if ptype in (200, 201):
                self._read_report_blocks(data[offset:end], ptype, first & 0x1F)
            offset = end

    def _read_report_blocks(self, packet: bytes, ptype: int, count: int) -> None:
        start = 28 if ptype == 200 else 8
        for i in range(count):
            block = packet[start + 24 * i:start + 24 * (i + 1)]
            if len(block) < 24:
                return
            ssrc, _, _, _, lsr, dlsr = struct.unpack("!IIIIII", block)
            if ssrc == self.ssrc and lsr:
                now_ntp = self._ntp_middle(time.time())
                rtt = ((now_ntp - lsr - dlsr) & 0xFFFFFFFF) / 65536.0
                if rtt < 10.0:
                    self.rtt_ms = rtt * 1000.0

    # -- sending ----------------------------------------------------------------
    def send(self, payload_type: int, payload: bytes, timestamp: int, marker: bool = False) -> None:
        if self.remote is None or self._rtp.transport is None:
            return
        pkt = RtpPacket(payload_type, self.seq, timestamp, self.ssrc, payload, marker)
        self.seq = (self.seq + 1) & 0xFFFF
        self._rtp.transport.sendto(pkt.serialize(), self.remote)
        self.sent_packets += 1
        self.sent_octets += len(payload)
        self.timestamp = timestamp

    @staticmethod
    def _ntp_middle(t: float) -> int:
        secs = int(t) + _NTP_EPOCH
        frac = int((t % 1.0) * (1 << 32))
        return ((secs & 0xFFFF) << 16) | (frac >> 16)

    def sender_report(self, bye: bool = False) -> bytes:
        t = time.time()
        secs, frac = int(t) + _NTP_EPOCH, int((t % 1.0) * (1 << 32))
        blocks = self.reception.report_block(time.monotonic()) if self.reception.base_seq is not None else b""
        count = 1 if blocks else 0
        sr = struct.pack("!BBHIIIIII", 0x80 | count, 200, 6 + 6 * count, self.ssrc, secs & 0xFFFFFFFF, frac,
                         self.timestamp, self.sent_packets & 0xFFFFFFFF, self.sent_octets & 0xFFFFFFFF) + blocks
        cname = self.cname.encode()
        item = bytes([1, len(cname)]) + cname + b"\x00"
        item += b"\x00" * (-len(item) % 4)
        sdes = struct.pack("!BBHI", 0x81, 202, (4 + len(item)) // 4, self.ssrc) + item
        out = sr + sdes
        if bye:
            out += struct.pack("!BBHI", 0x81, 203, 1, self.ssrc)
        return out

    async def _rtcp_loop(self) -> None:
        while True:
            await asyncio.sleep(RTCP_INTERVAL_S * random.uniform(0.5, 1.5))
            self._send_rtcp()

    def _send_rtcp(self, bye: bool = False) -> None:
        if self.remote_rtcp is not None and self._rtcp.transport is not None and self.sent_packets:
            self._rtcp.transport.sendto(self.sender_report(bye), self.remote_rtcp)

    def close(self) -> None:
        if self._rtcp_task is not None:
            self._rtcp_task.cancel()
            self._rtcp_task = None
            self._send_rtcp(bye=True)
        for ep in (self._rtp, self._rtcp):
            if ep.transport is not None:
                ep.transport.close()
