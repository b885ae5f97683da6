"""Publisher-to-subscriber latency from the audio itself: the published speech is the timing marker.

Why not an embedded tone or PN burst: the server may run denoisers
(RNNoise, DeepFilterNet, NSNet2) that are trained to remove exactly such
stationary or noise-like additions, and a burst loud enough to survive them
would spoil the DNSMOS figures we also measure.  Speech, on the other hand,
is what every stage is built to keep, and it never repeats within a loop of
tens of seconds, so it makes a unique, enhancement-proof marker.

Method, per received stream:

1. The publisher logs, for every 20 ms frame it hands to its WebRTC sender,
   ``(monotonic time, pts)`` (``PcmTrack.send_log``): a ``SendTimeline``.
   Sample ``p`` of its looped signal left at ``time_of(p)``.
2. The subscriber keeps every decoded frame with its pts and two times: the
   arrival of the RTP packet that carried it (``wire``, before aiortc's
   fixed receive buffer) and the moment ``track.recv()`` returned it
   (``deliver``).  Frames with consecutive pts form a gap-free segment.
3. Every 0.5 s window of a segment (16 kHz, zero-phase decimated) is matched
   by normalized cross-correlation against the publisher's clean speech
   (``MarkerTemplate``) and against the published mix (speech plus noise:
   the better template when no denoiser runs), searched over the sent
   positions that could precede it (up to ``max_latency_s`` earlier).  A
   match (NCC >= ``min_ncc``, and ``min_margin`` above any other peak, which
   rejects noise-only windows of a looped noise bed) gives the sent
   position ``p`` of the window's first sample, to 1/16 ms.
4. Latency = receive time of that sample minus ``time_of(p)``, both
   referenced to their frame start: ``wire_ms`` (publisher's send to the
   subscriber's RTP arrival: the network plus the whole server) and
   ``e2e_ms`` (to the audio leaving the subscriber's WebRTC stack: adds
   aiortc's receive jitter buffer and decoder).

The denoiser changes the waveform little where speech dominates, so the
matches hold with enhancement on; a stage's algorithmic delay (its
``latency_samples``) is part of what is measured, as a listener hears it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy.signal import fftconvolve, resample_poly

RATE = 48_000
DECIM = 3  # matching runs at 16 kHz
RATE_LOW = RATE // DECIM


@dataclass
class SendTimeline:
    """Maps a publisher's sample positions (pts) to when their frame went to the WebRTC sender."""

    times: np.ndarray  # monotonic seconds, one per frame
    pts: np.ndarray  # first sample position of each frame

    @classmethod
    def from_log(cls, log: list[tuple[float, int]]) -> SendTimeline:
        arr = np.asarray(log, dtype=np.float64).reshape(-1, 2)
        return cls(times=arr[:, 0], pts=arr[:, 1].astype(np.int64))

    def __len__(self) -> int:
        return len(self.pts)

    def time_of(self, p: float) -> float:
        i = int(np.searchsorted(self.pts, p, side="right")) - 1
        i = min(max(i, 0), len(self.pts) - 1)
        return float(self.times[i] + (p - self.pts[i]) / RATE)

    def pts_at(self, t: float) -> float:
        i = int(np.searchsorted(self.times, t, side="right")) - 1
        i = min(max(i, 0), len(self.pts) - 1)
        return float(self.pts[i] + (t - self.times[i]) * RATE)


