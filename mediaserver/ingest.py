"""Inbound RTP audio: from aiortc's receiver straight into our jitter buffer.

aiortc's ``RTCRtpReceiver`` keeps doing what it does well (SRTP, RTCP
receiver reports, depayloading) but its audio jitter buffer is replaced by an
``RtpTap`` that forwards every packet to our ``JitterBuffer``.  aiortc's
decoder thread and its unbounded frame queue then stay idle: decoding, loss
concealment and the 10 ms pacing happen in ``InboundRtpSource.pull``, called
by the media clock.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import numpy as np
from aiortc import RTCRtpReceiver

from mediaserver.jitter import JitterBuffer, JitterStats

log = logging.getLogger(__name__)

MAX_PAYLOAD = 1500


class RtpTap:
    """Stands in for aiortc's audio jitter buffer inside one RTCRtpReceiver."""

    capacity = 16

    def __init__(self, buffer: JitterBuffer) -> None:
        self._buffer = buffer
        self.bytes = 0
        self.rejected = 0

    def add(self, packet: Any) -> tuple[bool, None]:
        data: bytes = getattr(packet, "_data", b"") or b""
        if len(data) > MAX_PAYLOAD:
            self.rejected += 1
            return False, None
        self.bytes += len(data)
        self._buffer.push(packet.sequence_number, packet.timestamp, data, time.monotonic())
        return False, None

    def remove(self, count: int) -> None:  # aiortc API compatibility
        pass


class InboundRtpSource:
    """A published WebRTC microphone as a source of 10 ms chunks."""

    def __init__(self, receiver: RTCRtpReceiver, *, min_delay_ms: float = 20.0,
                 max_delay_ms: float = 200.0, start_delay_ms: float = 40.0) -> None:
        self.buffer = JitterBuffer(min_delay_ms=min_delay_ms, max_delay_ms=max_delay_ms,
                                   start_delay_ms=start_delay_ms)
        self.playout = self.buffer  # (read by PublishedStream: the delay it may trim)
        self.tap = RtpTap(self.buffer)
        attr = "_RTCRtpReceiver__jitter_buffer"
        if not hasattr(receiver, attr):
            raise RuntimeError("unsupported aiortc version: receiver has no audio jitter buffer to replace")
        setattr(receiver, attr, self.tap)

    def pull(self) -> tuple[np.ndarray, Optional[float]]:
        return self.buffer.pull()

    def take_forwardable(self) -> list[tuple[Optional[bytes], int]]:
        """The publisher's Opus payloads that entered playout since the last call (``JitterBuffer``)."""
        return self.buffer.take_forwardable()

    @property
    def stats(self) -> JitterStats:
        return self.buffer.stats

    def close(self) -> None:
        pass
