"""Adaptive jitter buffer with loss concealment for one inbound Opus stream.

Replaces aiortc's fixed 80 ms audio jitter buffer, which waits up to 320 ms on
a single lost packet and never conceals.  Packets are pushed on arrival and
audio is *pulled* by the media clock every 10 ms, so a missing packet is
concealed (Opus PLC, or rebuilt from the next packet's in-band FEC) on time.
The target delay adapts: it grows on underruns and decays towards three
times the measured interarrival jitter.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from mediaserver.audio_format import CHUNK, SAMPLE_RATE
from mediaserver.opus import FRAME_SAMPLES, OpusDecoder
from mediaserver.playout import JitterStats, PlayoutBuffer

__all__ = ["JitterBuffer", "JitterStats"]

_MAX_PACKETS = 64  # ~1.3 s of 20 ms packets: bounded memory whatever the sender does


class JitterBuffer(PlayoutBuffer[bytes]):
    """Owns the Opus packets of one inbound stream and its decoder (see ``PlayoutBuffer``)."""

    def __init__(self, *, min_delay_ms: float = 20.0, max_delay_ms: float = 200.0,
                 start_delay_ms: float = 40.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(rate=SAMPLE_RATE, chunk=CHUNK, max_packets=_MAX_PACKETS, min_delay_ms=min_delay_ms,
                         max_delay_ms=max_delay_ms, start_delay_ms=start_delay_ms, clock=clock)
        self._decoder = OpusDecoder()
        # What went into the playout queue since the last ``take_forwardable``: the original payload of
        # each packet played as received, None for samples rebuilt by FEC or PLC (bounded).
        self._forwardable: list[tuple[bytes | None, int]] = []

    def take_forwardable(self) -> list[tuple[bytes | None, int]]:
        """The (payload or None, samples) entries queued for playout since the last call, in order.

        A stream that is not processed forwards these payloads instead of re-encoding the audio."""
        out, self._forwardable = self._forwardable, []
        return out

    def _record(self, payload: bytes | None, samples: int) -> None:
        if len(self._forwardable) >= 16:
            del self._forwardable[0]
        self._forwardable.append((payload, samples))

    def push(self, seq: int, timestamp: int, payload: bytes, arrival: float | None = None) -> None:
        """Store one depayloaded RTP packet (called from the network path); decoded at playout."""
        now = self._clock() if arrival is None else arrival
        self._store(self._arrive(seq, timestamp, now), payload, now)

    def _samples(self, entry: bytes) -> int:
        return FRAME_SAMPLES

    def _fill_one(self) -> bool:
        entry = self._packets.pop(self._play_ts, None)
        if entry is not None:
            payload, arrival = entry
            pcm = self._decoder.decode(payload)
            self._record(payload, len(pcm))
            self._append(pcm, arrival)
            return True
        if not self._packets:
            return False
        nxt = min(self._packets)
        if nxt < self._play_ts:  # arrived after its start was played (or left by a resync): too late
            del self._packets[nxt]
            self.stats.late += 1
            return True
        gap = min(nxt - self._play_ts, self._decoder.last_frame_samples)
        if nxt - self._play_ts <= self._decoder.last_frame_samples:
            pcm = self._decoder.recover(self._packets[nxt][0], gap)  # in-band FEC of the next packet
            self.stats.fec_recovered += 1
        else:
            pcm = self._decoder.conceal(gap)
        self.stats.concealed_chunks += max(1, len(pcm) // CHUNK)
        self._record(None, len(pcm))
        self._append(pcm, None)
        return True

    def _conceal(self, samples: int) -> np.ndarray:
        pcm = self._decoder.conceal(max(samples, 120))  # Opus PLC works in 2.5 ms steps
        self._record(None, len(pcm))
        return pcm
