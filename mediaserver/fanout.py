"""Encode once per published stream, fan the packets out to every subscriber.

``StreamEncoder`` turns a stream's processed 10 ms chunks into 20 ms Opus
packets, once, whatever the number of subscribers.  ``Fanout`` hands each
packet to the ``SubscriberTrack`` of every subscriber.  A ``SubscriberTrack``
is what aiortc's RTCRtpSender reads: it returns pre-encoded packets, so
aiortc never re-encodes and never computes its pure-Python audio level.
Its queue is bounded: a slow subscriber loses the oldest packets instead of
building up latency.
"""

from __future__ import annotations

import asyncio
import collections
import fractions
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from mediaserver.audio_format import CHUNK
from mediaserver.opus import FRAME_SAMPLES, OpusEncoder

if TYPE_CHECKING:
    from mediaserver.encoder_load import EncoderComplexity
    from mediaserver.rtp_send import DirectRtpSender

log = logging.getLogger(__name__)
TIME_BASE = fractions.Fraction(1, 48_000)


@dataclass
class EncodedPacket:
    """One Opus packet; duck-types the ``av.Packet`` fields aiortc's sender reads."""

    data: bytes
    pts: int
    origin: Optional[float] = None  # monotonic arrival time of the audio it carries
    time_base: fractions.Fraction = TIME_BASE

    def __bytes__(self) -> bytes:
        return self.data


class StreamEncoder:
    """The single Opus encoder of one published stream, at the complexity ``complexity`` says now."""

    def __init__(self, bitrate: int = 32_000, fec: bool = True,
                 complexity: Optional["EncoderComplexity"] = None) -> None:
        self._complexity = complexity
        self._encoder = OpusEncoder(bitrate=bitrate, fec=fec,
                                    **({"complexity": complexity.current} if complexity is not None else {}))
        self._frame = np.zeros(FRAME_SAMPLES, dtype=np.float32)
        self._fill = 0
        self._pts = 0
        self._origin: Optional[float] = None
        self._clock_pts = 0  # CHUNK per chunk handed in, either way: where real time says the stream is
        self.packets = 0
        self.forwarded = 0

    def push(self, chunk: np.ndarray, origin: Optional[float] = None) -> Optional[EncodedPacket]:
        self._clock_pts += CHUNK
        self._frame[self._fill:self._fill + CHUNK] = chunk
        if self._fill == 0:
            self._origin = origin
        self._fill += CHUNK
        if self._fill < FRAME_SAMPLES:
            return None
        self._fill = 0
        if self._complexity is not None and self._complexity.current != self._encoder.complexity:
            self._encoder.set_complexity(self._complexity.current)
        data = self._encoder.encode(self._frame)
        packet = EncodedPacket(data=data, pts=self._pts, origin=self._origin)
        self._pts += FRAME_SAMPLES
        self.packets += 1
        return packet

    def forward(self, entries: list[tuple[Optional[bytes], int]],
                origin: Optional[float] = None) -> list[EncodedPacket]:
        """Instead of encoding one chunk: the publisher's own packets that entered playout meanwhile.

        For a stream nothing changes (no stages): no decode-encode generation loss, no encoder
        cost. Entries without a payload (audio rebuilt by FEC or PLC) advance the timestamps but
        send nothing, as the loss they conceal did. A partial frame of the encoding path is dropped.
        """
        self._clock_pts += CHUNK
        self._fill = 0
        if self._pts < self._clock_pts - 2 * FRAME_SAMPLES:  # the source was silent: catch up with real time
            self._pts = self._clock_pts - FRAME_SAMPLES
        out = []
        for payload, samples in entries:
            if payload is not None:
                out.append(EncodedPacket(data=payload, pts=self._pts, origin=origin))
                self.forwarded += 1
            self._pts += samples
        return out

    def close(self) -> None:
        self._encoder.close()


