"""The bots' media off aiortc's per-packet Python path: one shared send timer, datagrams counted as they land.

aiortc does the signalling-side work of every bot (ICE with aioice, the
DTLS handshake, SRTP keys, RTCP, consent freshness), but its per-packet path
costs a bot hundreds of microseconds a second per stream: a sender task per
bot that awaits through the DTLS, ICE and STUN layers for every packet, and
on the way in a STUN parse attempt, a queue hand-off, SRTP unprotect, RTP
parsing and routing for every datagram.  A load generator must carry many
times the streams its server does, so once a bot is connected:

- ``WireSender`` takes the place of its ``RTCRtpSender``'s RTP task (as the
  server's own direct sender does): the bots of one event loop share ONE
  ``MediaPump`` timer, which every 5 ms sends, for the bots whose 20 ms
  phase falls in that slot, the RTP packet of their next pre-encoded Opus
  frame, protected with the DTLS transport's SRTP session and written to the
  nominated ICE pair's socket.  aiortc's RTCP sender reports keep running on
  the packet and octet counts kept here; the server hears SRTP that
  decrypts, and aioice keeps its consent checks (STUN) going.
- ``WireReceiver`` hooks the ``datagram_received`` of the bot's aioice
  sockets: an RTP datagram's clear-text header (sequence number, timestamp,
  SSRC) and arrival time go straight into its ``Recording``'s arrays; only a
  stream the bot decodes is unprotected (libsrtp) and its payload kept for
  decoding after the window.  STUN, DTLS and RTCP datagrams, and RTP of an
  SSRC not known yet, take aioice's and aiortc's own path; the server's
  RTCP is dropped unread (it only feeds aiortc's statistics).

SSRC to stream: the SSRCs the server announces in its offers, as aiortc's
RTP router holds them (``ssrc_table``: SSRC -> receiver), and the bot's
receiver -> ``Recording`` map; a packet aiortc had to route by payload type
teaches the router, and the next one of that SSRC takes the fast path.
Receiving does not authenticate counted-only packets (the server is the one
under test, on a trusted path).  If the installed aiortc/aioice lacks what
this relies on, ``install``/``attach`` return False and the bot keeps
aiortc's path.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import types
import weakref
from collections.abc import Callable
from typing import Any

from aiortc import RTCRtpSender
from aiortc.rtcdtlstransport import State
from aiortc.rtp import RtpPacket
from aiortc.utils import random16, random32

log = logging.getLogger(__name__)

FRAME = 960  # samples per 20 ms packet at 48 kHz
FRAME_S = 0.02
SLOTS = 4  # a 20 ms frame period in four 5 ms send slots
NTP_EPOCH = 2_208_988_800  # seconds from 1900 (NTP) to 1970 (Unix)
_S = "_RTCRtpSender__"  # aiortc's name-mangled private attributes of RTCRtpSender
_SENDER_ATTRS = ("rtp_started", "rtp_exited", "rtp_header_extensions_map", "mid", "packet_count", "octet_count",
                 "rtp_timestamp", "ntp_timestamp")
_HEADER = struct.Struct("!HII")  # sequence number, timestamp, SSRC at offset 2
_SEQ_TS = struct.Struct("!HI")


class MediaPump:
    """One timer for every ``WireSender`` of an event loop: 5 ms ticks, each sender in one of four slots."""

    _pumps: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, MediaPump] = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        self.slots: list[list[WireSender]] = [[] for _ in range(SLOTS)]
        self._task: asyncio.Task[None] | None = None
        self.ticks = 0
        self.late_ticks = 0  # ticks run more than one slot late (the loop was busy)

    @classmethod
    def of_loop(cls) -> MediaPump:
        loop = asyncio.get_running_loop()
        pump = cls._pumps.get(loop)
        if pump is None:
            pump = cls._pumps[loop] = cls()
        return pump

    def add(self, sender: WireSender) -> None:
        min(self.slots, key=len).append(sender)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loadtest-media-pump")

    def remove(self, sender: WireSender) -> None:
        for slot in self.slots:
            if sender in slot:
                slot.remove(sender)
        if not any(self.slots) and self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        tick_s = FRAME_S / SLOTS
        start = time.monotonic()
        k = 0
        while True:
            k += 1
            delay = start + k * tick_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -tick_s:
                self.late_ticks += 1
            self.ticks += 1
            now = time.monotonic()
            for sender in self.slots[k % SLOTS]:
                try:
                    sender.tick(now)
                except Exception:  # noqa: BLE001 - one broken bot must not silence the others
                    log.exception("wire sender failed; it stops sending")
                    sender.stopped = True


class WireSender:
    """Sends one bot's pre-encoded Opus packets straight to its nominated ICE pair, one per pump tick.

    ``skip(n)``: the next ``n`` packets are not sent (their sequence numbers
    and timestamps are used up, as if the network lost them): tests make
    known losses with it.
    """

    def __init__(self, sender: RTCRtpSender, payload_type: int, packets: list[bytes],
                 send_log: list[tuple[float, int]], wire_log: list[tuple[float, int]]) -> None:
        self._sender = sender
        self._dtls: Any = sender.transport
        self._ice: Any = self._dtls.transport._connection  # aioice Connection
        self._packets = packets
        self._send_log = send_log
        self._wire_log = wire_log
        header = RtpPacket(payload_type=payload_type, marker=1, sequence_number=0, timestamp=0, ssrc=sender._ssrc)
        header.extensions.mid = getattr(sender, _S + "mid")
        self._header = bytearray(header.serialize(getattr(sender, _S + "rtp_header_extensions_map")))
        self._seq = random16()
        self._ts_origin = random32()
        self._index = 0
        self.pts = 0
        self.sent = 0
        self.skipped = 0
        self.not_connected = 0
        self.stopped = False
        self._skip = 0

    @staticmethod
    def install(sender: RTCRtpSender, packets: Callable[[], list[bytes]], send_log: list[tuple[float, int]],
                wire_log: list[tuple[float, int]], on_start: Callable[[WireSender], None] | None = None) -> bool:
        """Replace ``sender``'s RTP task by a ``WireSender`` on the loop's pump once it starts; False (and
        aiortc's own task stays) when this aiortc lacks what that needs."""
        if not all(hasattr(sender, _S + name) for name in _SENDER_ATTRS):
            log.warning("unsupported aiortc version: bots send through aiortc's RTP task")
            return False

        async def run_rtp(self: RTCRtpSender, codec: Any) -> None:
            getattr(self, _S + "rtp_started").set()
            wire: WireSender | None = None
            pump = MediaPump.of_loop()
            try:
                wire = WireSender(self, int(codec.payloadType), packets(), send_log, wire_log)
                if on_start is not None:
                    on_start(wire)
                pump.add(wire)
                await asyncio.get_running_loop().create_future()  # until aiortc cancels the task
            except asyncio.CancelledError:
                pass
            except Exception:  # never leave aiortc's stop() waiting for rtp_exited
                log.exception("wire sender failed")
            finally:
                if wire is not None:
                    wire.stopped = True
                    pump.remove(wire)
                getattr(self, _S + "rtp_exited").set()

        sender._run_rtp = types.MethodType(run_rtp, sender)  # type: ignore[method-assign]
        return True

    def skip(self, packets: int) -> None:
        self._skip += packets

    def tick(self, now: float) -> None:
        """Send the next packet (if connected; nothing is used up while not)."""
        if self.stopped:
            return
        pair = self._ice._nominated.get(1)
        if self._dtls._state is not State.CONNECTED or pair is None:
            self.not_connected += 1
            return
        payload = self._packets[self._index % len(self._packets)]
        pts = self.pts
        self._index += 1
        self.pts = pts + FRAME
        seq = self._seq
        self._seq = (seq + 1) & 0xFFFF
        if self._skip > 0:
            self._skip -= 1
            self.skipped += 1
            return
        timestamp = (self._ts_origin + pts) & 0xFFFFFFFF
        header = self._header
        _SEQ_TS.pack_into(header, 2, seq, timestamp)
        pair.protocol.transport.sendto(self._dtls._tx_srtp.protect(bytes(header) + payload), pair.remote_addr)
        self._send_log.append((now, pts))
        self._wire_log.append((now, pts))
        self.sent += 1
        s = self._sender  # what aiortc's RTCP sender reports read
        setattr(s, _S + "ntp_timestamp", int((time.time() + NTP_EPOCH) * 4294967296.0))
        setattr(s, _S + "rtp_timestamp", timestamp)
        setattr(s, _S + "octet_count", getattr(s, _S + "octet_count") + len(payload))
        setattr(s, _S + "packet_count", getattr(s, _S + "packet_count") + 1)


class StreamSink:
    """Where the RTP packets of one SSRC go: a ``Recording``'s arrays, and its payload list when decoded."""

    __slots__ = ("rec", "t", "seq", "ts", "decode")

    def __init__(self, rec: Any, decode: bool) -> None:
        self.rec = rec
        self.t = rec.rtp_arrivals.append
        self.seq = rec.rtp_seq.append
        self.ts = rec.rtp_ts.append
        self.decode = decode


class WireReceiver:
    """Counts one bot's incoming RTP at the socket (see the module docstring); the rest goes to aioice."""

    def __init__(self, pc: Any, sink_of: Callable[[Any], StreamSink | None]) -> None:
        self._pc = pc
        self._sink_of = sink_of  # aiortc receiver -> its sink (None: not known yet)
        self._sinks: dict[int, StreamSink] = {}
        self._hooked: dict[int, Any] = {}  # id(protocol) -> protocol
        self._dtls: Any = None
        self.packets = 0
        self.fallback = 0  # RTP datagrams handed to aiortc (SSRC not known yet)
        self.undecryptable = 0
        # the server's RTCP (sender reports of the streams we receive, receiver reports on ours) only
        # feeds aiortc's statistics, which no figure of the load test reads: dropped unread, it costs
        # nothing (a sender report is ~80 us of aiortc Python for every stream every second)
        self.drop_rtcp = True
        self.rtcp_dropped = 0

    def attach(self) -> bool:
        """Hook the sockets the connection has now (call again after a renegotiation); False: unsupported."""
        dtls = None
        for t in self._pc.getTransceivers():
            dtls = getattr(t.receiver, "transport", None) or dtls
        ice = getattr(getattr(dtls, "transport", None), "_connection", None)
        protocols = getattr(ice, "_protocols", None)
        if dtls is None or protocols is None or not hasattr(dtls, "_rtp_router"):
            return False
        self._dtls = dtls
        for protocol in protocols:
            if id(protocol) not in self._hooked and hasattr(protocol, "datagram_received"):
                self._hook(protocol)
        return True

    def forget_ssrcs(self) -> None:
        """Resolve every SSRC again (after the server's offers changed the streams)."""
        self._sinks.clear()

    def detach(self) -> None:
        for protocol in self._hooked.values():
            protocol.__dict__.pop("datagram_received", None)
        self._hooked.clear()

    def _resolve(self, ssrc: int) -> StreamSink | None:
        receiver = self._dtls._rtp_router.ssrc_table.get(ssrc)
        sink = self._sink_of(receiver) if receiver is not None else None
        if sink is not None:
            self._sinks[ssrc] = sink
        return sink

    def _hook(self, protocol: Any) -> None:
        original = protocol.datagram_received  # the bound method of the class
        sinks = self._sinks
        unpack = _HEADER.unpack_from
        monotonic = time.monotonic
        resolve = self._resolve
        dtls = self._dtls

        def datagram_received(data: bytes, addr: Any) -> None:
            # RTP: version 2 (first byte 128..191) and not RTCP (aiortc's is_rtcp: second byte 192..208)
            if len(data) >= 12 and 127 < data[0] < 192 and not 191 < data[1] < 209:
                seq, ts, ssrc = unpack(data, 2)
                sink = sinks.get(ssrc)
                if sink is None:
                    sink = resolve(ssrc)
                    if sink is None:
                        self.fallback += 1
                        original(data, addr)
                        return
                now = monotonic()
                sink.t(now)
                sink.seq(seq)
                sink.ts(ts)
                self.packets += 1
                if sink.decode:
                    self._keep(sink, data, now, ts, dtls)
                return
            if self.drop_rtcp and len(data) >= 2 and 127 < data[0] < 192:  # SRTCP: see drop_rtcp
                self.rtcp_dropped += 1
                return
            original(data, addr)

        protocol.datagram_received = datagram_received
        self._hooked[id(protocol)] = protocol

    def _keep(self, sink: StreamSink, data: bytes, now: float, ts: int, dtls: Any) -> None:
        """Unprotect a decoded stream's packet and keep its Opus payload."""
        rx = dtls._rx_srtp
        if rx is None:
            return
        try:
            clear = rx.unprotect(data)
        except Exception:  # noqa: BLE001 - pylibsrtp.Error: a replayed or corrupt packet, as aiortc drops it
            self.undecryptable += 1
            return
        offset = 12 + 4 * (clear[0] & 0x0F)
        if clear[0] & 0x10 and len(clear) >= offset + 4:  # header extension: 4 bytes + length words
            offset += 4 + 4 * int.from_bytes(clear[offset + 2:offset + 4], "big")
        end = len(clear) - (clear[-1] if clear[0] & 0x20 else 0)  # padding
        if offset < end:
            sink.rec.add_encoded(now, ts, clear[offset:end])
