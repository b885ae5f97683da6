"""Write a load-test report: ``report.json`` (everything) and ``report.html`` (headline table and plots).

Plots are matplotlib (Agg) PNGs embedded as base64, so the HTML page is one
self-contained file: latency distribution and latency over time (marker and
server figures), DNSMOS per stream (received against sent), the server's
``/metrics`` over time and, for a ramp, each step's figures against the SLO.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SERVER_SERIES = ("participants", "rooms", "clock_lag", "event_loop_lag_seconds_sum", "executor_streams", "bypass",
                 "dropped", "lost", "concealed", "late", "batch", "latency_e2e_seconds_sum", "chunks")


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _latency_plots(window: dict[str, Any]) -> list[tuple[str, str]]:
    streams = window.get("streams", [])
    wire = [x[1] for s in streams for x in s["latency_samples"]]
    if not wire:
        return []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    ax1.hist(wire, bins=40, alpha=0.7, label="marker: publisher send -> subscriber RTP arrival")
    e2e = [p[1] for s in streams for p in s.get("e2e_pairs", [])]
    if e2e:
        ax1.hist(e2e, bins=20, alpha=0.6, label="server e2e_latency_ms (arrival -> send)")
    ax1.set_xlabel("latency, ms")
    ax1.set_ylabel("windows")
    ax1.legend(fontsize=7)
    ax1.set_title("Latency distribution")
    by_pub: dict[str, list[list[float]]] = {}
    for s in streams:
        by_pub.setdefault(s["publisher"], []).extend(s["latency_samples"])
    for i, (pub, samples) in enumerate(sorted(by_pub.items())[:12]):
        samples.sort()
        color = f"C{i % 10}"
        ax2.plot([x[0] for x in samples], [x[1] for x in samples], ".", color=color, ms=3, label=pub)
    for s in streams:
        pairs = s.get("e2e_pairs") or s.get("server_pairs") or []
        if pairs:
            ax2.plot([p[0] for p in pairs], [p[1] for p in pairs], "x", color="k", ms=4)
    ax2.set_xlabel("time, s (x: server's own figure)")
    ax2.set_ylabel("latency, ms")
    ax2.set_title("Latency over time, per publisher")
    ax2.legend(fontsize=6, ncol=2)
    return [("Latency", _png(fig))]


def _dnsmos_plot(window: dict[str, Any]) -> list[tuple[str, str]]:
    scored = [s for s in window.get("streams", []) if s.get("dnsmos")]
    if not scored:
        return []
    sent = window.get("sent_dnsmos", {})
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(scored) + 3), 3.5))
    xs = range(len(scored))
    ax.bar([x - 0.2 for x in xs], [s["dnsmos"]["ovrl"] for s in scored], 0.4, label="received OVRL")
    ax.bar([x + 0.2 for x in xs], [(sent.get(s["publisher"]) or {}).get("ovrl", 0.0) for s in scored], 0.4,
           label="sent OVRL")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{s['publisher'][-4:]}>{s['subscriber'][-4:]}" for s in scored], rotation=45, fontsize=7)
    ax.set_ylim(1, 5)
    ax.set_ylabel("DNSMOS P.835")
    ax.legend(fontsize=7)
    ax.set_title("DNSMOS of received audio against what was sent")
    return [("Quality", _png(fig))]


def _server_plot(server: dict[str, Any]) -> list[tuple[str, str]]:
    series = server.get("metrics_series", [])
    if len(series) < 2:
        return []
    matching = sorted({n for s in series for n in s["metrics"] if any(f in n for f in SERVER_SERIES)})
    varying = [n for n in matching if len({s["metrics"].get(n) for s in series}) > 1]
    names = (varying + [n for n in matching if n not in varying])[:9]
    if not names:
        return []
    cols = 3
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(12, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        pts = [(s["t"], s["metrics"][name]) for s in series if name in s["metrics"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(name.replace("mediaserver_", ""), fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("Server /metrics (sum over label sets) against time, s")
    return [("Server", _png(fig))]


def _ramp_plot(report: dict[str, Any]) -> list[tuple[str, str]]:
    steps = report.get("steps", [])
    if not steps:
        return []
    slo = report.get("slo", {})
    x = [s["participants"] for s in steps]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    figures = [("p99 latency, ms", [s["summary"]["latency_ms"]["p99"] for s in steps], slo.get("p99_latency_ms")),
               ("drop rate", [s["summary"]["drop_rate"] for s in steps], slo.get("drop_rate")),
               ("DNSMOS OVRL", [s["summary"]["dnsmos"]["ovrl"] for s in steps], slo.get("dnsmos_ovrl"))]
    for ax, (title, ys, limit) in zip(axes, figures):
        ax.plot(x, [y if y is not None else float("nan") for y in ys], "o-")
        if limit is not None:
            ax.axhline(limit, color="r", ls="--", lw=1)
        for xi, s in zip(x, steps):
            if not s["held"]:
                ax.axvline(xi, color="r", alpha=0.2)
        ax.set_xlabel("participants")
        ax.set_title(title)
    return [("Ramp", _png(fig))]


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c)))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _headline_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, value in summary.items():
        if isinstance(value, dict) and key != "marker_vs_server":
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif key == "marker_vs_server":
            value = (f"{value['reference']}: median {value['difference_ms']} ms, max |d| "
                     f"{value['max_abs_difference_ms']} ms (codec look-ahead {value['codec_delay_ms']} ms removed)")
        rows.append({"figure": key, "value": value})
    return rows


STREAM_COLUMNS = ["subscriber", "publisher", "room", "frames_expected", "dropped", "drop_rate", "gaps",
                  "longest_gap_ms", "jitter_ms", "max_interarrival_ms", "latency_windows", "latency_ms",
                  "e2e_latency_ms", "marker_ncc_median", "dnsmos"]


def render_html(report: dict[str, Any]) -> str:
    window = report.get("window") or (report["steps"][-1]["window"] if report.get("steps") else {})
    summary = report.get("summary") or window.get("summary", {})
    images = (_ramp_plot(report) + _latency_plots(window) + _dnsmos_plot(window)
              + _server_plot(report.get("server", {})))
    parts = [f"<h1>Load test: {html.escape(report.get('kind', ''))}</h1>",
             f"<pre>{html.escape(json.dumps(report.get('scenario', {}), indent=1, default=str))}</pre>"]
    if report.get("steps"):
        parts.append("<h2>Ramp</h2>" + _table(
            [{"participants": s["participants"], "held": s["held"], "breaches": "; ".join(s["breaches"]),
              "p99 latency ms": s["summary"]["latency_ms"]["p99"], "drop rate": s["summary"]["drop_rate"],
              "DNSMOS": s["summary"]["dnsmos"]["ovrl"]} for s in report["steps"]],
            ["participants", "held", "breaches", "p99 latency ms", "drop rate", "DNSMOS"]))
        parts.append(f"<p><b>Largest load that held: {report.get('max_participants_held')}</b></p>")
    parts.append("<h2>Headline figures</h2>" + _table(_headline_rows(summary), ["figure", "value"]))
    parts += [f"<h2>{html.escape(title)}</h2><img src='data:image/png;base64,{data}'/>" for title, data in images]
    parts.append("<h2>Streams</h2>" + _table(window.get("streams", []), STREAM_COLUMNS))
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>" \
           + "\n".join(parts) + "</body></html>"


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """``report.json`` and ``report.html`` in ``out_dir`` (created)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=1, default=str))
    html_path = out_dir / "report.html"
    html_path.write_text(render_html(report))
    return json_path, html_path
