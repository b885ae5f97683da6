"""Soak: a fresh server, bots talking, leaving and rejoining for a long time; resource growth as JSON.

Starts ``.venv/bin/mediaserver serve --dev`` on a free loopback port (its
default stages unless ``--stages``; the executor then runs them in a worker
process), joins real WebRTC bots (``loadtest.bot.Bot``, light media path:
real speech and noise, over the wire only) and keeps them talking.  Every
``--window`` seconds the bots' received streams are measured (frames a
listener should have got and did not, gaps) and one bot leaves and a new one
joins in its place (``--no-churn`` to keep them), so leaks in join and leave
show up.  Every ``--interval`` seconds the server process and each of its
child processes (the executor worker) are sampled from ``/proc``: resident
memory, open file descriptors, threads.  Growth per hour is the
least-squares slope over the samples after ``--warmup``.

    .venv/bin/python bench/soak.py [--seconds 1800] [--bots 4] [--rooms 2] [--window 30] [--stages SPEC]
    make soak SOAK_ARGS="--seconds 120"          # SOAK_SECONDS=120 works too
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load import served  # noqa: E402
from enhancers.process_name import EXECUTOR_WORKER, QUALITY_SCORER  # noqa: E402
from loadtest.bot import Bot  # noqa: E402
from loadtest.lightmedia import encode_opus  # noqa: E402
from loadtest.sources import SourceConfig, SourceLibrary, default_dir  # noqa: E402
from loadtest.streams import measure_stream  # noqa: E402

SETTLE_S = 3.0  # after a join, before its streams count: renegotiation and the first packets
MIB = 2 ** 20


# -- /proc sampling ------------------------------------------------------------------------
def proc_figures(pid: int) -> dict[str, int] | None:
    """Resident memory (bytes), open file descriptors and threads of one process; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return {"rss": int(status["VmRSS"].split()[0]) * 1024, "fds": fds, "threads": int(status["Threads"])}


def children_of(pid: int) -> dict[int, str]:
    """Child processes of ``pid`` by kind: the executor worker, multiprocessing's resource tracker, others."""
    out: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != pid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        kind = ("resource_tracker" if "resource_tracker" in cmd else "executor_worker" if comm == EXECUTOR_WORKER
                else "quality_scorer" if comm == QUALITY_SCORER else Path(cmd.split(" ", 1)[0]).name or "child")
        out[int(entry)] = kind
    return out


@dataclass
class Sampler:
    """Owns the time series of the server process and its children."""

    pid: int
    started: float
    samples: list[dict[str, Any]] = field(default_factory=list)
    phase: str = "idle"  # idle (no bots yet), running, after (every bot left)

    def sample(self) -> None:
        if (server := proc_figures(self.pid)) is None:
            return
        kinds: dict[str, dict[str, int]] = {}
        for cpid, kind in sorted(children_of(self.pid).items()):
            if (fig := proc_figures(cpid)) is not None:
                agg = kinds.setdefault(kind, {"rss": 0, "fds": 0, "threads": 0, "processes": 0})
                for k, v in fig.items():
                    agg[k] += v
                agg["processes"] += 1
        self.samples.append({"t": round(time.monotonic() - self.started, 2), "phase": self.phase, "server": server,
                             "children": kinds})

    async def run(self, interval: float) -> None:
        while True:
            self.sample()
            await asyncio.sleep(interval)


def per_hour(t: list[float], y: list[float]) -> float | None:
    """Least-squares slope of ``y`` over ``t`` (seconds), per hour."""
    if len(t) < 3 or max(t) - min(t) < 1.0:
        return None
    return float(np.polyfit(np.asarray(t), np.asarray(y, dtype=np.float64), 1)[0] * 3600.0)


