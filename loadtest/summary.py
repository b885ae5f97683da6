"""Headline figures of one measurement window, from the per-stream figures the bots produced.

Latency comparison with the server (``marker_vs_server``), paired in time
with every ``stats`` message a subscriber got:

- the bots' wire latency runs from the publisher's RTP packet reaching its
  transport to the subscriber's RTP packet arriving, for the same audio
  (found by the marker, ``loadtest/marker.py``);
- the server's ``e2e_latency_ms`` runs from the RTP arrival of a microphone
  packet to the RTP send of the packet carrying the same audio, averaged
  over the last second: the same span but for the two loopback hops, so it
  is the reference (``server_latency_ms``, arrival to encoded packet of the
  last packet, leaves out the subscriber queue and the sender and is only
  used when the server does not report ``e2e_latency_ms``).

The audio itself is delayed by more than its packets: each Opus encoder on
the path (the publisher's, the server's) has a 6.5 ms look-ahead, measured
at run time (``codec_delay_ms``) and removed from the difference; where the
server's 10 ms chunk grid cuts the publisher's 20 ms frames shifts the
server's per-packet figure by 0 or -10 ms; the loopback hops and the
schedulers add a few ms.  So the difference must be within about +-10 ms, and
a stage with algorithmic delay (a denoiser's look-ahead: RNNoise 20 ms)
shows up on top of it, since it delays the audio but not the packets.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def percentiles(values: list[float], qs: tuple[int, ...] = (50, 90, 99)) -> dict[str, float | None]:
    if not values:
        return {**{f"p{q}": None for q in qs}, "max": None, "n": 0}
    arr = np.asarray(values, dtype=np.float64)
    out: dict[str, float | None] = {f"p{q}": round(float(np.percentile(arr, q)), 2) for q in qs}
    out["max"] = round(float(arr.max()), 2)
    out["n"] = len(values)
    return out


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 3) if values else None


def server_figures(server_stats: dict[str, list[dict[str, Any]]], key: str) -> dict[str, list[float]]:
    """Samples of one stats field (``server_latency_ms``...) per publishing participant."""
    out: dict[str, list[float]] = {}
    for samples in server_stats.values():
        for s in samples:
            v = s.get(key)
            if s.get("participant") and isinstance(v, (int, float)) and v > 0:
                out.setdefault(str(s["participant"]), []).append(float(v))
    return out


def _pair_table(streams: list[dict[str, Any]], key: str, codec_delay_ms: float) -> dict[str, Any]:
    rows = []
    for s in streams:
        pairs = s.get(key) or []
        if not pairs:
            continue
        srv = np.array([p[1] for p in pairs])
        mark = np.array([p[2] for p in pairs])
        rows.append({"publisher": s["publisher"], "subscriber": s["subscriber"], "pairs": len(pairs),
                     "marker_ms": round(float(np.median(mark)), 2), "server_ms": round(float(np.median(srv)), 2),
                     "difference_ms": round(float(np.median(mark - srv)) - codec_delay_ms, 2)})
    diffs = [r["difference_ms"] for r in rows]
    return {"streams": rows,
            "median_difference_ms": round(float(np.median(diffs)), 2) if diffs else None,
            "max_abs_difference_ms": round(max(abs(d) for d in diffs), 2) if diffs else None}


def compare_with_server(streams: list[dict[str, Any]], codec_delay_ms: float) -> dict[str, Any]:
    """Marker latency minus the server's own figure, paired in time, less the codecs' look-ahead.

    ``e2e``: against ``e2e_latency_ms`` (server RTP arrival to RTP send, mean
    of the last second): the same span as the marker's wire latency but for
    the loopback hops.  ``last_packet``: against ``server_latency_ms`` (RTP
    arrival to encoded packet, of the last packet), which leaves out the
    subscriber queue and the sender.  ``reference`` names the one that counts.
    """
    e2e = _pair_table(streams, "e2e_pairs", codec_delay_ms)
    last = _pair_table(streams, "server_pairs", codec_delay_ms)
    reference = "e2e" if e2e["streams"] else "last_packet"
    chosen = e2e if e2e["streams"] else last
    return {"reference": reference, "codec_delay_ms": round(codec_delay_ms, 2),
            "difference_ms": chosen["median_difference_ms"], "max_abs_difference_ms": chosen["max_abs_difference_ms"],
            "e2e": e2e, "last_packet": last}


def _gain(group: list[dict[str, Any]], sent: dict[str, Any], key: str) -> float | None:
    """Mean DNSMOS change from what the publisher sent to what was received (content-independent)."""
    deltas = [s["dnsmos"][key] - sent[s["publisher"]][key] for s in group
              if s.get("dnsmos") and sent.get(s["publisher"])]
    return _mean(deltas)


def by_stages(streams: list[dict[str, Any]], bots: list[dict[str, Any]], sent: dict[str, Any],
              codec_delay_ms: float) -> dict[str, Any]:
    """The main figures per stage set the publishers asked for (A/B runs: ``--stages 'none;denoise'``).

    ``dnsmos_gain``: received minus sent DNSMOS of the same publisher and
    span, which compares stage sets fairly even when their publishers say
    different things over different noises.
    """
    asked = {b["id"]: ("room default" if b.get("stages") is None else (b["stages"] or "none")) for b in bots}
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in streams:
        groups.setdefault(asked.get(s["publisher"], "?"), []).append(s)
    out = {}
    for label, group in sorted(groups.items()):
        scored = [s["dnsmos"] for s in group if s.get("dnsmos")]
        out[label] = {"streams": len(group),
                      "latency_ms": percentiles([x[1] for s in group for x in s["latency_samples"]], (50, 99)),
                      "dnsmos": {k: _mean([d[k] for d in scored]) for k in ("sig", "bak", "ovrl")} | {"n": len(scored)},
                      "dnsmos_gain": {k: _gain(group, sent, k) for k in ("sig", "bak", "ovrl")},
                      "drop_rate": round(sum(s["dropped"] for s in group) / max(1, sum(s["frames_expected"]
                                                                                      for s in group)), 5),
                      "marker_vs_server": compare_with_server(group, codec_delay_ms)["difference_ms"]}
    return out


def summarize(streams: list[dict[str, Any]], sent_dnsmos: dict[str, Any],
              server_stats: dict[str, list[dict[str, Any]]], bots: list[dict[str, Any]],
              codec_delay_ms: float = 13.0) -> dict[str, Any]:
    wire = [x[1] for s in streams for x in s["latency_samples"]]
    e2e = [x[2] for s in streams for x in s["latency_samples"]]
    expected = sum(s["frames_expected"] for s in streams)
    dropped = sum(s["dropped"] for s in streams)
    scored = [s["dnsmos"] for s in streams if s.get("dnsmos")]
    sent = [v for v in sent_dnsmos.values() if v]
    server = server_figures(server_stats, "server_latency_ms")
    server_e2e = server_figures(server_stats, "e2e_latency_ms")
    answered = [b["milestones_ms"]["answered"] for b in bots if "answered" in b["milestones_ms"]]
    connected = [b["milestones_ms"]["connected"] for b in bots if "connected" in b["milestones_ms"]]
    return {
        "bots": len(bots),
        "bots_failed": sum(1 for b in bots if b["id"] is None or b["errors"]),
        "streams": len(streams),
        "streams_silent": sum(1 for s in streams if s["frames_received"] == 0),
        "streams_measured": sum(1 for s in streams if s["latency_windows"] > 0),
        "join_ms": percentiles(answered, (50, 95)),
        "connected_ms": percentiles(connected, (50, 95)),
        "latency_ms": percentiles(wire),
        "e2e_latency_ms": percentiles(e2e),
        "jitter_ms": {"mean": _mean([s["jitter_ms"] for s in streams]),
                      "max": max((s["jitter_ms"] for s in streams), default=None)},
        "max_interarrival_ms": max((s["max_interarrival_ms"] for s in streams), default=None),
        "frames_expected": expected,
        "frames_dropped": dropped,
        "drop_rate": round(dropped / expected, 5) if expected else None,
        "rtp_lost": sum(s["rtp_lost"] for s in streams),
        "gaps": sum(s["gaps"] for s in streams),
        "longest_gap_ms": max((s["longest_gap_ms"] for s in streams), default=0.0),
        "dnsmos": {k: _mean([d[k] for d in scored]) for k in ("sig", "bak", "ovrl")} | {
            "ovrl_min": min((d["ovrl"] for d in scored), default=None), "n": len(scored)},
        "sent_dnsmos": {k: _mean([d[k] for d in sent]) for k in ("sig", "bak", "ovrl")} | {"n": len(sent)},
        "server_latency_ms": percentiles([v for vs in server.values() for v in vs]),
        "server_e2e_latency_ms": percentiles([v for vs in server_e2e.values() for v in vs]),
        "marker_vs_server": compare_with_server(streams, codec_delay_ms),
        "by_stages": by_stages(streams, bots, sent_dnsmos, codec_delay_ms),
    }
