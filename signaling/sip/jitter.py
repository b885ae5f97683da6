"""Adaptive jitter buffer for one phone's G.711 stream, pulled 10 ms at a time.

Packets are decoded on arrival and stored by (extended) RTP timestamp; the
media clock pulls 80 samples (10 ms at 8 kHz) every tick.  Missing audio is
concealed on time by ``Concealer`` (pitch repetition); after 60 ms without
packets the buffer goes silent and re-primes (hold, silence suppression).
The target delay grows by 10 ms on each underrun and decays towards three
times the measured interarrival jitter; a backlog well above the target is
dropped to keep the mouth-to-ear delay short.  Statistics use the same
``JitterStats`` as the WebRTC path, so calls appear in telemetry alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from mediaserver.playout import PlayoutBuffer
from signaling.sip.g711 import G711Codec
from signaling.sip.plc import Concealer

RATE = 8000
CHUNK_8K = 80  # 10 ms
_MAX_PACKETS = 100  # ~2 s of 20 ms packets whatever the sender does


class G711JitterBuffer(PlayoutBuffer[np.ndarray]):
    """Owns the decoded packets of one inbound G.711 stream and its concealer (see ``PlayoutBuffer``)."""

    def __init__(self, codec: G711Codec, *, min_delay_ms: float = 20.0, max_delay_ms: float = 200.0,
                 start_delay_ms: float = 40.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(rate=RATE, chunk=CHUNK_8K, max_packets=_MAX_PACKETS, min_delay_ms=min_delay_ms,
                         max_delay_ms=max_delay_ms, start_delay_ms=start_delay_ms, clock=clock)
        self.codec = codec
        self._plc = Concealer()

    def note_other(self, seq: int, timestamp: int, ssrc: int | None = None) -> None:
        """A packet of the same RTP stream that carries no audio (telephone-event): only count it."""
        self._arrive(seq, timestamp, self._clock(), ssrc, timed=False)

    def push(self, seq: int, timestamp: int, payload: bytes, arrival: float | None = None,
             ssrc: int | None = None) -> None:
        """Store one G.711 packet, decoded on arrival (called from the network path)."""
        now = self._clock() if arrival is None else arrival
        ext_ts = self._arrive(seq, timestamp, now, ssrc)
        if payload:
            self._store(ext_ts, self.codec.decode(payload), now)

    def _samples(self, entry: np.ndarray) -> int:
        return len(entry)

    def _fill_one(self) -> bool:
        entry = self._packets.pop(self._play_ts, None)
        if entry is not None:
            self._append(self._plc.good(entry[0]), entry[1])
            return True
        if not self._packets:
            return False
        nxt = min(self._packets)
        if nxt < self._play_ts:  # overlaps the playout point: keep the part still ahead
            pcm, arrival = self._packets.pop(nxt)
            tail = pcm[self._play_ts - nxt:]
            if len(tail):
                self._append(self._plc.good(tail), arrival)
            return True
        gap = min(nxt - self._play_ts, CHUNK_8K)  # a hole: conceal it, on time
        self._append(self._plc.conceal(gap), None)
        self.stats.concealed_chunks += 1
        return True

    def _conceal(self, samples: int) -> np.ndarray:
        return self._plc.conceal(samples)

    def _on_silence(self) -> None:
        self._plc.reset()