def growth(samples: list[dict[str, Any]], pick: Any, warmup: float) -> dict[str, Any]:
    """One process (or sum): first sample, after the warm-up, last with bots, max, after every bot left,
    and the slopes per hour over the samples taken while bots ran, after the warm-up."""
    series = [(s["t"], pick(s)) for s in samples if s["phase"] == "running"]
    series = [(t, v) for t, v in series if v is not None]
    if not series:
        return {}
    after = [pick(s) for s in samples if s["phase"] == "after" and pick(s) is not None]
    late = [(t, v) for t, v in series if t >= warmup] or series
    rss = [v["rss"] / MIB for _, v in late]
    fds = [float(v["fds"]) for _, v in late]
    slope = per_hour([t for t, _ in late], rss)
    fd_slope = per_hour([t for t, _ in late], fds)
    idle = [pick(s) for s in samples if s["phase"] == "idle" and pick(s) is not None]
    return {
        "rss_mib": {"start": round(series[0][1]["rss"] / MIB, 1), "after_warmup": round(rss[0], 1),
                    "end": round(rss[-1], 1), "max": round(max(v["rss"] for _, v in series) / MIB, 1),
                    "after_all_left": round(after[-1]["rss"] / MIB, 1) if after else None},
        "fds": {"before_bots": idle[0]["fds"] if idle else None, "start": series[0][1]["fds"],
                "after_warmup": int(fds[0]), "end": int(fds[-1]), "max": max(v["fds"] for _, v in series),
                "after_all_left": after[-1]["fds"] if after else None},
        "threads": {"start": series[0][1]["threads"], "end": series[-1][1]["threads"]},
        "rss_mib_per_hour": round(slope, 2) if slope is not None else None,
        "fds_per_hour": round(fd_slope, 2) if fd_slope is not None else None,
    }


def children_total(sample: dict[str, Any]) -> dict[str, int] | None:
    kinds = sample["children"].values()
    return {k: sum(c[k] for c in kinds) for k in ("rss", "fds", "threads")} if kinds else None


def everything(sample: dict[str, Any]) -> dict[str, int]:
    kids = children_total(sample) or {"rss": 0, "fds": 0, "threads": 0}
    return {k: sample["server"][k] + kids[k] for k in ("rss", "fds", "threads")}


# -- bots -------------------------------------------------------------------------------------
@dataclass
class Slot:
    """One place in a room, held by successive bots (a churned bot's successor takes its slot)."""

    index: int
    room: str
    audio: np.ndarray
    packets: list[bytes]
    bot: Bot | None = None
    joined_at: float = 0.0
    generation: int = 0


