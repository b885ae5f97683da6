"""Per received stream figures: packets, jitter, drops, gaps and marker latency over a time window.

Works on a ``Recording`` of ``loadtest.bot`` (decoded frames plus the RTP
packets tapped before aiortc's receive buffer).  Definitions:

- ``frames_expected``: 20 ms frames a listener should get in the window: the
  larger of the window's length over 20 ms and the span of the RTP
  timestamps that arrived; ``dropped`` = expected minus frames that arrived.
  This counts packets lost on the network, packets the server dropped for a
  slow subscriber (holes in the RTP timeline) *and* audio the server never
  produced because its media clock skipped ticks (the timeline stays
  continuous but runs slower than real time); ``drop_rate`` = dropped /
  expected.
- ``rtp_lost``: sequence-number holes only (network loss).
- ``jitter_ms``: RFC 3550 interarrival jitter (the running estimate
  J += (|D| - J)/16), averaged over the window; ``max_interarrival_ms``:
  the longest wait between two packets.
- ``gaps``: holes in the decoded timeline (missing audio a listener
  hears as a dropout), ``longest_gap_ms`` the longest of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.signal import lfilter

from loadtest.bot import Recording
from loadtest.marker import (
    LatencySample,
    MarkerTemplate,
    MatchOptions,
    ReceivedSegment,
    SendTimeline,
    measure_at,
    measure_segment,
)

RATE = 48_000
TS_MOD = 1 << 32


@dataclass
class StreamFigures:
    """What one subscriber measured of one publisher's stream in one window."""

    subscriber: str
    publisher: str
    room: str
    frames_expected: int = 0
    frames_received: int = 0
    dropped: int = 0
    drop_rate: float = 0.0
    rtp_lost: int = 0
    gaps: int = 0
    longest_gap_ms: float = 0.0
    jitter_ms: float = 0.0
    max_interarrival_ms: float = 0.0
    latency: list[LatencySample] = field(default_factory=list)
    server_pairs: list[tuple[float, float, float]] = field(default_factory=list)  # (t, server ms, marker ms)
    e2e_pairs: list[tuple[float, float, float]] = field(default_factory=list)  # (t, server e2e ms, marker ms)
    dnsmos: dict[str, float] | None = None
    sent_dnsmos: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        wire = np.array([s.wire_ms for s in self.latency])
        e2e = np.array([s.e2e_ms for s in self.latency])
        ncc = np.array([s.ncc for s in self.latency])

        def pct(x: np.ndarray, q: float) -> float | None:
            return round(float(np.percentile(x, q)), 2) if len(x) else None

        return {
            "subscriber": self.subscriber, "publisher": self.publisher, "room": self.room,
            "frames_expected": self.frames_expected, "frames_received": self.frames_received,
            "dropped": self.dropped, "drop_rate": round(self.drop_rate, 5), "rtp_lost": self.rtp_lost,
            "gaps": self.gaps, "longest_gap_ms": round(self.longest_gap_ms, 1),
            "jitter_ms": round(self.jitter_ms, 3), "max_interarrival_ms": round(self.max_interarrival_ms, 1),
            "latency_windows": len(self.latency),
            "latency_ms": {"p50": pct(wire, 50), "p99": pct(wire, 99), "max": pct(wire, 100)},
            "e2e_latency_ms": {"p50": pct(e2e, 50), "p99": pct(e2e, 99), "max": pct(e2e, 100)},
            "marker_ncc_median": pct(ncc, 50),
            "server_pairs": [[round(t, 3), round(a, 2), round(b, 2)] for t, a, b in self.server_pairs],
            "e2e_pairs": [[round(t, 3), round(a, 2), round(b, 2)] for t, a, b in self.e2e_pairs],
            "latency_samples": [[round(s.t, 3), round(s.wire_ms, 2), round(s.e2e_ms, 2)] for s in self.latency],
            "dnsmos": self.dnsmos, "sent_dnsmos": self.sent_dnsmos,
        }


def owner_since(rec: Recording, publisher: str, settle_s: float = 0.5) -> float | None:
    """From when ``rec`` has carried ``publisher`` without interruption (None if it does not now)."""
    if not rec.owners or rec.owners[-1][1] != publisher:
        return None
    return rec.owners[-1][0] + (settle_s if len(rec.owners) > 1 else 0.0)


def _wire_times(rec: Recording) -> dict[int, float]:
    """Frame pts -> arrival time of the RTP packet that carried it."""
    origin = rec.rtp_origin()
    if origin is None:
        return {}
    out: dict[int, float] = {}
    for ts, t in zip(rec.rtp_ts, rec.rtp_arrivals):
        out.setdefault((ts - origin) % TS_MOD, t)
    return out


