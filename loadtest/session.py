"""One load test against a running server: bot placement over worker processes, windows, progress.

``LoadSession`` owns the bot hosts (worker processes or the caller's loop),
decides which room and signal each new bot gets, scrapes the server's
``/metrics`` throughout, prints progress on the terminal, and turns a time
window into figures (``measure``): publishers' send logs are gathered from
every host and handed to every host, which measures what its own bots
received.  ``run_load`` is the fixed-size scenario of ``loadtest run``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlparse

import aiohttp

from loadtest.host import BotSpec, prepare_signals
from loadtest.lightmedia import opus_lookahead_ms
from loadtest.promtext import MetricsScraper, to_json
from loadtest.sources import SourceConfig
from loadtest.summary import summarize
from loadtest.workers import Host, LocalHost, RemoteHost

BOTS_PER_ADDRESS = 24  # the server limits WebSocket connections per source address (32 by default)
PROGRESS_METRICS = ("participants", "rooms", "skipped_ticks", "bypass_deadline", "clock_lag_max")


@dataclass
class SessionConfig:
    """How bots are made and measured (everything but how many)."""

    url: str  # the server: bots join through it, its /metrics and /healthz are read
    # several servers (a cluster's nodes): bot i joins through join_urls[i % len]; empty: url
    join_urls: list[str] = field(default_factory=list)
    sources: SourceConfig = field(default_factory=SourceConfig)
    # per-bot join override: None: the room's default; "none": no stages; "a;b": bots alternate (A/B runs)
    stages: str | None = None
    processes: int = 0  # 0: bots in this process's loop
    token: str | None = None
    dnsmos_per_publisher: int = 1  # subscribers whose copy of each stream is scored
    score_sent: bool = True  # also score what each scored publisher sent (the quality baseline)
    light: bool = True  # pre-encoded sending, inline decoding (loadtest.lightmedia); False: aiortc's own path
    fast: bool = True  # light bots: media off aiortc's per-packet path once connected (loadtest.wire)
    uvloop: bool = True  # worker processes run uvloop when it is installed
    decode_share: float = 1.0  # light bots: share of received streams decoded (latency); the rest counted only
    warmup_s: float = 4.0
    progress: bool = True
    scrape_interval_s: float = 2.0
    room_prefix: str = field(default_factory=lambda: f"lt{os.getpid() % 1000}x{int(time.time()) % 100000}")
    marker: dict[str, Any] = field(default_factory=dict)  # MatchOptions fields (loadtest.marker)
    spread_source_addresses: bool = True
    sequential_joins: bool = False  # one join at a time (default: all of a step at once, like a meeting start)


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback and ipaddress.ip_address(host).version == 4
    except ValueError:
        return False


class LoadSession:
    """Owns the hosts, the bots' placement, the metrics scraper and the progress line of one load test."""

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self.hosts: list[Host] = []
        self.specs: list[BotSpec] = []
        self.joins: list[dict[str, Any]] = []
        self.scraper = MetricsScraper(config.url, config.scrape_interval_s)
        self.started = time.monotonic()
        self.health: dict[str, Any] = {}
        self._phase = "starting"
        self._phase_end: float | None = None
        self._progress_task: asyncio.Task[None] | None = None
        self._stages: list[str | None] = [None]
        if config.stages is not None:
            self._stages = [self._stage_option(part) for part in config.stages.split(";")]

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        self.health["start"] = await self._get_json("/healthz")
        n = self.config.processes
        if n <= 0:
            self.hosts = [LocalHost(self.config.sources, self.config.url, light=self.config.light,
                                    decode_share=self.config.decode_share, fast=self.config.fast)]
        else:
            self.hosts = [RemoteHost(self.config.sources, self.config.url, f"loadtest-worker-{i}", self.config.light,
                                     self.config.decode_share, fast=self.config.fast, use_uvloop=self.config.uvloop)
                          for i in range(n)]
            await asyncio.gather(*(h.call("status") for h in self.hosts))  # all up (signals load lazily)
        self.scraper.start()
        if self.config.progress:
            self._progress_task = asyncio.get_running_loop().create_task(self._progress())

    async def prepare(self, bots: int) -> None:
        """Encode the signals of the first ``bots`` bots into the Opus cache before any joins (in as many
        processes as the bots get): bots joining during a run then only read it."""
        self._set_phase(f"encoding {bots} signals")
        await asyncio.get_running_loop().run_in_executor(
            None, prepare_signals, self.config.sources, list(range(bots)), max(1, self.config.processes))

    async def close(self) -> None:
        self._phase = "stopping"
        try:
            self.health["end"] = await self._get_json("/healthz")
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass
        await asyncio.gather(*(h.close() for h in self.hosts), return_exceptions=True)
        await self.scraper.stop()
        if self._progress_task is not None:
            self._progress_task.cancel()

    async def _get_json(self, path: str) -> Any:
        url = self.config.url.rstrip("/") + path
        async with aiohttp.ClientSession() as http, http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
            return await r.json()

    # -- bots -----------------------------------------------------------------------------
    @staticmethod
    def _stage_option(text: str) -> str | None:
        text = text.strip()
        if text.lower() in ("default", "room"):
            return None
        return "" if text.lower() in ("", "none") else text

    def stages_of(self, index: int) -> str | None:
        """The stages bot ``index`` asks for: bots take the ``;`` alternatives in turn (with as many
        rooms as alternatives, ``run`` puts each alternative in a room of its own)."""
        return self._stages[index % len(self._stages)]

    def room_name(self, i: int) -> str:
        return f"{self.config.room_prefix}-{i}"

    def url_of(self, index: int) -> str:
        """The server bot ``index`` joins through (``join_urls`` in turn, else ``url``)."""
        urls = self.config.join_urls
        return urls[index % len(urls)] if urls else self.config.url

    async def add_bots(self, rooms: list[str], urls: list[str] | None = None) -> list[dict[str, Any]]:
        """One new bot per entry of ``rooms``, spread round-robin over the hosts; their join results.
        ``urls``: the server each of them joins through (default ``url_of``)."""
        if urls is not None and len(urls) != len(rooms):
            raise ValueError("one URL per bot")
        batches: dict[int, list[BotSpec]] = {}
        for k, room in enumerate(rooms):
            i = len(self.specs)
            url = urls[k] if urls is not None else self.url_of(i)
            spread = self.config.spread_source_addresses and _is_loopback(url)
            addr = f"127.0.0.{2 + i // BOTS_PER_ADDRESS}" if spread and i // BOTS_PER_ADDRESS < 250 else None
            spec = BotSpec(name=f"bot{i}", room=room, index=i, stages=self.stages_of(i), token=self.config.token,
                           local_addr=addr, url=None if url == self.config.url else url)
            self.specs.append(spec)
            batches.setdefault(i % len(self.hosts), []).append(spec)
        self._set_phase(f"joining {len(rooms)}")
        if self.config.sequential_joins:
            joined = [r for s in self.specs[-len(rooms):]
                      for r in await self.hosts[s.index % len(self.hosts)].call("add", specs=[s])]
        else:
            results = await asyncio.gather(*(self.hosts[h].call("add", specs=s) for h, s in batches.items()))
            joined = [r for rs in results for r in rs]
        self.joins += joined
        return joined

    def _set_phase(self, phase: str, seconds: float | None = None) -> None:
        self._phase = phase
        self._phase_end = time.monotonic() + seconds if seconds is not None else None

    async def hold(self, seconds: float, phase: str) -> None:
        self._set_phase(phase, seconds)
        await asyncio.sleep(seconds)

    async def status(self) -> dict[str, int]:
        parts = await asyncio.gather(*(h.call("status") for h in self.hosts), return_exceptions=True)
        total: dict[str, int] = {}
        for p in parts:
            if isinstance(p, dict):
                for k, v in p.items():
                    total[k] = max(total.get(k, 0), int(v)) if k.endswith("_max_ms") else total.get(k, 0) + int(v)
        return total

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            try:
                st = await asyncio.wait_for(self.status(), 5.0)
            except TimeoutError:
                st = {}
            left = f" {max(0.0, self._phase_end - time.monotonic()):5.1f}s left" if self._phase_end else ""
            server = ""
            for frag in PROGRESS_METRICS:
                names = [n for n in self.scraper.find(frag) if not n.endswith(("_bucket", "_count", "_sum"))]
                value = self.scraper.latest(names[0]) if names else None
                if value is not None:
                    server += f" {names[0].replace('mediaserver_', '')}={value:g}"
            print(f"[loadtest {time.monotonic() - self.started:6.1f}s] {self._phase}{left} | bots "
                  f"{st.get('connected', 0)}/{st.get('bots', 0)} connected, {st.get('streams', 0)} streams, "
                  f"{st.get('frames', 0)} frames rx, {st.get('errors', 0)} errors, bot loop lag "
                  f"{st.get('loop_lag_max_ms', 0)} ms |{server}",
                  file=sys.stderr, flush=True)

    # -- measurement ----------------------------------------------------------------------
    async def measure(self, duration_s: float, label: str = "measuring", halt: bool = False) -> dict[str, Any]:
        """Hold ``duration_s`` and return the figures of that window.

        ``halt``: the bots leave before the analysis (a final window: frees the
        CPU for it); otherwise they keep running, as a ramp needs.
        """
        since = time.monotonic()
        await self.hold(duration_s, label)
        until = time.monotonic()
        await self.scraper.scrape_once()  # the server's counters at the end of the window
        if halt:
            self._set_phase("leaving")
            await asyncio.gather(*(h.call("halt") for h in self.hosts))
        self._set_phase("analysing")
        max_latency = float(self.config.marker.get("max_latency_s", 1.5))
        logs: dict[str, dict[str, Any]] = {}
        for part in await asyncio.gather(*(h.call("sendlogs", since=since - max_latency - 1.0) for h in self.hosts)):
            logs.update(part)
        by_id = {j["id"]: j for j in self.joins if j["ok"]}
        signals = {pid: j["index"] for pid, j in by_id.items()}
        pairs: list[tuple[str, str]] = []
        reporters: dict[str, str] = {}
        for pid, j in sorted(by_id.items()):
            reporters.setdefault(j["room"], pid)
            peers = sorted(p for p, o in by_id.items() if o["room"] == j["room"] and p != pid)
            pairs += [(sub, pid) for sub in peers[: self.config.dnsmos_per_publisher]]
        parts = await asyncio.gather(*(h.call("analyze", since=since, until=until, sendlogs=logs,
                                                    signals=signals, dnsmos_pairs=pairs,
                                                    stats_reporters=list(reporters.values()),
                                                    marker=self.config.marker, score_sent=self.config.score_sent)
                                     for h in self.hosts))
        streams = [s for p in parts for s in p["streams"]]
        encode = [v["encode_ms"] for v in logs.values() if v.get("encode_ms") is not None]
        lags = [p["loop_lag_ms"] for p in parts if p.get("loop_lag_ms")]
        cpu = [p["cpu_cores"] for p in parts if p.get("cpu_cores") is not None]
        pps = {k: round(sum(p.get("packets_per_s", {}).get(k, 0.0) for p in parts), 1) for k in ("in", "out")}
        media: dict[str, int] = {}
        for p in parts:
            for k, v in (p.get("media") or {}).items():
                media[k] = media.get(k, 0) + v
        n_bots = sum(1 for j in self.joins if j["ok"])
        sent = {k: v for p in parts for k, v in p["sent_dnsmos"].items()}
        bots = [b for p in parts for b in p["bots"]]
        stats = {k: v for p in parts for k, v in p["server_stats"].items()}
        heard = {(s["subscriber"], s["publisher"]) for s in streams}
        missing = [{"subscriber": sub, "publisher": pub} for pub, j in sorted(by_id.items())
                   for sub, o in sorted(by_id.items()) if o["room"] == j["room"] and sub != pub
                   and (sub, pub) not in heard]
        for s in streams:
            s["latency_samples"] = [[round(t - self.started, 3), w, e] for t, w, e in s["latency_samples"]]
            for key in ("server_pairs", "e2e_pairs"):
                s[key] = [[round(t - self.started, 3), a, b] for t, a, b in s[key]]
        return {
            "since_s": round(since - self.started, 3), "until_s": round(until - self.started, 3),
            "duration_s": round(until - since, 3),
            "summary": {**summarize(streams, sent, stats, bots, codec_delay_ms=2 * opus_lookahead_ms()),
                        "streams_missing": len(missing),
                        "publisher_encode_ms": round(float(sorted(encode)[len(encode) // 2]), 3) if encode else None,
                        "loadgen_loop_lag_ms": {"p50": max((x["p50"] for x in lags), default=None),
                                                "p99": max((x["p99"] for x in lags), default=None),
                                                "max": max((x["max"] for x in lags), default=None)},
                        "loadgen_cpu": {"cores": round(sum(cpu), 3) if cpu else None, "processes": len(cpu),
                                        "ms_per_bot_per_s": round(1000.0 * sum(cpu) / n_bots, 3)
                                        if cpu and n_bots else None,
                                        "packets_per_s": pps,
                                        "us_per_packet": round(1e6 * sum(cpu) / (pps["in"] + pps["out"]), 2)
                                        if cpu and pps["in"] + pps["out"] > 0 else None},
                        "loadgen_media": media},
            "streams": streams, "streams_missing": missing, "sent_dnsmos": sent, "bots": bots,
            "server_stats": {k: [{**x, "t": round(x["t"] - self.started, 3)} for x in v] for k, v in stats.items()},
        }

    async def trim(self, before_s: float) -> None:
        """Let hosts forget audio older than ``before_s`` seconds into the session."""
        await asyncio.gather(*(h.call("trim", before=self.started + before_s) for h in self.hosts))

    def server_section(self) -> dict[str, Any]:
        series = [{"t": round(s["t"] - self.started, 3),
                   "metrics": {k: round(v["sum"], 4) for k, v in s["metrics"].items()}}
                  for s in self.scraper.series]
        return {"url": self.config.url, "health": self.health, "scrape_errors": self.scraper.errors,
                "metrics_final": to_json(self.scraper.last), "metrics_series": series}

    def scenario(self) -> dict[str, Any]:
        cfg = asdict(self.config)
        cfg.pop("token", None)
        return cfg


async def run_load(config: SessionConfig, bots: int, rooms: int, duration_s: float) -> dict[str, Any]:
    """``bots`` bots spread over ``rooms`` rooms, all publishing and subscribing; one window of figures."""
    if bots < 1 or rooms < 1:
        raise ValueError("need at least one bot and one room")
    session = LoadSession(config)
    await session.start()
    try:
        if config.light:
            await session.prepare(bots)
        joins = await session.add_bots([session.room_name(i % rooms) for i in range(bots)])
        await session.hold(config.warmup_s, "warm-up")
        window = await session.measure(duration_s, halt=True)
    finally:
        await session.close()
    return {"kind": "run", "scenario": {**session.scenario(), "bots": bots, "rooms": rooms,
                                        "duration_s": duration_s},
            "joins": joins, "summary": window["summary"], "window": window, "server": session.server_section()}
