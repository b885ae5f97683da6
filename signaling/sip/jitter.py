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

from mediaserver.jitter import JitterStats
from signaling.sip.g711 import G711Codec
from signaling.sip.plc import Concealer

RATE = 8000
CHUNK_8K = 80  # 10 ms
_MAX_PACKETS = 100  # ~2 s of 20 ms packets whatever the sender does
_MAX_CONCEAL_CHUNKS = 6  # 60 ms


def unwrap(value: int, reference: int, bits: int) -> int:
    """The extended value of a wrapped counter closest to ``reference``."""
    half = 1 << (bits - 1)
    mod = 1 << bits
    return reference + ((value - (reference % mod) + half) % mod - half)


class G711JitterBuffer:
    """Owns the decoded packets of one inbound G.711 stream between arrival and playout."""

    def __init__(self, codec: G711Codec, *, min_delay_ms: float = 20.0, max_delay_ms: float = 200.0,
                 start_delay_ms: float = 40.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.codec = codec
        self._min = min_delay_ms
        self._max = max_delay_ms
        self._target = max(min_delay_ms, min(max_delay_ms, start_delay_ms))
        self._clock = clock
        self._plc = Concealer()
        self._packets: dict[int, tuple[np.ndarray, float]] = {}
        self._ts_ref: int | None = None
        self._seq_ref = 0
        self._seq_base = 0
        self._seq_max = 0
        self._ssrc: int | None = None
        self._started = False
        self._first_arrival = 0.0
        self._play_ts = 0
        self._pending = np.zeros(0, dtype=np.float32)
        self._pending_arrival: float | None = None
        self._conceal_run = 0
        self._last_transit: float | None = None
        self._jitter = 0.0  # samples, RFC 3550 estimator
        self._last_adapt = 0.0
        self.stats = JitterStats(target_ms=self._target)

    # -- arrival side -----------------------------------------------------------
    def _sequence(self, seq: int, timestamp: int, ssrc: int | None) -> tuple[int, int]:
        if self._ts_ref is None or (ssrc is not None and ssrc != self._ssrc):
            if self._ts_ref is not None:  # a new source (re-INVITE, device switch): start over
                self._restart()
            self._ssrc = ssrc
            self._ts_ref = timestamp
            self._seq_ref = self._seq_base = self._seq_max = seq
        ext_ts = unwrap(timestamp, self._ts_ref, 32)
        ext_seq = unwrap(seq, self._seq_ref, 16)
        self._ts_ref, self._seq_ref = ext_ts, ext_seq
        self._seq_max = max(self._seq_max, ext_seq)
        return ext_seq, ext_ts

    def _restart(self) -> None:
        self._packets.clear()
        self._started = False
        self._pending = np.zeros(0, dtype=np.float32)
        self._last_transit = None

    def note_other(self, seq: int, timestamp: int, ssrc: int | None = None) -> None:
        """A packet of the same RTP stream that carries no audio (telephone-event): only count it."""
        self._sequence(seq, timestamp, ssrc)
        self.stats.received += 1

    def push(self, seq: int, timestamp: int, payload: bytes, arrival: float | None = None,
             ssrc: int | None = None) -> None:
        """Store one G.711 packet (called from the network path)."""
        now = self._clock() if arrival is None else arrival
        st = self.stats
        _, ext_ts = self._sequence(seq, timestamp, ssrc)
        st.received += 1
        st.lost = max(0, self._seq_max - self._seq_base + 1 - st.received)
        transit = now * RATE - ext_ts
        if self._last_transit is not None:
            self._jitter += (abs(transit - self._last_transit) - self._jitter) / 16.0
        self._last_transit = transit
        st.jitter_ms = self._jitter * 1000.0 / RATE
        if not payload:
            return
        if self._started and ext_ts + len(payload) <= self._play_ts:
            st.late += 1
            return
        if ext_ts in self._packets:
            st.duplicate += 1
            return
        if not self._packets and not self._started:
            self._first_arrival = now
        self._packets[ext_ts] = (self.codec.decode(payload), now)
        if len(self._packets) > _MAX_PACKETS:
            del self._packets[min(self._packets)]
            st.discarded += 1

    # -- playout side -------------------------------------------------------------
    def depth_ms(self) -> float:
        if not self._packets:
            return len(self._pending) * 1000.0 / RATE
        newest = max(self._packets)
        span = newest + len(self._packets[newest][0]) - self._play_ts + len(self._pending)
        return max(0.0, span * 1000.0 / RATE)

    def pull(self) -> tuple[np.ndarray, float | None]:
        """The next 10 ms (80 samples at 8 kHz) and the arrival time of the packet it came from."""
        now = self._clock()
        if not self._started:
            if not self._packets or (now - self._first_arrival) * 1000.0 < self._target:
                return np.zeros(CHUNK_8K, dtype=np.float32), None
            self._started = True
            self._play_ts = min(self._packets)
            self._conceal_run = 0
        while len(self._pending) < CHUNK_8K and self._fill_one():
            pass
        if len(self._pending) < CHUNK_8K:
            return self._underrun()
        out = self._pending[:CHUNK_8K]
        self._pending = self._pending[CHUNK_8K:]
        self._conceal_run = 0
        self._adapt(now)
        self.stats.buffer_ms = self.depth_ms()
        return out, self._pending_arrival

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

    def _append(self, pcm: np.ndarray, arrival: float | None) -> None:
        self._play_ts += len(pcm)
        self._pending = np.concatenate([self._pending, pcm]) if len(self._pending) else pcm
        if arrival is not None:
            self._pending_arrival = arrival

    def _underrun(self) -> tuple[np.ndarray, float | None]:
        st = self.stats
        self._conceal_run += 1
        if self._conceal_run == 1:
            st.underruns += 1
            self._target = min(self._max, self._target + 10.0)
            st.target_ms = self._target
        if self._conceal_run > _MAX_CONCEAL_CHUNKS:
            # The phone paused (hold, silence suppression, outage): go silent and re-prime.
            self._started = False
            self._pending = np.zeros(0, dtype=np.float32)
            self._plc.reset()
            return np.zeros(CHUNK_8K, dtype=np.float32), None
        need = CHUNK_8K - len(self._pending)
        pcm = self._plc.conceal(need)
        self._play_ts += need
        st.concealed_chunks += 1
        out = np.concatenate([self._pending, pcm])
        self._pending = np.zeros(0, dtype=np.float32)
        return out, None

    def _adapt(self, now: float) -> None:
        if self.depth_ms() > self._target + 60.0:
            # A burst after a stall: drop the oldest audio to bring the delay back to the target.
            while self._packets and self.depth_ms() > self._target + 20.0:
                del self._packets[min(self._packets)]
                self.stats.discarded += 1
                if self._packets:
                    self._play_ts = min(self._packets)
                    self._pending = np.zeros(0, dtype=np.float32)
        if now - self._last_adapt >= 1.0:
            self._last_adapt = now
            floor = max(self._min, 3.0 * self.stats.jitter_ms + 10.0)
            if self._target > floor:
                self._target = max(floor, self._target - 5.0)
            self.stats.target_ms = self._target