class MarkerTemplate:
    """A publisher's clean speech at 16 kHz, indexed by 48 kHz sent position (looping)."""

    def __init__(self, speech: np.ndarray) -> None:
        n = len(speech) - len(speech) % DECIM
        x = speech[:n].astype(np.float64)
        tiled = resample_poly(np.concatenate([x, x, x]), 1, DECIM)  # seamless across the loop point
        m = n // DECIM
        self.low = tiled[m:2 * m]
        self.period = n

    def segment(self, p0: int, length: int) -> np.ndarray:
        """``length`` samples at 16 kHz starting at 48 kHz position ``p0`` (a multiple of 3)."""
        idx = (p0 // DECIM + np.arange(length)) % len(self.low)
        return self.low[idx]


@dataclass
class ReceivedSegment:
    """A gap-free run of received frames: audio plus per-frame offsets and times."""

    audio: np.ndarray  # 48 kHz float32
    starts: np.ndarray  # offset of each frame in ``audio``
    deliver: np.ndarray  # when track.recv() returned the frame
    wire: np.ndarray  # when its RTP packet arrived (nan if unknown)

    def times_at(self, q: int) -> tuple[float, float]:
        f = int(np.searchsorted(self.starts, q, side="right")) - 1
        off = (q - self.starts[f]) / RATE
        wire = self.wire[f] if np.isfinite(self.wire[f]) else self.deliver[f]
        return float(wire + off), float(self.deliver[f] + off)


@dataclass
class LatencySample:
    """One matched window: when it arrived, its two latencies and how well it matched."""

    t: float
    wire_ms: float
    e2e_ms: float
    ncc: float


def best_match(window: np.ndarray, search: np.ndarray, exclude: int = 160) -> tuple[float, int, float]:
    """Where ``window`` fits best in ``search`` by normalized cross-correlation.

    Returns (best NCC, its position, best NCC farther than ``exclude`` samples
    from it): a repeating template (looped noise) gives two equal peaks.
    """
    if len(search) < len(window):
        return 0.0, 0, 0.0
    corr = fftconvolve(search, window[::-1], mode="valid")
    csum = np.concatenate([[0.0], np.cumsum(search * search)])
    energy = csum[len(window):] - csum[: len(search) - len(window) + 1]
    ww = float(np.dot(window, window))
    floor = 1e-3 * float(np.max(energy)) if len(energy) else 0.0
    ncc = corr / (np.sqrt(np.maximum(energy, floor) * ww) + 1e-12)
    k = int(np.argmax(ncc))
    rest = np.concatenate([ncc[: max(0, k - exclude)], ncc[k + exclude + 1:]])
    return float(ncc[k]), k, float(rest.max()) if len(rest) else -1.0


@dataclass
class MatchOptions:
    """Knobs of the window matching (all have working defaults)."""

    window_s: float = 0.5
    hop_s: float = 0.5
    max_latency_s: float = 1.5
    min_ncc: float = 0.5
    min_margin: float = 0.1  # best peak over the best elsewhere: rejects ambiguous (periodic) matches
    min_rms: float = 0.003
    probe_window_s: float = 0.3  # window before a stats message, paired with the last packet's server figure
    mean_window_s: float = 1.0  # window before a stats message, paired with the server's 1 s mean


def _match_window(seg: ReceivedSegment, low: np.ndarray, i: int, templates: list[MarkerTemplate],
                  send: SendTimeline, opt: MatchOptions) -> LatencySample | None:
    win = int(opt.window_s * RATE_LOW)
    window = low[i:i + win]
    if len(window) < win or float(np.sqrt(np.mean(window * window))) < opt.min_rms:
        return None
    t_wire, t_deliver = seg.times_at(i * DECIM)
    p_hi = send.pts_at(t_wire) + 0.02 * RATE
    p_lo = max(send.pts_at(t_wire - opt.max_latency_s), float(send.pts[0]))
    if p_hi - p_lo < DECIM:
        return None
    p0 = int(p_lo) - int(p_lo) % DECIM
    best: tuple[float, int] | None = None
    for template in templates:
        ncc, k, other = best_match(window, template.segment(p0, int((p_hi - p0) / DECIM) + win))
        if ncc >= opt.min_ncc and ncc - other >= opt.min_margin and (best is None or ncc > best[0]):
            best = (ncc, k)
    if best is None:
        return None
    t_sent = send.time_of(p0 + best[1] * DECIM)
    return LatencySample(t=t_wire, wire_ms=(t_wire - t_sent) * 1000.0, e2e_ms=(t_deliver - t_sent) * 1000.0,
                         ncc=best[0])


def _decimated(seg: ReceivedSegment) -> np.ndarray:
    return resample_poly(seg.audio.astype(np.float64), 1, DECIM)


def measure_segment(seg: ReceivedSegment, templates: list[MarkerTemplate], send: SendTimeline,
                    opt: MatchOptions | None = None) -> list[LatencySample]:
    """Latency samples for every window of ``seg`` whose content is found in what was sent."""
    opt = opt or MatchOptions()
    if len(send) == 0 or len(seg.audio) < int(opt.window_s * RATE) + RATE // 5:
        return []
    low = _decimated(seg)
    edge = RATE_LOW // 20  # skip the decimation filter's edge effects
    out = []
    for i in range(edge, len(low) - int(opt.window_s * RATE_LOW) - edge + 1, int(opt.hop_s * RATE_LOW)):
        sample = _match_window(seg, low, i, templates, send, opt)
        if sample is not None:
            out.append(sample)
    return out


def measure_at(seg: ReceivedSegment, templates: list[MarkerTemplate], send: SendTimeline,
               probes: list[tuple[float, float]], opt: MatchOptions | None = None,
               tries_s: tuple[float, ...] = (0.0, -0.1, -0.2, -0.3)) -> list[LatencySample | None]:
    """For each probe ``(t, window_s)``: the latency of the audio whose packets arrived in [t - window_s, t].

    A short window gives the latency of the last packets before ``t``; a long
    one their average over the window.  When that stretch holds no
    recognisable speech, the window slides up to 0.3 s earlier.  None where
    no window of this segment matches.
    """
    opt = opt or MatchOptions()
    out: list[LatencySample | None] = []
    if len(send) == 0 or len(seg.audio) < RATE // 2:
        return [None] * len(probes)
    low = _decimated(seg)
    wire = np.where(np.isfinite(seg.wire), seg.wire, seg.deliver)
    edge = RATE_LOW // 20
    for t, window_s in probes:
        sized = replace(opt, window_s=window_s)
        sample = None
        for dt in tries_s:
            f = int(np.searchsorted(wire, t - window_s + dt, side="right"))
            f = min(f, len(wire) - 1)
            i = int(seg.starts[f]) // DECIM
            if edge <= i <= len(low) - int(window_s * RATE_LOW) - edge:
                sample = _match_window(seg, low, i, templates, send, sized)
                if sample is not None:
                    break
        out.append(sample)
    return out