def received_segments(rec: Recording, since: float, until: float) -> list[ReceivedSegment]:
    """Gap-free runs of decoded frames delivered in [since, until)."""
    rec.decode_pending(since)
    if not rec.blocks:
        return []
    wire = _wire_times(rec)
    segs: list[ReceivedSegment] = []
    blocks: list[np.ndarray] = []
    starts: list[int] = []
    deliver: list[float] = []
    wires: list[float] = []
    offset = 0
    next_pts: int | None = None

    def close() -> None:
        if blocks:
            segs.append(ReceivedSegment(np.concatenate(blocks), np.asarray(starts), np.asarray(deliver),
                                        np.asarray(wires, dtype=np.float64)))

    for block, t, pts in zip(rec.blocks, rec.arrivals, rec.pts):
        if t < since or t >= until:
            continue
        if next_pts is not None and pts != next_pts:
            close()
            blocks, starts, deliver, wires, offset = [], [], [], [], 0
        blocks.append(block)
        starts.append(offset)
        deliver.append(t)
        wires.append(wire.get(pts, float("nan")))
        offset += len(block)
        next_pts = pts + len(block)
    close()
    return segs


def _timeline_figures(fig: StreamFigures, rec: Recording, since: float, until: float) -> None:
    arrivals = np.array(rec.rtp_arrivals, dtype=np.float64)
    inside = (arrivals >= since) & (arrivals < until)
    n = int(np.count_nonzero(inside))
    if n < 2:  # nothing arrived: every frame of the window is missing
        fig.frames_expected = fig.dropped = max(0, int((until - since) * RATE / 960) - 2)
        fig.frames_received = n
        fig.drop_rate = 1.0 if fig.frames_expected else 0.0
        return
    t = arrivals[inside]
    seq = np.unwrap(np.array(rec.rtp_seq, dtype=np.float64)[inside], period=1 << 16)
    ts = np.unwrap(np.array(rec.rtp_ts, dtype=np.float64)[inside], period=float(TS_MOD))
    uts = np.unique(ts)
    steps = np.diff(uts)
    frame = float(np.median(steps)) if len(steps) else 960.0
    frame = frame if frame > 0 else 960.0
    by_time = int((until - since) * RATE / frame) - 2  # two frames of slack at the window's edges
    fig.frames_expected = max(round((uts[-1] - uts[0]) / frame) + 1, by_time)
    fig.frames_received = len(uts)
    fig.dropped = max(0, fig.frames_expected - fig.frames_received)
    fig.drop_rate = fig.dropped / max(1, fig.frames_expected)
    fig.rtp_lost = max(0, int(seq.max() - seq.min() + 1) - len(np.unique(seq)))
    holes = steps[steps > 1.5 * frame] - frame
    fig.gaps = len(holes)
    fig.longest_gap_ms = float(holes.max() / RATE * 1000.0) if len(holes) else 0.0
    order = np.argsort(t, kind="stable")
    t, ts = t[order], ts[order]
    d = np.diff(t) - np.diff(ts) / RATE
    # RFC 3550: J += (|D| - J) / 16 after every packet, from J = 0
    trace = lfilter([1.0 / 16.0], [1.0, -15.0 / 16.0], np.abs(d))
    fig.jitter_ms = float(np.mean(trace) * 1000.0)
    fig.max_interarrival_ms = float(np.max(np.diff(t)) * 1000.0)


def measure_stream(rec: Recording, subscriber: str, publisher: str, room: str, since: float, until: float,
                   templates: list[MarkerTemplate], send: SendTimeline | None,
                   options: MatchOptions | None = None,
                   probes: list[dict[str, float]] | None = None) -> StreamFigures:
    """All figures of one received stream over [since, until).

    ``probes``: the publisher's figures from the ``stats`` messages this
    subscriber got (``t``, ``server_latency_ms``, ``e2e_latency_ms``).  Each
    ``server_latency_ms`` (the last packet's) is paired with the marker
    latency of the packets that arrived just before ``t`` (``server_pairs``),
    each ``e2e_latency_ms`` (a mean over the last second) with the marker
    latency of the last second (``e2e_pairs``).
    """
    fig = StreamFigures(subscriber=subscriber, publisher=publisher, room=room)
    start = owner_since(rec, publisher)
    if start is None:
        return fig
    since = max(since, start)
    _timeline_figures(fig, rec, since, until)
    if not templates or send is None or not len(send):
        return fig
    for seg in received_segments(rec, since, until):
        fig.latency += measure_segment(seg, templates, send, options)
        if probes and len(seg.deliver):
            opt = options or MatchOptions()
            inside = [p for p in probes if seg.deliver[0] + opt.mean_window_s + 0.3 <= p["t"] <= seg.deliver[-1]]
            last = [p for p in inside if p.get("server_latency_ms")]
            found = measure_at(seg, templates, send, [(p["t"], opt.probe_window_s) for p in last], opt)
            fig.server_pairs += [(p["t"], p["server_latency_ms"], m.wire_ms) for p, m in zip(last, found) if m]
            mean = [p for p in inside if p.get("e2e_latency_ms")]
            found = measure_at(seg, templates, send, [(p["t"], opt.mean_window_s) for p in mean], opt)
            fig.e2e_pairs += [(p["t"], p["e2e_latency_ms"], m.wire_ms) for p, m in zip(mean, found) if m]
    return fig


def window_audio(rec: Recording, since: float, until: float) -> np.ndarray:
    """Decoded audio delivered in [since, until), holes left out."""
    rec.decode_pending(since)
    parts = [b for b, t in zip(rec.blocks, rec.arrivals) if since <= t < until]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
