"""Benchmark: what the live quality SLIs cost, per stream, at 16 and 48 streams, SLIs on against off.

For each stream count and each setting (``MEDIASERVER_QUALITY=1`` / ``0``, interleaved, same run) a
fresh ``mediaserver serve --dev --stages ""`` (no stages: the cheapest streams, where the SLIs weigh
most) is pinned to ``--server-cpus`` (core 0) and real WebRTC bots (``loadtest``, real speech with
real noise) to ``--bot-cpus`` (core 1), in rooms of 4.  After the warm-up (``--warmup``: the scorer
process has started and loaded) the CPU of the media process and of the ``ms-quality`` scorer
process is read from /proc over ``--hold`` seconds, separately.

Also measured in this process, per call (process CPU time): the tap ``QualityTap.on_chunk`` per
10 ms chunk, the signals ``SignalTracker.push + signals`` per 1 s block, and (from the server's
/healthz) the scorer's measured CPU per DNSMOS clip.

    .venv/bin/python bench/quality_overhead.py [--streams 16,48] [--hold 40] [--quick]

Prints JSON: per stream count, the media process's CPU with the SLIs on and off and the scorer
process's (% of one core, medians over ``--rounds`` interleaved pairs), ``added_*`` (on minus off:
what the SLIs add, per stream in % of one core and as a share of what a stream costs without them;
on a shared machine this difference is noisy) and ``attributed_*`` (the SLIs' own work measured
where it runs: tap per chunk times chunks, the quality thread's CPU time from /healthz, the scorer
process from /proc).  ``--code DIR`` runs another checkout's server (a before/after comparison).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.capacity import _cpu_list  # noqa: E402
from bench.load import BIN, ROOT, free_port, stop_server, wait_healthy  # noqa: E402
from enhancers.process_name import QUALITY_SCORER  # noqa: E402
from loadtest.session import LoadSession, SessionConfig  # noqa: E402
from loadtest.sources import SourceConfig, default_dir  # noqa: E402


def _cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> dict[int, str]:
    out: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != pid:
                continue
            with open(f"/proc/{entry}/comm") as f:
                out[int(entry)] = f.read().strip()
        except (OSError, IndexError, ValueError):
            continue
    return out


def _cpu_by_kind(pid: int) -> dict[str, float]:
    out = {"media": _cpu_s(pid), "scorer": 0.0, "other_children": 0.0}
    for child, comm in _children(pid).items():
        out["scorer" if comm == QUALITY_SCORER else "other_children"] += _cpu_s(child)
    return out


@contextmanager
def server(quality: bool, cpus: str, log: Path, code: str | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # python -m signaling.main (the ``mediaserver`` command's module): the command line does not say
    # "mediaserver", so a shared machine's clean-up of stray servers by name leaves this one alone
    cmd = [str(BIN / "python"), "-m", "signaling.main", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--dev", "--log-level", "WARNING", "--stages", ""]
    env = {**os.environ, "MEDIASERVER_QUALITY": "1" if quality else "0"}
    if code:  # another checkout's code (a before/after comparison), with this virtualenv
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [code, env.get("PYTHONPATH")]))
    with open(log, "ab") as out:
        proc = subprocess.Popen(["taskset", "-c", cpus, *cmd], stdout=out, stderr=subprocess.STDOUT,
                                cwd=code or ROOT, env=env)  # -m puts the working directory first on the path
    try:
        wait_healthy(url, proc)
        yield url, proc
    finally:
        stop_server(proc)


def _health(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
        return json.load(r)  # type: ignore[no-any-return]


async def measure(quality: bool, streams: int, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    with server(quality, args.server_cpus, log, args.code) as (url, proc):
        noise = str(default_dir("noise")) if default_dir("noise") else None
        cfg = SessionConfig(url=url, sources=SourceConfig(noise_dir=noise, snr_db=10.0 if noise else None),
                            processes=args.bot_processes, dnsmos_per_publisher=0, score_sent=False,
                            warmup_s=args.warmup, progress=False, room_prefix=f"qo{int(quality)}x{streams}",
                            decode_share=1.0)
        session = LoadSession(cfg)
        await session.start()
        try:
            joins = await session.add_bots([session.room_name(i // 4) for i in range(streams)])
            await session.hold(args.warmup, "warm-up")
            deadline = time.monotonic() + 60
            while quality and not all((_health(url).get("ready") or {}).values()) and time.monotonic() < deadline:
                await asyncio.sleep(0.5)  # the scorer process loaded: its start-up is not the steady cost
            h0 = _health(url)
            c0, t0 = _cpu_by_kind(proc.pid), time.monotonic()
            window = await session.measure(args.hold, f"{streams} streams")
            c1, t1 = _cpu_by_kind(proc.pid), time.monotonic()
            try:
                health = _health(url)
            except OSError:  # the server is gone: say so rather than lose the whole run
                print(f"[quality_overhead] the server exited ({proc.poll()}) before the end of the window",
                      file=sys.stderr, flush=True)
                health = {}
        finally:
            await session.close()
    wall = t1 - t0
    q = health.get("quality") or {}
    q0 = h0.get("quality") or {}
    thread_s = float(q.get("thread_cpu_s", q.get("scorer_cpu_s", 0.0)) or 0.0) - float(
        q0.get("thread_cpu_s", q0.get("scorer_cpu_s", 0.0)) or 0.0)
    return {"quality_thread_cpu_pct": round(100 * thread_s / wall, 3) if quality else 0.0,"quality": quality, "streams": streams, "joined": sum(1 for j in joins if j["ok"]),
            "media_cpu_pct": round(100 * (c1["media"] - c0["media"]) / wall, 2),
            "scorer_cpu_pct": round(100 * (c1["scorer"] - c0["scorer"]) / wall, 2),
            "other_children_cpu_pct": round(100 * (c1["other_children"] - c0["other_children"]) / wall, 2),
            "drop_rate": window["summary"].get("drop_rate"),
            "windows_scored": q.get("windows_scored"), "budget": q.get("budget")}


def micro() -> dict[str, float]:
    """Per-call CPU of the tap (per chunk) and the signals (per block), in this process."""
    from enhancers.quality import SignalTracker
    from mediaserver.config import QualityConfig
    from mediaserver.pipeline import PipelineResult
    from mediaserver.quality import QualityMonitor, QualityTap

    class _P:
        stages: list[str] = []

    class _S:
        pipeline = _P()

    monitor = QualityMonitor(QualityConfig())
    monitor.submit = lambda block: None  # type: ignore[method-assign]
    tap = QualityTap(monitor, "s", "r")
    rng = np.random.default_rng(0)
    x = (0.05 * rng.standard_normal(480)).astype(np.float32)
    y = x * 0.5
    out: dict[str, float] = {}
    n = 50_000
    for label, result, stages in (("tap_us_per_chunk_no_stages", PipelineResult(audio=x), []),
                                  ("tap_us_per_chunk_stages", PipelineResult(audio=y), ["denoise"])):
        _S.pipeline.stages = stages
        t = time.process_time()
        for _ in range(n):
            tap.on_chunk(_S(), x, result)
        out[label] = round((time.process_time() - t) / n * 1e6, 3)
    tracker = SignalTracker()
    block = (0.05 * rng.standard_normal((100, 480))).astype(np.float32)
    t = time.process_time()
    for _ in range(500):
        tracker.push(block, block * 0.5)
        tracker.signals()
    out["signals_ms_per_block"] = round((time.process_time() - t) / 500 * 1e3, 4)
    return out


async def run(args: argparse.Namespace, out: Path, micro_figures: dict[str, float]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    tap_us = micro_figures["tap_us_per_chunk_no_stages"]
    for streams in [int(s) for s in args.streams.split(",")]:
        ons, offs = [], []
        for r in range(args.rounds):  # interleaved: a shared machine's other load falls on both sides
            for quality, runs in ((True, ons), (False, offs)):
                runs.append(await measure(quality, streams, args, out / f"{'on' if quality else 'off'}-{streams}-{r}.log"))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)  # kept if a later run fails

        def med(runs: list[dict[str, Any]], key: str) -> float:
            return float(statistics.median(x[key] for x in runs))

        total_on = med(ons, "media_cpu_pct") + med(ons, "scorer_cpu_pct")
        total_off = med(offs, "media_cpu_pct")
        added = total_on - total_off
        # the SLIs' own work, measured where it runs: the tap on the event loop (its per-chunk cost times
        # 100 chunks/s/stream), the quality thread (its thread CPU time), the scorer process (/proc)
        attributed = streams * 100 * tap_us * 1e-4 + med(ons, "quality_thread_cpu_pct") + med(ons, "scorer_cpu_pct")
        results[str(streams)] = {
            "on": ons, "off": offs,
            "media_cpu_pct_on": round(med(ons, "media_cpu_pct"), 2), "media_cpu_pct_off": round(total_off, 2),
            "scorer_cpu_pct": round(med(ons, "scorer_cpu_pct"), 2),
            "added_pct_of_core": round(added, 2),
            "added_pct_of_core_per_stream": round(added / streams, 3),
            "added_share_of_stream_cost": round(added / total_off, 3) if total_off else None,
            "attributed_pct_of_core": round(attributed, 2),
            "attributed_pct_of_core_per_stream": round(attributed / streams, 3),
            "attributed_share_of_stream_cost": round(attributed / total_off, 3) if total_off else None,
        }
        print(f"[quality_overhead] {streams} streams: on {total_on:.1f} % (scorer {med(ons, 'scorer_cpu_pct')} %), "
              f"off {total_off:.1f} %, attributed {attributed:.2f} %", file=sys.stderr, flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="16,48")
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--bot-cpus", default="1")
    parser.add_argument("--bot-processes", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--hold", type=float, default=40.0)
    parser.add_argument("--rounds", type=int, default=2, help="on/off pairs per stream count (median)")
    parser.add_argument("--quick", action="store_true", help="16 streams, 20 s hold, one round")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--code", help="run the server from this checkout (PYTHONPATH), e.g. a git worktree of an "
                                       "older commit, for a before/after comparison")
    args = parser.parse_args()
    if args.quick:
        args.streams, args.hold, args.warmup, args.rounds = "16", 20.0, 8.0, 1
    import tempfile

    out = args.out or Path(tempfile.mkdtemp(prefix="bench-quality-"))
    out.mkdir(parents=True, exist_ok=True)
    os.sched_setaffinity(0, _cpu_list(args.bot_cpus))
    started = time.monotonic()
    figures = micro()
    report = {"bench": "quality_overhead", "server_cpus": args.server_cpus, "bot_cpus": args.bot_cpus,
              "hold_s": args.hold, "rounds": args.rounds, "code": args.code or str(ROOT), "micro": figures,
              "results": asyncio.run(run(args, out, figures)),
              "wall_s": round(time.monotonic() - started, 1), "out": str(out)}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