class SubscriberTrack(MediaStreamTrack):
    """What one subscriber's RTP sender reads: packets of whichever stream it is attached to.

    One per sending transceiver of a subscriber's peer connection; it can be
    re-attached to another published stream, keeping RTP timestamps continuous.
    """

    kind = "audio"

    def __init__(self, max_queue: int = 5) -> None:
        super().__init__()
        self._queue: collections.deque[EncodedPacket] = collections.deque(maxlen=max_queue)
        self._ready = asyncio.Event()
        self._source: Optional["Fanout"] = None
        self._offset: Optional[int] = None
        self._last_pts = -FRAME_SAMPLES
        self.dropped = 0
        self.sent = 0
        self.send_errors = 0
        self.on_sent = None  # optional callback(EncodedPacket) for telemetry / echo reference
        self._direct: Optional["DirectRtpSender"] = None  # set while packets go out at once (rtp_send)
        self._stopped = asyncio.Event()

    @property
    def source(self) -> Optional["Fanout"]:
        return self._source

    def attach(self, fanout: "Fanout") -> None:
        self.detach()
        self._source = fanout
        self._offset = None
        fanout.add(self)

    def detach(self) -> None:
        if self._source is not None:
            self._source.remove(self)
            self._source = None
        self._queue.clear()

    def bind_direct(self, direct: "DirectRtpSender") -> None:
        """From now on ``offer`` sends each packet at once through ``direct`` (no queue, no task)."""
        self._direct = direct
        self._queue.clear()

    def unbind_direct(self, direct: "DirectRtpSender") -> None:
        if self._direct is direct:
            self._direct = None

    @property
    def sends_directly(self) -> bool:
        return self._direct is not None

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def offer(self, packet: EncodedPacket) -> None:
        direct = self._direct
        if direct is not None:
            if self.readyState != "live":
                return
            out = self._restamp(packet)
            try:
                ok = direct.send(out)
            except Exception:  # a closing transport: this subscriber misses the packet, nobody else
                ok = False
                self.send_errors += 1
                if self.send_errors in (1, 100) or self.send_errors % 10000 == 0:
                    log.warning("subscriber send failed (%d times)", self.send_errors, exc_info=True)
            if not ok:
                self.dropped += 1
                return
            self.sent += 1
            if self.on_sent is not None:
                self.on_sent(out)
            return
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(packet)
        self._ready.set()

    async def recv(self) -> EncodedPacket:  # type: ignore[override]
        while not self._queue:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        if self.readyState != "live":
            raise MediaStreamError
        out = self._restamp(self._queue.popleft())
        self.sent += 1
        if self.on_sent is not None:
            self.on_sent(out)
        return out

    def _restamp(self, packet: EncodedPacket) -> EncodedPacket:
        """The packet on this track's timeline: timestamps continuous across re-attachments."""
        if self._offset is None:
            self._offset = self._last_pts + FRAME_SAMPLES - packet.pts
        pts = packet.pts + self._offset
        if pts <= self._last_pts:  # source restarted: keep timestamps increasing
            self._offset += self._last_pts + FRAME_SAMPLES - pts
            pts = self._last_pts + FRAME_SAMPLES
        self._last_pts = pts
        return EncodedPacket(data=packet.data, pts=pts, origin=packet.origin)

    def stop(self) -> None:
        self.detach()
        super().stop()
        self._ready.set()
        self._stopped.set()


class Fanout:
    """The subscriber set of one published stream."""

    def __init__(self) -> None:
        self._subscribers: set[SubscriberTrack] = set()

    def add(self, track: SubscriberTrack) -> None:
        self._subscribers.add(track)

    def remove(self, track: SubscriberTrack) -> None:
        self._subscribers.discard(track)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def publish(self, packet: EncodedPacket) -> None:
        for track in self._subscribers:
            track.offer(packet)

    def close(self) -> None:
        for track in list(self._subscribers):
            track.detach()
