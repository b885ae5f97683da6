"""What every inbound RTP audio stream's jitter buffer shares, whatever its codec.

``PlayoutBuffer`` keeps the packets of one stream between arrival and
playout: it extends the wrapping RTP counters, counts received, lost, late,
duplicate and discarded packets, estimates the RFC 3550 interarrival jitter,
primes to a target delay, is *pulled* one 10 ms chunk at a time by the media
clock, conceals underruns on time *without skipping* (the concealment is
inserted and the late packet still plays: the delay grows instead of a
packet being lost), goes silent after 60 ms without audio and re-primes, and
adapts its target: up 10 ms on each underrun, down towards three times the
measured jitter, dropping a backlog well above the target at once and one
packet of a smaller lasting excess at a time (see :meth:`PlayoutBuffer._adapt`).
Every skip and every insertion moves the played timeline against real time;
``timeline_shift`` counts it, in step with the chunks pulled (a pause of the
sender as one net jump when it plays again), so that an echo canceller
downstream can move its delay by as much.

A codec's buffer (``mediaserver.jitter.JitterBuffer`` for Opus,
``signaling.sip.jitter.G711JitterBuffer`` for phones) says what it stores per
packet, how many samples that covers, how it fills the playout queue from the
stored packets (decoding, FEC, PLC) and how it conceals.
"""

from __future__ import annotations

import collections
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

Entry = TypeVar("Entry")

MAX_CONCEAL_CHUNKS = 6  # after 60 ms without packets, go silent and re-prime
# A buffer whose depth stayed at least one packet above the target for a whole adaptation period (1 s)
# drops one packet at the next quiet chunk (RMS under QUIET_RATIO of the stream's running level, or
# digital silence), or after TRIM_FORCE_S without one: the delay a join burst or an old underrun left
# behind is given back, ~20 ms at a time, where nobody hears the cut.
QUIET_RATIO = 0.25
QUIET_FLOOR = 1e-3  # -60 dBFS: quiet whatever the running level
TRIM_FORCE_S = 4.0


def unwrap(value: int, reference: int, bits: int) -> int:
    """The extended value of a wrapped counter closest to ``reference``."""
    half = 1 << (bits - 1)
    mod = 1 << bits
    return reference + ((value - (reference % mod) + half) % mod - half)


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
    timeline_shift_ms: float = 0.0  # the played timeline's jumps ahead of real time in all (skips - stretches)