class Soak:
    """Owns the bots, the churn schedule and the per-window media figures."""

    def __init__(self, url: str, bots: int, rooms: int, stages: str | None) -> None:
        self.url = url
        self.stages = stages
        sources = SourceConfig(snr_db=10.0 if default_dir("noise") else None)
        library = SourceLibrary(sources)
        self.slots = []
        for i in range(bots):
            mix = library.signal(i).mix
            self.slots.append(Slot(i, f"soak-{i % rooms}", mix, encode_opus(mix)))
        self.sessions = 0
        self.failures: list[dict[str, Any]] = []
        self.windows: list[dict[str, Any]] = []
        self.churns = 0
        self.started = time.monotonic()

    async def join(self, slot: Slot) -> None:
        slot.generation += 1
        self.sessions += 1
        bot = Bot(self.url, slot.room, f"soak{slot.index}-{slot.generation}", slot.audio, light=True,
                  opus_packets=slot.packets, stages=self.stages)
        try:
            await bot.join(timeout=20.0)
        except Exception as exc:  # noqa: BLE001 - a failed join is a soak result, not a crash
            self.failures.append({"bot": bot.name, "when": "join", "error": f"{type(exc).__name__}: {exc}"})
            await bot.leave()
            slot.bot = None
            return
        slot.bot, slot.joined_at = bot, time.monotonic()

    async def leave(self, slot: Slot) -> None:
        if slot.bot is not None:
            self.check(slot)
            await slot.bot.leave()
            slot.bot = None

    def check(self, slot: Slot) -> None:
        """A participant fails when its connection failed or the server removed it."""
        bot = slot.bot
        if bot is None or getattr(bot, "_soak_failed", False):
            return
        reason = None
        if bot.pc.connectionState in ("failed", "closed"):
            reason = f"connection {bot.pc.connectionState}"
        elif bot.events_of("bye"):
            reason = f"removed by the server: {bot.events_of('bye')[0].get('reason')}"
        elif bot._ws is None or bot._ws.closed:
            reason = "signaling socket closed"
        if reason is not None:
            bot._soak_failed = True  # type: ignore[attr-defined]
            self.failures.append({"bot": bot.name, "when": "call", "error": reason})

    def measure(self, since: float, until: float) -> dict[str, Any]:
        """Every stream between two bots present for the whole window: expected, dropped, gaps."""
        live = [s for s in self.slots if s.bot is not None and s.bot.id is not None and s.joined_at + SETTLE_S <= since]
        ids = {s.bot.id: s for s in live if s.bot is not None}
        expected = dropped = gaps = missing = 0
        longest = 0.0
        for sub in live:
            assert sub.bot is not None
            heard: set[str] = set()
            for rec in sub.bot.recordings.values():
                pub = rec.participant
                if pub is None or pub == sub.bot.id or pub not in ids or ids[pub].room != sub.room:
                    continue
                fig = measure_stream(rec, sub.bot.id or "", pub, sub.room, since, until, [], None)
                if fig.frames_expected == 0:
                    continue
                heard.add(pub)
                expected += fig.frames_expected
                dropped += fig.dropped
                gaps += fig.gaps
                longest = max(longest, fig.longest_gap_ms)
            for pub, other in ids.items():
                if pub != sub.bot.id and other.room == sub.room and pub not in heard:
                    missing += 1
                    frames = int((until - since) / 0.02)
                    expected += frames
                    dropped += frames
            sub.bot.trim(until)  # bounded memory in this process
        streams = sum(1 for a in live for b in live if a is not b and a.room == b.room)
        return {"t0_s": round(since - self.started, 1), "seconds": round(until - since, 2), "streams": streams,
                "frames_expected": expected, "dropped": dropped, "gaps": gaps,
                "longest_gap_ms": round(longest, 1), "streams_missing": missing}

    async def run(self, seconds: float, window: float, churn: bool, sampler: Sampler) -> None:
        end = time.monotonic() + seconds
        await asyncio.gather(*(self.join(s) for s in self.slots))
        sampler.phase = "running"
        turn = 0
        while time.monotonic() + SETTLE_S + 2.0 < end:
            await asyncio.sleep(SETTLE_S)
            since = time.monotonic()
            until = min(since + window, end)
            await asyncio.sleep(until - since)
            for slot in self.slots:
                self.check(slot)
            self.windows.append(self.measure(since, until))
            print(f"[soak] window {len(self.windows)}: {self.windows[-1]}", file=sys.stderr, flush=True)
            if time.monotonic() + SETTLE_S + 2.0 >= end:
                break
            for slot in self.slots:  # a failed join gets another try
                if slot.bot is None:
                    await self.join(slot)
            if churn:
                slot = self.slots[turn % len(self.slots)]
                turn += 1
                await self.leave(slot)
                await self.join(slot)
                self.churns += 1
        sampler.sample()  # the last figures with every bot in
        sampler.phase = "leaving"
        for slot in self.slots:
            await self.leave(slot)

    def media(self) -> dict[str, Any]:
        expected = sum(w["frames_expected"] for w in self.windows)
        dropped = sum(w["dropped"] for w in self.windows)
        return {"windows": len(self.windows), "frames_expected": expected, "dropped": dropped,
                "drop_rate": round(dropped / expected, 5) if expected else None,
                "gaps": sum(w["gaps"] for w in self.windows),
                "longest_gap_ms": max((w["longest_gap_ms"] for w in self.windows), default=0.0),
                "streams_missing": sum(w["streams_missing"] for w in self.windows),
                "worst_window_drop_rate": max((round(w["dropped"] / w["frames_expected"], 5)
                                               for w in self.windows if w["frames_expected"]), default=None)}


