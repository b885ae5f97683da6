"""Cluster latency: one room of 8 spanning two nodes, publisher-to-subscriber latency same-node vs cross-node.

Issue 19's acceptance: "A room of 8 with 4 participants on each of two nodes: everyone hears everyone,
publisher-to-subscriber p95 <= 150 ms on loopback, the inter-node hop adds <= 15 ms p50."

Per configuration (``--configs``: ``none`` = ``--stages ""``, ``default`` = the server's default stages),
on loopback:

- a real ``redis-server`` (free port, temporary directory) and two ``mediaserver serve --dev --workers 1``
  nodes (``node-a``, ``node-b``: ``MEDIASERVER_REDIS_URL``, ``_NODE_ID``, ``_PUBLIC_URL``,
  ``_CLUSTER_TOKEN``, ``_RELAY_HOST=127.0.0.1``, ``_ROOM_SPILL_AFTER=4``), as tests/test_cluster.py starts
  them, pinned to ``--server-cpus`` (Redis too); the bots (``loadtest``, the fast media path, every
  received stream decoded for the marker) pinned to ``--bot-cpus``;
- **cluster**: 4 bots join room R through node A's URL (R is placed on node A), and once Redis says
  node A has them (the count the nodes route by), 4 more through node B's URL: A already has
  ``ROOM_SPILL_AFTER`` of R's participants, so B hosts them and R spans both nodes (events over Redis,
  streams relayed node to node over UDP).  Where each participant's media is, is read back from the
  nodes (``/api/rooms/R``: a node lists its own participants without ``host``, the other's with it)
  and from ``/healthz`` (per node participants of R, ``spanning_rooms``);
- **single**: then, in the same run, the same 8 bots (same signals) in one fresh room through node A
  only: all on one node, the comparison.

Each phase: ``--warmup`` s, then a ``--hold`` s window; the bots' marker latency (the same
publisher-to-subscriber figure bench/capacity.py reports: a publisher's RTP packet leaving to the
subscriber's RTP packet with the same audio arriving) per (subscriber, publisher) pair, split into
same-node and cross-node pairs; the hop's added latency = cross - same (p50 and p95); frames lost
(expected minus received 20 ms frames, loadtest/streams.py); whether every bot heard the 7 others with
content (the marker found the publisher's own speech in what arrived); the nodes' relay counters.

Prints JSON (and writes cluster_latency.json and the nodes' logs to ``--out``):

    .venv/bin/python bench/cluster_latency.py [--configs none,default] [--hold 20] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load import BIN, ROOT, free_port, stop_server, wait_healthy  # noqa: E402
from loadtest.session import LoadSession, SessionConfig  # noqa: E402
from loadtest.sources import SourceConfig, default_dir  # noqa: E402

CONFIGS = {"none": "", "default": None}
ROOM = 8
ACCEPT = {"p95_ms": 150.0, "hop_p50_ms": 15.0}


# -- the cluster ------------------------------------------------------------------------------------------
@contextmanager
def redis_server(cpus: str, tmp: Path) -> Iterator[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("cluster_latency: redis-server is not installed (Debian package redis-server)")
    port = free_port()
    proc = subprocess.Popen(["taskset", "-c", cpus, exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        import redis

        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        client.close()
        yield url
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def node(name: str, redis_url: str, token: str, stages: str | None, cpus: str, log: Path,
         log_level: str = "WARNING") -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(BIN / "mediaserver"), "serve", "--dev", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--log-level", log_level]
    if stages is not None:
        cmd += ["--stages", stages]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MEDIASERVER_REDIS_URL": redis_url, "MEDIASERVER_NODE_ID": name,
           "MEDIASERVER_PUBLIC_URL": url, "MEDIASERVER_CLUSTER_TOKEN": token, "MEDIASERVER_RELAY_HOST": "127.0.0.1",
           "MEDIASERVER_ROOM_SPILL_AFTER": str(ROOM // 2)}
    with open(log, "ab") as out:
        proc = subprocess.Popen(["taskset", "-c", cpus, *cmd], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=env)
    try:
        wait_healthy(url, proc, timeout_s=240.0)
        yield url, proc
    finally:
        stop_server(proc)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def room_on(health: dict[str, Any], room: str) -> int:
    """Participants of ``room`` on this node (its workers' rooms in the front's /healthz)."""
    return sum(int((w.get("rooms") or {}).get(room, 0)) for w in health.get("workers", []))


async def wait_for(predicate: Any, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.get_running_loop().run_in_executor(None, predicate):
        if time.monotonic() > deadline:
            raise RuntimeError(f"cluster_latency: timed out waiting for {what}")
        await asyncio.sleep(0.2)


def placement(urls: dict[str, str], room: str, bot_ids: list[str]) -> dict[str, Any]:
    """Which node holds each participant's media: each node's /api/rooms/<room> lists its own participants
    without ``host`` (the other node's carry it); plus /healthz's counts and spanning rooms."""
    node_of: dict[str, str] = {}
    remote_listed: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    spanning: dict[str, Any] = {}
    for name, url in urls.items():
        try:
            described = get_json(f"{url}/api/rooms/{room}")
        except OSError:
            described = {"participants": []}
        for p in described.get("participants", []):
            if p.get("host") is None:
                node_of[str(p["id"])] = name
            else:
                remote_listed.setdefault(name, []).append(str(p["id"]))
        health = get_json(f"{url}/healthz")
        counts[name] = room_on(health, room)
        spanning[name] = (health.get("spanning_rooms") or {}).get(room)
    return {"node_of": {b: node_of.get(b) for b in bot_ids}, "participants_per_node": counts,
            "remote_listed_per_node": {k: len(v) for k, v in remote_listed.items()},
            "spanning_hosts": spanning}


def relay_counters(urls: dict[str, str]) -> dict[str, Any]:
    out = {}
    for name, url in urls.items():
        workers = get_json(f"{url}/healthz").get("workers", [])
        relays = [(w.get("health") or {}).get("relay") or {} for w in workers]
        out[name] = {"sent": sum(int(r.get("sent", 0)) for r in relays),
                     "received": sum(int(r.get("received", 0)) for r in relays),
                     "dropped": {k: v for r in relays for k, v in (r.get("dropped") or {}).items()},
                     "skipped_ticks": sum(int(((w.get("health") or {}).get("clock") or {}).get("skipped_ticks", 0))
                                          for w in workers)}
    return out


def _delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {n: {"sent": after[n]["sent"] - before[n]["sent"], "received": after[n]["received"] - before[n]["received"],
                "dropped": {k: v - before[n]["dropped"].get(k, 0) for k, v in after[n]["dropped"].items()
                            if v - before[n]["dropped"].get(k, 0)},
                "skipped_ticks": after[n]["skipped_ticks"] - before[n]["skipped_ticks"]} for n in after}


# -- figures ----------------------------------------------------------------------------------------------
def _pct(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "samples": 0}  # type: ignore[dict-item]
    return {**{f"p{q}": round(float(np.percentile(values, q)), 1) for q in (50, 95, 99)},
            "samples": len(values)}  # type: ignore[dict-item]


def _group(streams: list[dict[str, Any]]) -> dict[str, Any]:
    latency = [x[1] for s in streams for x in s["latency_samples"]]
    expected = sum(s["frames_expected"] for s in streams)
    dropped = sum(s["dropped"] for s in streams)
    return {"pairs": len(streams), "latency_ms": _pct(latency),
            "frames_expected": expected, "frames_lost": dropped,
            "lost_rate": round(dropped / expected, 5) if expected else None,
            "rtp_lost": sum(s["rtp_lost"] for s in streams), "gaps": sum(s["gaps"] for s in streams),
            "longest_gap_ms": max((s["longest_gap_ms"] for s in streams), default=0.0),
            "jitter_ms_mean": round(float(np.mean([s["jitter_ms"] for s in streams])), 2) if streams else None}


def figures(window: dict[str, Any], joins: list[dict[str, Any]], node_of: dict[str, str | None]) -> dict[str, Any]:
    ok = [j for j in joins if j["ok"]]
    ids = [j["id"] for j in ok]
    streams = [s for s in window["streams"] if s["subscriber"] in ids and s["publisher"] in ids]
    heard = {(s["subscriber"], s["publisher"]) for s in streams
             if s["frames_received"] > 0 and s["latency_windows"] > 0}  # the publisher's own speech arrived
    hears = {j["name"]: sum(1 for p in ids if p != j["id"] and (j["id"], p) in heard) for j in ok}
    same = [s for s in streams if node_of.get(s["subscriber"]) == node_of.get(s["publisher"])]
    cross = [s for s in streams if node_of.get(s["subscriber"]) != node_of.get(s["publisher"])]
    out: dict[str, Any] = {
        "bots_joined": len(ok), "joins_failed": len(joins) - len(ok),
        "everyone_hears_everyone": len(ok) == len(joins) and all(n == len(ids) - 1 for n in hears.values()),
        "streams_with_content_per_bot": hears,
        "all": _group(streams), "same_node": _group(same), "cross_node": _group(cross),
        "loadgen_loop_lag_ms": window["summary"].get("loadgen_loop_lag_ms"),
        "loadgen_cpu_cores": (window["summary"].get("loadgen_cpu") or {}).get("cores"),
        "marker_ncc_median": round(float(np.median([s["marker_ncc_median"] for s in streams
                                                    if s["marker_ncc_median"] is not None])), 3)
        if any(s["marker_ncc_median"] is not None for s in streams) else None,
    }
    if same and cross:
        sl, cl = out["same_node"]["latency_ms"], out["cross_node"]["latency_ms"]
        out["hop_added_ms"] = {q: round(cl[q] - sl[q], 1) if cl[q] is not None and sl[q] is not None else None
                               for q in ("p50", "p95")}
        # the same, publisher by publisher (each publisher's own median cross minus its median same): a
        # stream's latency also depends on where the server's 10 ms chunk grid cuts its 20 ms frames
        diffs = []
        for pub in ids:
            s_pub = [x[1] for s in same if s["publisher"] == pub for x in s["latency_samples"]]
            c_pub = [x[1] for s in cross if s["publisher"] == pub for x in s["latency_samples"]]
            if s_pub and c_pub:
                diffs.append(float(np.median(c_pub) - np.median(s_pub)))
        out["hop_added_by_publisher_ms"] = {"median": round(float(np.median(diffs)), 1),
                                            "min": round(min(diffs), 1), "max": round(max(diffs), 1)} \
            if diffs else None
    return out


# -- one configuration ------------------------------------------------------------------------------------
def session_config(url: str, args: argparse.Namespace, prefix: str) -> SessionConfig:
    noise = str(default_dir("noise")) if default_dir("noise") else None
    sources = SourceConfig(noise_dir=noise, snr_db=10.0 if noise else None)
    return SessionConfig(url=url, sources=sources, processes=args.bot_processes, dnsmos_per_publisher=0,
                         score_sent=False, warmup_s=args.warmup, progress=not args.quiet, room_prefix=prefix,
                         decode_share=1.0)


async def phase(kind: str, urls: dict[str, str], redis_url: str, args: argparse.Namespace,
                prefix: str) -> dict[str, Any]:
    """One room of 8: ``cluster`` (4 through each node) or ``single`` (all through node A)."""
    a, b = urls["node-a"], urls["node-b"]
    session = LoadSession(session_config(a, args, prefix))
    room = session.room_name(0)
    await session.start()
    try:
        await session.prepare(ROOM)
        half = ROOM // 2 if kind == "cluster" else ROOM
        joins = await session.add_bots([room] * half, urls=[a] * half)
        # the nodes route a join by Redis's per-node count of the room, refreshed every second: wait until it
        # says node A has them (else a join through B would be proxied to A, not hosted on B)
        await wait_for(lambda: sum(room_on(get_json(f"{u}/healthz"), room) for u in urls.values()) >= half,
                       f"{half} participants in {room}")
        if kind == "cluster":
            import redis

            client = redis.Redis.from_url(redis_url)
            try:
                await wait_for(lambda: int(client.hget(f"ms:roomnodes:{room}", "node-a") or 0) >= half,
                               "node A's count of the room in Redis")
            finally:
                client.close()
            joins += await session.add_bots([room] * (ROOM - half), urls=[b] * (ROOM - half))
        ids = [j["id"] for j in joins if j["ok"]]
        await wait_for(lambda: sum(room_on(get_json(f"{u}/healthz"), room) for u in urls.values()) >= len(ids),
                       f"{len(ids)} participants in {room}")
        where = placement(urls, room, ids)
        await session.hold(args.warmup, f"{kind}: warm-up")
        before = relay_counters(urls)
        window = await session.measure(args.hold, f"{kind}: {len(ids)} bots", halt=True)
        after = relay_counters(urls)
    finally:
        await session.close()
    joined_via = {j["name"]: ("node-a" if j.get("url") == a else "node-b") for j in joins}
    node_of = where["node_of"]
    by_name = {j["name"]: node_of.get(j["id"]) for j in joins if j["ok"]}
    media_on_joined_node = all(by_name.get(n) == v for n, v in joined_via.items())
    signaling = {b["name"]: {"renegotiations": b["renegotiations"], "errors": b["errors"]} for b in window["bots"]}
    return {"room": room, "joined_via": joined_via, "media_node": by_name, "bots_signaling": signaling,
            "media_on_joined_node": media_on_joined_node if kind == "cluster" else None,
            "placement": {k: v for k, v in where.items() if k != "node_of"},
            **figures(window, joins, node_of), "relay": _delta(before, after)}


async def run_config(config: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    stages = CONFIGS[config]
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cluster-latency-")))
        redis_url = stack.enter_context(redis_server(args.server_cpus, tmp))
        token = secrets.token_hex(16)
        a, b = (stack.enter_context(node(name, redis_url, token, stages, args.server_cpus, out / f"{name}-{config}.log",
                                         args.log_level)) for name in ("node-a", "node-b"))
        urls = {"node-a": a[0], "node-b": b[0]}
        await asyncio.sleep(2.5)  # both nodes in each other's view of the directory (refreshed every second)
        prefix = f"cl{config}{os.getpid() % 1000}"
        cluster = await phase("cluster", urls, redis_url, args, f"{prefix}x")
        # the cluster room's participants gone from both nodes and from the directory's counts
        await wait_for(lambda: all(get_json(f"{u}/healthz").get("participants", 0) == 0 for u in urls.values()),
                       "the cluster room to empty")
        await asyncio.sleep(2.5)
        single = await phase("single", urls, redis_url, args, f"{prefix}s")
    c, s = cluster, single
    accept = {
        "everyone_hears_everyone": bool(c["everyone_hears_everyone"]),
        "four_per_node": c["placement"]["participants_per_node"] == {"node-a": ROOM // 2, "node-b": ROOM // 2}
        and bool(c["media_on_joined_node"]),
        "p95_ms": c["all"]["latency_ms"]["p95"],
        "p95_ok": c["all"]["latency_ms"]["p95"] is not None and c["all"]["latency_ms"]["p95"] <= ACCEPT["p95_ms"],
        "hop_p50_ms": (c.get("hop_added_ms") or {}).get("p50"),
        "hop_p50_ok": (c.get("hop_added_ms") or {}).get("p50") is not None
        and c["hop_added_ms"]["p50"] <= ACCEPT["hop_p50_ms"],
    }
    accept["holds"] = all(accept[k] for k in ("everyone_hears_everyone", "four_per_node", "p95_ok", "hop_p50_ok"))
    return {"config": config, "stages": stages if stages is not None else "server default", "acceptance": accept,
            "cluster": cluster, "single_node": single,
            "cross_minus_single_ms": {q: round(c["cross_node"]["latency_ms"][q] - s["all"]["latency_ms"][q], 1)
                                      if c["cross_node"]["latency_ms"][q] is not None
                                      and s["all"]["latency_ms"][q] is not None else None for q in ("p50", "p95")}}


def brief(result: dict[str, Any]) -> dict[str, Any]:
    """The headline of one configuration (the full figures are in cluster_latency.json)."""
    c, s = result["cluster"], result["single_node"]

    def lat(g: dict[str, Any]) -> dict[str, Any]:
        return dict(g["latency_ms"])

    return {"config": result["config"], "acceptance": result["acceptance"],
            "placement": c["placement"], "media_on_joined_node": c["media_on_joined_node"],
            "streams_with_content_per_bot": c["streams_with_content_per_bot"],
            "latency_ms": {"same_node": lat(c["same_node"]), "cross_node": lat(c["cross_node"]),
                           "cluster_all": lat(c["all"]), "single_node": lat(s["all"])},
            "hop_added_ms": c.get("hop_added_ms"), "hop_added_by_publisher_ms": c.get("hop_added_by_publisher_ms"),
            "cross_minus_single_ms": result["cross_minus_single_ms"],
            "lost_rate": {"same_node": c["same_node"]["lost_rate"], "cross_node": c["cross_node"]["lost_rate"],
                          "single_node": s["all"]["lost_rate"]},
            "frames_lost": {"cluster": c["all"]["frames_lost"], "single_node": s["all"]["frames_lost"]},
            "relay": c["relay"],
            "loadgen_loop_lag_ms": {"cluster": c["loadgen_loop_lag_ms"], "single_node": s["loadgen_loop_lag_ms"]}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="none,default", help="none (--stages \"\"), default (server default)")
    parser.add_argument("--server-cpus", default="0", help="taskset list for Redis and both nodes (default 0)")
    parser.add_argument("--bot-cpus", default="1", help="taskset list for the bots (default 1)")
    parser.add_argument("--bot-processes", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=6.0)
    parser.add_argument("--hold", type=float, default=20.0, help="measured seconds per phase")
    parser.add_argument("--quick", action="store_true", help="warm-up 4 s, hold 8 s, no stages only")
    parser.add_argument("--log-level", default="WARNING", help="the nodes' log level (their logs go to --out)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.warmup, args.hold, args.configs = 4.0, 8.0, "none"
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-cluster-latency-"))
    out.mkdir(parents=True, exist_ok=True)
    os.sched_setaffinity(0, [int(c) for c in _cpu_list(args.bot_cpus)])  # the bots' processes inherit it
    started = time.monotonic()
    results = [asyncio.run(run_config(c, args, out)) for c in args.configs.split(",")]
    report = {"bench": "cluster_latency", "room": ROOM, "acceptance_bounds": ACCEPT,
              "server_cpus": args.server_cpus, "bot_cpus": args.bot_cpus, "warmup_s": args.warmup,
              "hold_s": args.hold, "results": results, "wall_s": round(time.monotonic() - started, 1),
              "out": str(out)}
    (out / "cluster_latency.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({**{k: v for k, v in report.items() if k != "results"},
                      "results": [brief(r) for r in results]}, indent=1))
    return 0 if all(r["acceptance"]["holds"] for r in results) else 1


def _cpu_list(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


if __name__ == "__main__":
    sys.exit(main())