class PlayoutBuffer(ABC, Generic[Entry]):
    """Owns one stream's stored packets, playout position, target delay and statistics."""

    def __init__(self, *, rate: int, chunk: int, max_packets: int, min_delay_ms: float, max_delay_ms: float,
                 start_delay_ms: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.chunk = chunk
        self._max_packets = max_packets
        self._min = min_delay_ms
        self._max = max_delay_ms
        self._target = max(min_delay_ms, min(max_delay_ms, start_delay_ms))
        self._clock = clock
        self._packets: dict[int, tuple[Entry, float]] = {}  # extended RTP timestamp -> (entry, arrival)
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
        self._jitter = 0.0  # in samples, RFC 3550 estimator
        self._last_adapt = 0.0
        self._window_min_ms = float("inf")  # the least depth since the last adaptation
        self._trim_since: float | None = None  # a lasting excess waits for a quiet chunk since then
        self._level = 0.0  # running RMS of the played audio
        # samples a trim may still skip (None: any): a skipped packet moves the echo 20 ms against its
        # reference, so an echo canceller that cannot follow ``timeline_shift`` pins it at 0, and one that
        # follows within a delay line gives that line's room (the burst drop still applies)
        self.trim_room: int | None = None
        # samples the played timeline has jumped ahead of real time (skips) minus those it was stretched
        # by (concealment inserted on underruns), up to the chunk last pulled
        self.timeline_shift = 0
        self._out_pos = 0  # samples pulled so far
        self._shifts: collections.deque[tuple[int, int]] = collections.deque()  # (first output sample, shift)
        self._resume_ts: int | None = None  # gone silent: the RTP position where the played audio stopped
        self._silent_samples = 0  # ... and the samples pulled since (one net jump when it plays again)
        self.stats = JitterStats(target_ms=self._target)

    # -- what a codec provides ----------------------------------------------------
    @abstractmethod
    def _samples(self, entry: Entry) -> int:
        """Samples one stored packet covers."""

    @abstractmethod
    def _fill_one(self) -> bool:
        """Move the packet at the playout position (or a concealment of the hole there) to the queue
        with :meth:`_append`; False when nothing is stored."""

    @abstractmethod
    def _conceal(self, samples: int) -> np.ndarray:
        """At least ``samples`` samples concealing an underrun."""

    def _on_silence(self) -> None:
        """The stream went silent (60 ms of underruns): reset concealment state."""

    # -- arrival side ---------------------------------------------------------------
    def _arrive(self, seq: int, timestamp: int, now: float, ssrc: int | None = None, *, timed: bool = True) -> int:
        """Count one packet of the stream; returns its extended RTP timestamp.

        ``timed=False``: a packet whose timestamp does not advance with time (an RFC 4733 event
        repeats its start time), left out of the jitter estimate."""
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
        st = self.stats
        st.received += 1
        st.lost = max(0, self._seq_max - self._seq_base + 1 - st.received)
        if not timed:
            return ext_ts
        transit = now * self.rate - ext_ts
        if self._last_transit is not None:
            self._jitter += (abs(transit - self._last_transit) - self._jitter) / 16.0
        self._last_transit = transit
        st.jitter_ms = self._jitter * 1000.0 / self.rate
        return ext_ts

    def _store(self, ext_ts: int, entry: Entry, now: float) -> None:
        """Keep a packet for playout unless it is late or a duplicate; bounded in count."""
        st = self.stats
        if self._started and ext_ts + self._samples(entry) <= self._play_ts:
            st.late += 1
            return
        if ext_ts in self._packets:
            st.duplicate += 1
            return
        if not self._packets and not self._started:
            self._first_arrival = now
        self._packets[ext_ts] = (entry, now)
        if len(self._packets) > self._max_packets:
            del self._packets[min(self._packets)]
            st.discarded += 1

    def _restart(self) -> None:
        self._resume_ts = None  # a new source: its timeline has nothing to do with the old one
        self._packets.clear()
        self._started = False
        self._pending = np.zeros(0, dtype=np.float32)
        self._last_transit = None

    # -- playout side -----------------------------------------------------------------
    def depth_ms(self) -> float:
        if not self._packets:
            return len(self._pending) * 1000.0 / self.rate
        newest = max(self._packets)
        span = newest + self._samples(self._packets[newest][0]) - self._play_ts + len(self._pending)
        return max(0.0, span * 1000.0 / self.rate)

    def pull(self) -> tuple[np.ndarray, float | None]:
        """The next 10 ms of audio and the arrival time of the packet it came from."""
        now = self._clock()
        if not self._started:
            if not self._packets or (now - self._first_arrival) * 1000.0 < self._target:
                if self._resume_ts is not None:  # silence between two talk spurts of one source: stretched
                    self._silent_samples += self.chunk
                self._advance()
                return np.zeros(self.chunk, dtype=np.float32), None
            self._started = True
            self._play_ts = min(self._packets)
            self._conceal_run = 0
            if self._resume_ts is not None:  # the sender's clock moved on while our silence played: one
                # net jump, not one per silent chunk (a canceller told each would lose its delay and taps
                # to the ends of its range over a pause of seconds)
                self._shifts.append((self._out_pos, self._play_ts - self._resume_ts - self._silent_samples))
                self._resume_ts = None
        while len(self._pending) < self.chunk and self._fill_one():
            pass
        if len(self._pending) < self.chunk:
            return self._underrun()
        out = self._pending[: self.chunk]
        self._pending = self._pending[self.chunk:]
        self._conceal_run = 0
        self._advance()
        self._adapt(now, out)
        self.stats.buffer_ms = self.depth_ms()
        return out, self._pending_arrival

    def _advance(self) -> None:
        """One chunk was pulled: count the timeline jumps that took effect in its first half or before."""
        start = self._out_pos
        self._out_pos += self.chunk
        shifts = self._shifts
        if shifts and shifts[0][0] < start + self.chunk // 2:
            while shifts and shifts[0][0] < start + self.chunk // 2:
                self.timeline_shift += shifts.popleft()[1]
            self.stats.timeline_shift_ms = self.timeline_shift * 1000.0 / self.rate

    def _jump(self, samples: int, after_pending: bool) -> None:
        """The timeline jumps ``samples`` ahead (negative: stretched) at the next sample to be pulled after
        the chunk just pulled, or after the samples still pending too."""
        at = self._out_pos + (len(self._pending) if after_pending else 0)
        self._shifts.append((at, samples))

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
        if self._conceal_run > MAX_CONCEAL_CHUNKS:
            # The sender paused (mute, hold, DTX, silence suppression, outage): go silent, re-prime later.
            self._started = False
            self._pending = np.zeros(0, dtype=np.float32)
            self._resume_ts, self._silent_samples = self._play_ts, self.chunk
            self._on_silence()
            self._advance()
            return np.zeros(self.chunk, dtype=np.float32), None
        # Stretch, do not skip: the concealment is *inserted* and the playout position stays where it is,
        # so the packet that was only late still plays when it comes (the delay grows by this chunk; the
        # backlog trim of ``_adapt`` takes it back once the target has decayed).  Advancing the position
        # here turned every packet a few ms late into a lost one and never let the delay grow.
        pcm = self._conceal(self.chunk - len(self._pending))
        st.concealed_chunks += 1
        buf = np.concatenate([self._pending, pcm])
        self._shifts.append((self._out_pos + len(self._pending), -len(pcm)))  # all of it inserted
        self._pending = buf[self.chunk:]
        self._advance()
        return buf[: self.chunk], None

    def _adapt(self, now: float, out: np.ndarray) -> None:
        depth = self.depth_ms()
        if depth > self._target + 60.0:
            # Too much audio queued (a burst after a stall): drop the oldest to cut latency.
            next_ts = self._play_ts - len(self._pending)  # the timeline position of the next sample
            while self._packets and self.depth_ms() > self._target + 20.0:
                del self._packets[min(self._packets)]
                self.stats.discarded += 1
                if self._packets:
                    self._play_ts = min(self._packets)
                    self._pending = np.zeros(0, dtype=np.float32)
            if not self._pending.size and self._play_ts > next_ts:
                self._jump(self._play_ts - next_ts, after_pending=False)
            depth = self.depth_ms()
        self._window_min_ms = min(self._window_min_ms, depth)
        rms = float(np.sqrt(np.dot(out, out) / len(out))) if len(out) else 0.0
        self._level += 0.01 * (rms - self._level)  # ~1 s
        if self._trim_since is not None and (self.trim_room == 0 or rms < max(QUIET_FLOOR, QUIET_RATIO * self._level)
                                             or now - self._trim_since >= TRIM_FORCE_S):
            self._trim_one()
        if now - self._last_adapt >= 1.0:
            self._last_adapt = now
            floor = max(self._min, 3.0 * self.stats.jitter_ms + 10.0)
            if self._target > floor:
                self._target = max(floor, self._target - 5.0)
            self.stats.target_ms = self._target
            entry = self._packets.get(self._play_ts)
            packet_ms = self._samples(entry[0]) * 1000.0 / self.rate if entry is not None else 0.0
            if self._trim_since is None and entry is not None and self._window_min_ms - self._target >= packet_ms:
                self._trim_since = now
            self._window_min_ms = float("inf")

    def _trim_one(self) -> None:
        """Skip the next stored packet (a lasting excess over the target, at a quiet moment)."""
        self._trim_since = None
        entry = self._packets.get(self._play_ts)
        if entry is None:
            return
        samples = self._samples(entry[0])
        if self.trim_room is not None and samples > self.trim_room:
            return
        del self._packets[self._play_ts]
        self._jump(samples, after_pending=True)
        self._play_ts += samples
        self.stats.discarded += 1
