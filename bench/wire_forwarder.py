"""A wire-level aiortc forwarder: the cheapest real WebRTC SFU, to measure load generators against.

``bench/plain_forwarder.py``'s signaling and negotiation (aiortc peer
connections, ICE, DTLS, SRTP keys), but no media path in aiortc: every SRTP
packet a participant publishes is unprotected once at the socket and, for
each subscriber, re-packetized (the subscriber sender's SSRC, payload type,
mid extension; the publisher's timestamps, a sequence number of its own),
protected with the subscriber's SRTP session and written to its nominated
ICE pair, in the same turn of the event loop. No decode, no encode, no
jitter buffer, no stats: a server this cheap lets one core of bots be
measured at loads the real server does not carry yet (``loadtest`` bots'
own CPU per bot, loop lag, loss and latency through a real WebRTC hop).

    .venv/bin/python bench/wire_forwarder.py --port 8091
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import struct
import sys
import types
from pathlib import Path
from typing import Any

from aiohttp import web
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtcdtlstransport import State
from aiortc.rtp import RtpPacket
from aiortc.utils import random16, random32

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.plain_forwarder import Forwarder, Member, healthz, metrics  # noqa: E402

log = logging.getLogger("wire_forwarder")
_S = "_RTCRtpSender__"
_HEADER = struct.Struct("!HII")  # sequence number, timestamp, SSRC at offset 2
_SEQ_TS = struct.Struct("!HI")


class Out:
    """One subscriber's copy of one publisher's stream, sent straight to the subscriber's socket."""

    def __init__(self, sender: Any, payload_type: int) -> None:
        self.dtls = sender.transport
        self.ice = self.dtls.transport._connection
        packet = RtpPacket(payload_type=payload_type, marker=1, sequence_number=0, timestamp=0, ssrc=sender._ssrc)
        packet.extensions.mid = getattr(sender, _S + "mid")
        self.header = bytearray(packet.serialize(getattr(sender, _S + "rtp_header_extensions_map")))
        self.seq = random16()
        self.ts_offset = random32()

    def send(self, timestamp: int, payload: bytes) -> None:
        pair = self.ice._nominated.get(1)
        if pair is None or self.dtls._state is not State.CONNECTED:
            return
        _SEQ_TS.pack_into(self.header, 2, self.seq, (timestamp + self.ts_offset) & 0xFFFFFFFF)
        self.seq = (self.seq + 1) & 0xFFFF
        pair.protocol.transport.sendto(self.dtls._tx_srtp.protect(bytes(self.header) + payload), pair.remote_addr)


class WireForwarder(Forwarder):
    """``Forwarder`` with the media moved to the sockets (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.outs: dict[str, dict[str, Out]] = {}  # publisher id -> subscriber id -> its copy
        self.forwarded = 0

    def _on_track(self, member: Member, track: MediaStreamTrack) -> None:
        room = member.room
        room.publishers.add(member.id)
        for other in list(room.members.values()):
            if other is not member and other.pc.remoteDescription is not None:
                self._subscribe(other, member.id)

    async def _client_offer(self, member: Member, sdp: str) -> None:
        await super()._client_offer(member, sdp)
        self._hook(member)  # ICE has gathered its sockets; DTLS (hence media) is still round trips away

    def _subscribe(self, member: Member, publisher: str) -> None:
        if publisher in member.sending:
            return
        super()._subscribe(member, publisher)
        transceiver = next(t for t in member.pc.getTransceivers()
                           if getattr(t, "_forwarder_publisher", None) == publisher)
        outs = self.outs.setdefault(publisher, {})

        async def run_rtp(sender: Any, codec: Any) -> None:
            getattr(sender, _S + "rtp_started").set()
            try:
                outs[member.id] = Out(sender, int(codec.payloadType))
                await asyncio.get_running_loop().create_future()
            except asyncio.CancelledError:
                pass
            finally:
                outs.pop(member.id, None)
                getattr(sender, _S + "rtp_exited").set()

        transceiver.sender._run_rtp = types.MethodType(run_rtp, transceiver.sender)

    def _hook(self, member: Member) -> None:
        dtls = next((t.receiver.transport for t in member.pc.getTransceivers() if t.receiver.transport), None)
        if dtls is None:
            return
        outs = self.outs.setdefault(member.id, {})
        unpack = _HEADER.unpack_from
        for protocol in dtls.transport._connection._protocols:
            original = protocol.datagram_received

            def datagram_received(data: bytes, addr: Any, original: Any = original) -> None:
                if len(data) >= 12 and 127 < data[0] < 192 and not 191 < data[1] < 209 and dtls._rx_srtp:
                    try:
                        clear = dtls._rx_srtp.unprotect(data)
                    except Exception:  # noqa: BLE001 - pylibsrtp.Error: dropped, as aiortc drops it
                        return
                    _, timestamp, _ = unpack(clear, 2)
                    offset = 12 + 4 * (clear[0] & 0x0F)
                    if clear[0] & 0x10:
                        offset += 4 + 4 * int.from_bytes(clear[offset + 2:offset + 4], "big")
                    payload = clear[offset:]
                    for out in list(outs.values()):
                        out.send(timestamp, payload)
                    self.forwarded += 1
                    return
                original(data, addr)

            protocol.datagram_received = datagram_received

    async def _leave(self, member: Member) -> None:
        self.outs.pop(member.id, None)
        await super()._leave(member)


def create_app() -> web.Application:
    app = web.Application()
    forwarder = WireForwarder()
    app["forwarder"] = forwarder
    app.router.add_get("/ws", forwarder.websocket)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8091)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    web.run_app(create_app(), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