# -- the run ----------------------------------------------------------------------------------
def healthz(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


async def soak(args: argparse.Namespace, url: str, pid: int) -> dict[str, Any]:
    started = time.monotonic()
    sampler = Sampler(pid, started)
    sampler_task = asyncio.get_running_loop().create_task(sampler.run(args.interval))
    run = Soak(url, args.bots, args.rooms, args.bot_stages)
    try:
        await run.run(args.seconds, args.window, not args.no_churn, sampler)
        sampler.phase = "after"
        await asyncio.sleep(2.0)  # the server's cleanup after the last leave
        sampler.sample()
    finally:
        sampler_task.cancel()
    health = await asyncio.to_thread(healthz, url)
    executor = health.get("executor") or {}
    warmup = args.warmup if args.warmup is not None else min(300.0, 0.2 * args.seconds)
    samples = sampler.samples
    kinds = sorted({k for s in samples for k in s["children"]})
    return {
        "duration_s": round(time.monotonic() - started, 1),
        "samples": len(samples),
        "warmup_s": warmup,
        "server": growth(samples, lambda s: s["server"], warmup),
        "children": {k: growth(samples, lambda s, k=k: s["children"].get(k), warmup) for k in kinds},
        "total": growth(samples, everything, warmup),
        "media": run.media(),
        "participants": {"sessions": run.sessions, "left_and_rejoined": run.churns,
                         "failed": len(run.failures), "failures": run.failures[:20]},
        "after_all_left": {"participants": health.get("participants"), "rooms": health.get("rooms"),
                           "executor_live_streams": executor.get("live_streams")},
        "executor": {k: v for k, v in executor.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        "series": [[s["t"], s["phase"], round(s["server"]["rss"] / MIB, 1), s["server"]["fds"],
                    round(sum(c["rss"] for c in s["children"].values()) / MIB, 1),
                    sum(c["fds"] for c in s["children"].values())] for s in samples],
        "series_columns": ["t_s", "phase", "server_rss_mib", "server_fds", "children_rss_mib", "children_fds"],
    }


def _ratio(figures: dict[str, Any], key: str) -> float | None:
    base = (figures.get(key) or {}).get("after_warmup")
    return round(figures[key]["end"] / base, 3) if base else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 1800)),
                        help="how long the bots run (default 1800, or SOAK_SECONDS)")
    parser.add_argument("--bots", type=int, default=4)
    parser.add_argument("--rooms", type=int, default=2)
    parser.add_argument("--window", type=float, default=30.0, help="seconds per measured window; one bot "
                        "leaves and rejoins after each")
    parser.add_argument("--no-churn", action="store_true", help="bots stay for the whole run")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between /proc samples")
    parser.add_argument("--warmup", type=float, help="seconds left out of the slopes (default 20%% of "
                        "the run, at most 300)")
    parser.add_argument("--stages", help="server default stages (default: the server's own default)")
    parser.add_argument("--bot-stages", help="stages every bot asks for at join (default: the room's)")
    args = parser.parse_args()
    if args.bots < 2 or args.rooms < 1 or args.bots < 2 * args.rooms:
        parser.error("need at least two bots per room")
    log_path = Path(tempfile.mkstemp(prefix="soak-server-", suffix=".log")[1])
    started = time.monotonic()
    with open(log_path, "wb") as log_file, served(args.stages, log_file) as (url, server):
        result = asyncio.run(soak(args, url, server.pid))
    log_text = log_path.read_text(errors="replace")
    result = {"bench": "soak",
              "scenario": {"seconds": args.seconds, "bots": args.bots, "rooms": args.rooms, "window_s": args.window,
                           "churn": not args.no_churn, "interval_s": args.interval,
                           "server_stages": args.stages or "server default", "cpus": os.cpu_count()},
              **result,
              "ratios": {"server_rss_end_over_after_warmup": _ratio(result["server"], "rss_mib"),
                         "server_fds_end_over_after_warmup": _ratio(result["server"], "fds")},
              "server_exit_code": server.returncode,
              "server_log": {"path": str(log_path), "errors": log_text.count(" ERROR "),
                             "tracebacks": log_text.count("Traceback")},
              "wall_s": round(time.monotonic() - started, 1)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
