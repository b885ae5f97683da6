"""Capacity: the largest number of streams that meets the SLO, per configuration, against a plain aiortc baseline.

For each configuration a fresh server is started, pinned to ``--server-cpus``
(default core 0), and real WebRTC bots (``loadtest``: pre-encoded speech
mixed with real noise from ../shared/eval, on the fast media path of
``loadtest/wire.py``, which lets one core of bots carry several times what
one core of server does) run pinned to ``--bot-cpus`` (default core 1).
Bots join in rooms of ``--room-size``, ``--step`` at a time; after each
step's warm-up a ``--hold`` window is measured with every bot still
running. A step holds when, in its window:

- frames lost at subscribers + chunks concealed by the server < 1 % of frames;
- chunks the executor bypassed (deadline or error) < 1 % of chunks;
- publisher-to-subscriber latency (the bots' marker) p95 <= 150 ms;
- every bot joined and heard every other bot of its room.

The configurations: ``plain`` (bench/plain_forwarder.py: aiortc's own
receive/decode, one aiortc Opus encode per stream, packets fanned out: the
baseline of the same run), ``none`` (the server, no stages), ``default``
(the server's default stages), ``denoise``, ``full`` (aec,dereverb,denoise);
not by default, ``wire`` (bench/wire_forwarder.py: packets forwarded at the
socket, no codec: it measures how many streams the bots' own cores carry).
Server CPU is read from /proc over the server's whole process tree (the
executor worker included). Every step also reports the bots' own CPU and
event-loop lag (``loadgen``); ``loadgen_limited`` marks a step whose bots
were too busy to trust its figures (loop lag p99 over 20 ms, or more than
80 % of their cores). After the ramp of each configuration, one room
of ``--big-room`` participants is measured once.  The step that broke after
capacity is also judged as an overload (``overload``): do the streams that run
stages keep the SLO while admission control gives the newcomers lighter
stages or none?

Prints JSON (and writes capacity.json, capacity.png to ``--out``):

    .venv/bin/python bench/capacity.py [--configs plain,none,default,denoise,full] [--max 80] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load import BIN, ROOT, free_port, stop_server, wait_healthy  # noqa: E402
from loadtest.session import LoadSession, SessionConfig  # noqa: E402
from loadtest.sources import SourceConfig, default_dir  # noqa: E402

CONFIGS = {"plain": None, "none": "", "default": None, "denoise": "denoise", "full": "aec,dereverb,denoise",
           "nsnet2": "denoise:nsnet2", "rnnoise": "denoise:rnnoise", "gtcrn": "denoise:gtcrn", "wire": None,
           "light": "aec:webrtc,dereverb,denoise:gtcrn"}  # the full chain's light models
FORWARDERS = {"plain": "plain_forwarder.py", "wire": "wire_forwarder.py"}
SLO = {"lost_or_concealed": 0.01, "bypassed": 0.01, "p95_ms": 150.0}
LOADGEN_LAG_MS = 20.0  # bots' event-loop lag p99 above which a step measured the bots more than the server
LOADGEN_BUSY = 0.8  # share of the bots' cores above which likewise


def expected_stages(config: str) -> list[str] | None:
    """The stage list every stream of ``config`` asks for (None: not known here, or not the server)."""
    stages = CONFIGS.get(config)
    if config in FORWARDERS or stages is None:
        return None
    return [s for s in stages.split(",") if s]


# -- the server under test --------------------------------------------------------------------------------
def _ticks() -> float:
    return float(os.sysconf("SC_CLK_TCK"))


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and every live descendant, from /proc."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / _ticks()
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo += [p for p, pp in parents.items() if pp == pid]
    return total


@contextmanager
def server(config: str, cpus: str, log: Path, workers: int = 1) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if config in FORWARDERS:
        cmd = [str(BIN / "python"), str(ROOT / "bench" / FORWARDERS[config]), "--port", str(port)]
    else:
        cmd = [str(BIN / "mediaserver"), "serve", "--host", "127.0.0.1", "--port", str(port), "--dev",
               "--log-level", "WARNING", "--workers", str(workers)]
        if CONFIGS[config] is not None:
            cmd += ["--stages", str(CONFIGS[config])]
    with open(log, "ab") as out:
        proc = subprocess.Popen(["taskset", "-c", cpus, *cmd], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_healthy(url, proc)
        yield url, proc
    finally:
        stop_server(proc)


# -- one measured window --------------------------------------------------------------------------------
def _delta(samples: list[dict[str, Any]], key: str) -> float:
    values = [s[key] for s in samples if isinstance(s.get(key), (int, float))]
    return float(values[-1] - values[0]) if len(values) >= 2 else 0.0


def judge(window: dict[str, Any], joins_failed: int, cpu_s: float, wall_s: float, bot_cores: int = 1,
          expected: list[str] | None = None) -> dict[str, Any]:
    """The SLO figures of one window, and which objectives it breaches; ``expected``: the stage list every
    stream asked for (a stream the server's admission control gave a lighter list, or none, counts as
    degraded: the configuration's capacity is where nobody is)."""
    s = window["summary"]
    latencies = [x[1] for st in window["streams"] for x in st["latency_samples"]]
    p50, p95, p99 = (round(float(np.percentile(latencies, q)), 1) if latencies else None for q in (50, 95, 99))
    chunks = bypassed = concealed = enhanced_chunks = enhanced_bypassed = 0.0
    for samples in window["server_stats"].values():
        by_stream: dict[str, list[dict[str, Any]]] = {}
        for x in samples:
            by_stream.setdefault(str(x.get("stream")), []).append(x)
        for rows in by_stream.values():  # each publisher's stream appears once per reporter
            chunks += _delta(rows, "chunks")
            bypassed += _delta(rows, "bypassed")
            concealed += _delta(rows, "concealed_chunks")
            if rows[-1].get("stages"):  # a stream running stages (admitted, or degraded to a lighter list)
                enhanced_chunks += _delta(rows, "chunks")
                enhanced_bypassed += _delta(rows, "bypassed")
    running: dict[str, Any] = {}
    for samples in window["server_stats"].values():
        for x in samples:
            running[str(x.get("stream"))] = x.get("stages")
    degraded = {} if expected is None else {
        k: v for k, v in running.items() if isinstance(v, list) and list(v) != list(expected)}
    lost = s["drop_rate"] or 0.0
    concealed_rate = concealed / chunks if chunks else 0.0
    fig = {"lost_rate": lost, "concealed_rate": round(concealed_rate, 5),
           "lost_or_concealed": round(lost + concealed_rate, 5),
           "bypassed_rate": round(bypassed / chunks, 5) if chunks else 0.0,
           "bypassed_rate_enhanced": round(enhanced_bypassed / enhanced_chunks, 5) if enhanced_chunks else 0.0,
           "latency_ms": {"p50": p50, "p95": p95, "p99": p99},
           "longest_gap_ms": s["longest_gap_ms"], "server_cpu_cores": round(cpu_s / wall_s, 3),
           "loadgen_loop_lag_ms": s["loadgen_loop_lag_ms"], "loadgen_cpu": s.get("loadgen_cpu"),
           "degraded_streams": len(degraded),
           "degraded_to": sorted({",".join(v) or "none" for v in degraded.values()})}
    breaches = []
    if fig["lost_or_concealed"] >= SLO["lost_or_concealed"]:
        breaches.append(f"lost+concealed {fig['lost_or_concealed']:.2%}")
    if fig["bypassed_rate"] >= SLO["bypassed"]:
        breaches.append(f"bypassed {fig['bypassed_rate']:.2%}")
    if p95 is None or p95 > SLO["p95_ms"]:
        breaches.append(f"p95 {p95} ms")
    if joins_failed:
        breaches.append(f"{joins_failed} joins failed")
    if degraded:
        breaches.append(f"{len(degraded)} streams degraded by admission control (to {', '.join(fig['degraded_to'])})")
    if s["streams_silent"] or s.get("streams_missing"):
        breaches.append(f"{s['streams_silent']} silent, {s.get('streams_missing')} missing subscriptions")
    lag_p99 = (s.get("loadgen_loop_lag_ms") or {}).get("p99")
    loadgen_cores = (s.get("loadgen_cpu") or {}).get("cores")
    fig["loadgen_limited"] = bool((lag_p99 is not None and lag_p99 > LOADGEN_LAG_MS)
                                  or (loadgen_cores is not None and loadgen_cores > LOADGEN_BUSY * bot_cores))
    return {**fig, "breaches": breaches, "held": not breaches}


async def measure_step(session: LoadSession, proc: subprocess.Popen[bytes], rooms: list[str],
                       warmup_s: float, hold_s: float, bot_cores: int = 1,
                       expected: list[str] | None = None) -> dict[str, Any]:
    joins = await session.add_bots(rooms)
    failed = sum(1 for j in joins if not j["ok"])
    refused = sum(1 for j in joins if not j["ok"] and "server-busy" in str(j.get("error")))
    await session.hold(warmup_s, f"{len(session.specs)} streams, warm-up")
    cpu0, t0 = tree_cpu_s(proc.pid), time.monotonic()
    window = await session.measure(hold_s, f"{len(session.specs)} streams")
    cpu1, t1 = tree_cpu_s(proc.pid), time.monotonic()
    out = judge(window, failed, cpu1 - cpu0, t1 - t0, bot_cores, expected)
    await session.trim(window["until_s"])
    return {"streams": len(session.specs), "joined": sum(1 for j in session.joins if j["ok"]),
            "joins_refused": refused, **out}


def session_config(url: str, args: argparse.Namespace, prefix: str, room_size: int) -> SessionConfig:
    noise = str(default_dir("noise")) if default_dir("noise") else None
    sources = SourceConfig(noise_dir=noise, snr_db=10.0 if noise else None)
    # each bot decodes about --decode-per-bot of the streams it receives (marker latency); loss, gaps and
    # jitter of all of them come from their RTP headers, so a big room does not saturate the load generator
    share = min(1.0, args.decode_per_bot / max(1, room_size - 1)) if args.decode_per_bot else 1.0
    return SessionConfig(url=url, sources=sources, processes=args.bot_processes, dnsmos_per_publisher=0,
                         score_sent=False, warmup_s=args.warmup, progress=not args.quiet, room_prefix=prefix,
                         decode_share=share, fast=not args.no_fast_path, scrape_interval_s=args.scrape_interval)


async def ramp(config: str, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    bot_cores = len(_cpu_list(args.bot_cpus))
    steps: list[dict[str, Any]] = []
    held = 0
    with server(config, args.server_cpus, log, args.workers) as (url, proc):
        session = LoadSession(session_config(url, args, f"cap{config}", args.room_size))
        await session.start()
        try:
            await session.prepare(args.max)  # a no-op once cached: every bot's Opus packets, before any joins
            count = args.start
            while count <= args.max:
                rooms = [session.room_name(i // args.room_size) for i in range(len(session.specs), count)]
                step = await measure_step(session, proc, rooms, args.warmup, args.hold, bot_cores,
                                          expected_stages(config))
                steps.append(step)
                loadgen = step.get("loadgen_cpu") or {}
                print(f"[capacity] {config}: {step['streams']} streams -> "
                      f"{'held' if step['held'] else 'BROKE: ' + '; '.join(step['breaches'])} "
                      f"(cpu {step['server_cpu_cores']}, p95 {step['latency_ms']['p95']} ms; bots "
                      f"{loadgen.get('cores')} cores, lag p99 {(step['loadgen_loop_lag_ms'] or {}).get('p99')} ms"
                      f"{', LOADGEN-LIMITED' if step['loadgen_limited'] else ''})",
                      file=sys.stderr, flush=True)
                if not step["held"]:
                    break
                held = step["streams"]
                count += args.step
        finally:
            await session.close()
    big: dict[str, Any] | None = None
    if args.big_room:
        with server(config, args.server_cpus, log, args.workers) as (url, proc):
            session = LoadSession(session_config(url, args, f"big{config}", args.big_room))
            await session.start()
            try:
                await session.prepare(args.big_room)
                big = await measure_step(session, proc, [session.room_name(0)] * args.big_room,
                                         args.warmup, args.hold, bot_cores, expected_stages(config))
            finally:
                await session.close()
    overload = beyond_capacity(steps, held) if config != "plain" else None  # the baseline has no admission
    if overload is not None:
        print(f"[capacity] {config}: beyond capacity ({overload['streams']} streams) the admitted streams "
              f"{'keep' if overload['admitted_keep_slo'] else 'do NOT keep'} the SLO; "
              f"{overload['degraded_streams']} degraded (to {', '.join(overload['degraded_to']) or '-'}), "
              f"{overload['joins_refused']} joins refused (server-busy)",
              file=sys.stderr, flush=True)
    cores = len(_cpu_list(args.server_cpus))
    at_capacity = next((s for s in steps if s["streams"] == held), None)
    limited = [s["streams"] for s in steps if s.get("loadgen_limited")]
    return {"config": config, "stages": CONFIGS[config] if config != "default" else "server default",
            "loadgen_limited_steps": limited,
            "max_streams": held, "streams_per_core": round(held / cores, 1),
            "cpu_ms_per_stream_per_s": round(1000 * at_capacity["server_cpu_cores"] / held, 2)
            if at_capacity and held else None,
            "overload": overload, "steps": steps, "big_room": big}


def beyond_capacity(steps: list[dict[str, Any]], held: int) -> dict[str, Any] | None:
    """The step that broke after capacity, judged as an overload: do the streams running stages keep the SLO
    (nothing lost, < 1 % of their chunks bypassed, p95 in bound) while the newcomers get lighter stages or
    none?  None when no step held or none broke."""
    broke = next((s for s in steps if not s["held"]), None)
    if broke is None or not held:
        return None
    p95 = broke["latency_ms"]["p95"]
    keep = (broke["lost_or_concealed"] < SLO["lost_or_concealed"] and p95 is not None and p95 <= SLO["p95_ms"]
            and broke["bypassed_rate_enhanced"] < SLO["bypassed"])
    return {"streams": broke["streams"], "joined": broke.get("joined"), "joins_refused": broke.get("joins_refused", 0),
            "admitted_keep_slo": keep, "degraded_streams": broke["degraded_streams"],
            "degraded_to": broke["degraded_to"], "bypassed_rate_enhanced": broke["bypassed_rate_enhanced"],
            "lost_or_concealed": broke["lost_or_concealed"], "p95_ms": p95}


def _cpu_list(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for r in results:
        xs = [s["streams"] for s in r["steps"]]
        axes[0].plot(xs, [s["latency_ms"]["p95"] or 0 for s in r["steps"]], marker="o", label=r["config"])
        axes[1].plot(xs, [100 * max(s["lost_or_concealed"], s["bypassed_rate"]) for s in r["steps"]], marker="o",
                     label=r["config"])
        axes[2].plot(xs, [s["server_cpu_cores"] for s in r["steps"]], marker="o", label=r["config"])
    axes[0].axhline(SLO["p95_ms"], color="k", ls="--", lw=0.8)
    axes[1].axhline(100 * SLO["bypassed"], color="k", ls="--", lw=0.8)
    for ax, title in zip(axes, ("p95 latency, ms", "worst of lost+concealed / bypassed, %", "server CPU, cores")):
        ax.set_title(title)
        ax.set_xlabel("published streams")
        ax.grid(alpha=0.3)
    axes[1].set_yscale("symlog", linthresh=1)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="plain,none,default,denoise,full")
    parser.add_argument("--server-cpus", default="0", help="taskset list for the server (default 0)")
    parser.add_argument("--workers", type=int, default=1,
                        help="media worker processes of the server (mediaserver serve --workers; default 1)")
    parser.add_argument("--bot-cpus", default="1", help="taskset list for the bots (default 1)")
    parser.add_argument("--bot-processes", type=int, default=2)
    parser.add_argument("--room-size", type=int, default=4)
    parser.add_argument("--start", type=int, default=8)
    parser.add_argument("--step", type=int, default=8)
    parser.add_argument("--max", type=int, default=80)
    parser.add_argument("--warmup", type=float, default=6.0)
    parser.add_argument("--hold", type=float, default=10.0)
    parser.add_argument("--big-room", type=int, default=16, help="participants of the one big room (0: skip)")
    parser.add_argument("--decode-per-bot", type=int, default=1,
                        help="received streams each bot decodes for latency (0: all); the rest are counted from "
                             "their RTP headers only (loss, gaps, jitter)")
    parser.add_argument("--no-fast-path", action="store_true",
                        help="bots send and receive through aiortc's per-packet path (the slow reference)")
    parser.add_argument("--quick", action="store_true", help="start 4, step 4, max 8, hold 5 s, no big room")
    parser.add_argument("--scrape-interval", type=float, default=5.0,
                        help="seconds between the bench's /metrics scrapes of the server (default 5; a scrape costs "
                             "the server tens of ms of CPU at 64 streams, a real Prometheus scrapes every 15-60 s)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.start, args.step, args.max, args.hold, args.warmup, args.big_room = 4, 4, 8, 5.0, 4.0, 0
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-capacity-"))
    out.mkdir(parents=True, exist_ok=True)
    os.sched_setaffinity(0, _cpu_list(args.bot_cpus))  # the bots' worker processes inherit it
    started = time.monotonic()
    results = []
    for config in args.configs.split(","):
        results.append(asyncio.run(ramp(config, args, out / f"server-{config}.log")))
    by = {r["config"]: r for r in results}
    plain = by.get("plain", {}).get("max_streams")
    ratios = {f"{c}_over_plain": round(r["max_streams"] / plain, 2) for c, r in by.items()
              if plain and c != "plain"}
    report = {"bench": "capacity", "slo": SLO, "server_cpus": args.server_cpus, "bot_cpus": args.bot_cpus,
              "workers": args.workers,
              "room_size": args.room_size, "results": results, "ratios": ratios,
              "wall_s": round(time.monotonic() - started, 1), "out": str(out)}
    (out / "capacity.json").write_text(json.dumps(report, indent=1))
    plot(results, out / "capacity.png")
    brief = {**report, "results": [{k: v for k, v in r.items() if k != "steps"} for r in results]}
    print(json.dumps(brief, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
