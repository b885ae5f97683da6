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
        rtp = RtpPacket(payload_type=self._payload_type, marker=1, sequence_number=self._seq,
                        timestamp=(self._ts_origin + packet.pts) & 0xFFFFFFFF, ssrc=self._ssrc,
                        payload=packet.data)
        ntp = clock.current_ntp_time()
        rtp.extensions.abs_send_time = (ntp >> 14) & 0x00FFFFFF
        rtp.extensions.mid = self._mid
        data = dtls._tx_srtp.protect(rtp.serialize(self._map))
        pair.protocol.transport.sendto(data, pair.remote_addr)
        self._seq = uint16_add(self._seq, 1)
        s = self._sender
        setattr(s, _S + "ntp_timestamp", ntp)
        setattr(s, _S + "rtp_timestamp", rtp.timestamp)
        setattr(s, _S + "octet_count", getattr(s, _S + "octet_count") + len(packet.data))
        setattr(s, _S + "packet_count", getattr(s, _S + "packet_count") + 1)
        self.sent += 1
        return True
