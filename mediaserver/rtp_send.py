"""Subscriber RTP out in the publisher's turn of the event loop: no task, no queue, no wake-up per packet.

aiortc's ``RTCRtpSender._run_rtp`` is one coroutine per subscriber: every
packet costs it a queue hand-off, an ``await`` chain through the DTLS, ICE
and STUN layers and a task wake-up, which at tens of subscribers is most of
the forwarding cost of the event loop. ``DirectRtpSender`` takes that
coroutine's place for a ``SubscriberTrack`` (``install``): when the fan-out
hands the track a packet, the RTP packet is built with the sender's own
header-extension map, protected by the transport's SRTP session (libsrtp)
and written to the nominated ICE pair's socket at once. Nothing can queue up,
so a slow subscriber can build no latency here; the kernel's socket buffer
is the only buffer.

What aiortc keeps doing: negotiation, DTLS, RTCP (the sender's reports read
the packet and octet counts kept here), receiving. The RTP task is still a
task (aiortc's ``stop`` waits for it), but one that sleeps until the sender
stops. If the installed aiortc lacks what this relies on, ``install``
leaves the sender alone and aiortc's own loop reads the track's queue.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import types
from typing import TYPE_CHECKING, Any, Optional

from aiortc import RTCRtpSender, clock
from aiortc.rtcdtlstransport import State
from aiortc.rtp import RtpPacket
from aiortc.utils import random16, random32, uint16_add

if TYPE_CHECKING:
    from mediaserver.fanout import EncodedPacket, SubscriberTrack

log = logging.getLogger(__name__)

_S = "_RTCRtpSender__"  # aiortc's name-mangled private attributes of RTCRtpSender
# the attributes aiortc's RTCP sender reports read, named once (not per packet)
_NTP, _RTP_TS, _OCTETS, _PACKETS = (_S + n for n in ("ntp_timestamp", "rtp_timestamp", "octet_count", "packet_count"))
_REQUIRED = ("rtp_started", "rtp_exited", "rtp_header_extensions_map", "mid", "packet_count", "octet_count",
             "rtp_timestamp", "ntp_timestamp")


class DirectRtpSender:
    """Owns the RTP sequence, timestamps and counters of one subscriber's sender while it sends directly."""

    def __init__(self, sender: RTCRtpSender, payload_type: int) -> None:
        self._sender = sender
        self._dtls: Any = sender.transport
        self._ice: Any = self._dtls.transport._connection  # aioice Connection
        self._payload_type = payload_type
        self._ssrc: int = sender._ssrc
        self._mid = getattr(sender, _S + "mid")
        self._map = getattr(sender, _S + "rtp_header_extensions_map")
        self._seq = random16()
        self._ts_origin = random32()
        self.sent = 0
        self.not_connected = 0
        # The RTP header is built once with aiortc's serializer (the negotiated extension map: mid,
        # abs-send-time) and then only patched per packet: sequence number, timestamp, abs-send-time.
        self._header, self._abs_at = _header_template(payload_type, self._ssrc, self._mid, self._map)

    @staticmethod
    def install(sender: RTCRtpSender, track: "SubscriberTrack") -> bool:
        """Let ``track``'s packets go out directly once ``sender`` starts; False: aiortc's own loop stays."""
        if not all(hasattr(sender, _S + name) for name in _REQUIRED):
            log.warning("unsupported aiortc version: subscriber packets take aiortc's send loop")
            return False

        async def run_rtp(self: RTCRtpSender, codec: Any) -> None:
            getattr(self, _S + "rtp_started").set()
            direct: Optional[DirectRtpSender] = None
            try:
                direct = DirectRtpSender(self, int(codec.payloadType))
                track.bind_direct(direct)
                await track.wait_stopped()
            except asyncio.CancelledError:
                pass
            except Exception:  # never leave aiortc's stop() waiting for rtp_exited
                log.exception("direct RTP sender failed")
            finally:
                if direct is not None:
                    track.unbind_direct(direct)
                getattr(self, _S + "rtp_exited").set()

        sender._run_rtp = types.MethodType(run_rtp, sender)  # type: ignore[method-assign]
        return True

    def send(self, packet: "EncodedPacket") -> bool:
        """Packetize, protect and send one Opus packet now; False when the transport is not connected."""
        dtls = self._dtls
        pair = self._ice._nominated.get(1)
        if dtls._state != State.CONNECTED or pair is None:
            self.not_connected += 1
            return False
        header = self._header
        timestamp = (self._ts_origin + packet.pts) & 0xFFFFFFFF
        _SEQ_TS.pack_into(header, 2, self._seq, timestamp)
        ntp = clock.current_ntp_time()
        if self._abs_at:
            header[self._abs_at:self._abs_at + 3] = ((ntp >> 14) & 0x00FFFFFF).to_bytes(3, "big")
        data = dtls._tx_srtp.protect(bytes(header) + packet.data)
        pair.protocol.transport.sendto(data, pair.remote_addr)
        self._seq = uint16_add(self._seq, 1)
        s = self._sender
        setattr(s, _NTP, ntp)
        setattr(s, _RTP_TS, timestamp)
        setattr(s, _OCTETS, getattr(s, _OCTETS) + len(packet.data))
        setattr(s, _PACKETS, getattr(s, _PACKETS) + 1)
        self.sent += 1
        return True


_SEQ_TS = struct.Struct("!HI")  # sequence number and timestamp, at offset 2 of an RTP header


def _header_template(payload_type: int, ssrc: int, mid: Any, extensions_map: Any) -> tuple[bytearray, int]:
    """An RTP header (marker set) with the sender's extensions, and where its 3-byte abs-send-time
    value sits (0: not negotiated), found by serializing two values and comparing."""

    def build(abs_send_time: int) -> bytes:
        rtp = RtpPacket(payload_type=payload_type, marker=1, sequence_number=0, timestamp=0, ssrc=ssrc)
        rtp.extensions.abs_send_time = abs_send_time
        rtp.extensions.mid = mid
        return bytes(rtp.serialize(extensions_map))

    low, high = build(0), build(0xFFFFFF)
    diff = [i for i in range(min(len(low), len(high))) if low[i] != high[i]]
    at = diff[0] if len(diff) == 3 and diff[2] - diff[0] == 2 and len(low) == len(high) else 0
    return bytearray(low), at
