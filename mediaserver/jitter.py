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
from dataclasses import dataclass

import numpy as np

from mediaserver.audio_format import CHUNK, SAMPLE_RATE
from mediaserver.opus import FRAME_SAMPLES, OpusDecoder

_MAX_PACKETS = 64  # ~1.3 s of 20 ms packets: bounded memory whatever the sender does
_MAX_CONCEAL_CHUNKS = 6  # after 60 ms without packets, go silent and re-prime


def _unwrap(value: int, reference: int, bits: int) -> int:
    half = 1 << (bits - 1)
    mod = 1 << bits
    diff = (value - (reference % mod) + half) % mod - half
    return reference + diff


@dataclass
class JitterStats:
    """Cumulative counters of one inbound stream (RFC 3550 jitter in ms)."""

    received: int = 0
    lost: int = 0
    late: int = 0
    duplicate: int = 0
    discarded: int = 0
    concealed_chunks: int = 0
    fec_recovered: int = 0
    underruns: int = 0
    jitter_ms: float = 0.0
    buffer_ms: float = 0.0
    target_ms: float = 0.0


class JitterBuffer:
    """Owns the packets of one inbound stream between arrival and playout."""

    def __init__(self, *, min_delay_ms: float = 20.0, max_delay_ms: float = 200.0,
                 start_delay_ms: float = 40.0, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        self._min = min_delay_ms
        self._max = max_delay_ms
        self._target = max(min_delay_ms, min(max_delay_ms, start_delay_ms))
        self._clock = clock
        self._decoder = OpusDecoder()
        self._packets: dict[int, tuple[bytes, float]] = {}
        self._ts_ref: int | None = None
        self._seq_ref: int | None = None
        self._seq_base = 0
        self._seq_max = 0
        self._started = False
        self._first_arrival = 0.0
        self._play_ts = 0
        self._pending = np.zeros(0, dtype=np.float32)
        self._pending_arrival: float | None = None
        self._conceal_run = 0
        self._last_transit: float | None = None
        self._jitter = 0.0  # in samples, RFC 3550 estimator
        self._last_adapt = 0.0
        self.stats = JitterStats(target_ms=self._target)

    # -- arrival side -----------------------------------------------------
    def push(self, seq: int, timestamp: int, payload: bytes, arrival: float | None = None) -> None:
        """Store one depayloaded RTP packet (called from the network path)."""
        now = self._clock() if arrival is None else arrival
        st = self.stats
        if self._ts_ref is None:
            self._ts_ref = timestamp
            self._seq_ref = seq
            self._seq_base = seq
            self._seq_max = seq
        ext_ts = _unwrap(timestamp, self._ts_ref, 32)
        ext_seq = _unwrap(seq, self._seq_ref or 0, 16)
        self._ts_ref = ext_ts
        self._seq_ref = ext_seq
        if ext_seq > self._seq_max:
            self._seq_max = ext_seq
        st.received += 1
        expected = self._seq_max - self._seq_base + 1
        st.lost = max(0, expected - st.received)
        # RFC 3550 interarrival jitter, in timestamp units (48 kHz)
        transit = now * SAMPLE_RATE - ext_ts
        if self._last_transit is not None:
            d = abs(transit - self._last_transit)
            self._jitter += (d - self._jitter) / 16.0
        self._last_transit = transit
        st.jitter_ms = self._jitter * 1000.0 / SAMPLE_RATE
        if self._started and ext_ts < self._play_ts:
            st.late += 1
            return
        if ext_ts in self._packets:
            st.duplicate += 1
            return
        if not self._packets and not self._started:
            self._first_arrival = now
        self._packets[ext_ts] = (payload, now)
        if len(self._packets) > _MAX_PACKETS:
            oldest = min(self._packets)
            del self._packets[oldest]
            st.discarded += 1

    # -- playout side -----------------------------------------------------
    def depth_ms(self) -> float:
        if not self._packets:
            return len(self._pending) * 1000.0 / SAMPLE_RATE
        newest = max(self._packets)
        span = newest + FRAME_SAMPLES - self._play_ts + len(self._pending)
        return max(0.0, span * 1000.0 / SAMPLE_RATE)

    def pull(self) -> tuple[np.ndarray, float | None]:
        """The next 10 ms of audio and the arrival time of the packet it came from."""
        now = self._clock()
        if not self._started:
            if not self._packets or (now - self._first_arrival) * 1000.0 < self._target:
                return np.zeros(CHUNK, dtype=np.float32), None
            self._started = True
            self._play_ts = min(self._packets)
            self._conceal_run = 0
        while len(self._pending) < CHUNK:
            if not self._fill_one():
                break
        if len(self._pending) < CHUNK:
            return self._underrun(now)
        out = self._pending[:CHUNK]
        self._pending = self._pending[CHUNK:]
        arrival = self._pending_arrival
        self._adapt(now)
        self.stats.buffer_ms = self.depth_ms()
        return out, arrival

    def _fill_one(self) -> bool:
        entry = self._packets.pop(self._play_ts, None)
        if entry is not None:
            payload, arrival = entry
            pcm = self._decoder.decode(payload)
            self._append(pcm, arrival)
            self._conceal_run = 0
            return True
        if not self._packets:
            return False
        nxt = min(self._packets)
        if nxt < self._play_ts:  # stale entry left behind by a resync
            del self._packets[nxt]
            return True
        gap = min(nxt - self._play_ts, self._decoder.last_frame_samples)
        if nxt - self._play_ts <= self._decoder.last_frame_samples:
            pcm = self._decoder.recover(self._packets[nxt][0], gap)
            self.stats.fec_recovered += 1
        else:
            pcm = self._decoder.conceal(gap)
        self.stats.concealed_chunks += max(1, len(pcm) // CHUNK)
        self._append(pcm, None)
        return True

    def _append(self, pcm: np.ndarray, arrival: float | None) -> None:
        self._play_ts += len(pcm)
        self._pending = np.concatenate([self._pending, pcm]) if len(self._pending) else pcm
        if arrival is not None:
            self._pending_arrival = arrival

    def _underrun(self, now: float) -> tuple[np.ndarray, float | None]:
        st = self.stats
        self._conceal_run += 1
        if self._conceal_run == 1:
            st.underruns += 1
            self._target = min(self._max, self._target + 10.0)
            st.target_ms = self._target
        if self._conceal_run > _MAX_CONCEAL_CHUNKS:
            # The sender paused (mute, DTX, network outage): go silent, re-prime later.
            self._started = False
            self._pending = np.zeros(0, dtype=np.float32)
            return np.zeros(CHUNK, dtype=np.float32), None
        need = CHUNK - len(self._pending)
        pcm = self._decoder.conceal(max(need, 120))
        self._play_ts += len(pcm)
        st.concealed_chunks += 1
        buf = np.concatenate([self._pending, pcm])
        self._pending = buf[CHUNK:]
        return buf[:CHUNK], None

    def _adapt(self, now: float) -> None:
        depth = self.depth_ms()
        if depth > self._target + 60.0:
            # Too much audio queued (a burst after a stall): drop the oldest to cut latency.
            while self._packets and self.depth_ms() > self._target + 20.0:
                oldest = min(self._packets)
                del self._packets[oldest]
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
