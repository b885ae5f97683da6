"""The bots of one process: join them, report progress, and measure what they received.

A ``BotHost`` lives in one event loop (a worker process, or the caller's
loop for in-process runs).  Its public coroutines are the commands the
coordinator sends; their arguments and results are plain picklable data.
Analysis runs on a snapshot of the recordings in a thread, so the bots keep
streaming meanwhile.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import logging
import multiprocessing
import os
import sys
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from loadtest.bot import Bot, Recording
from loadtest.lightmedia import encode_opus_cached, opus_cache_path
from loadtest.marker import MarkerTemplate, MatchOptions, SendTimeline
from loadtest.quality import dnsmos
from loadtest.sources import SourceConfig, SourceLibrary
from loadtest.streams import measure_stream, owner_since, window_audio

log = logging.getLogger(__name__)

STATS_FIELDS = ("participant", "stream", "stages", "server_latency_ms", "e2e_latency_ms", "subscriber_dropped",
                "dropped_backlog", "processing_ms", "jitter_buffer_ms",
                "jitter_ms", "received", "lost", "late", "concealed_chunks", "bypassed", "chunks")


def _first(entry: tuple[float, int]) -> float:
    return entry[0]


_libraries: dict[SourceConfig, SourceLibrary] = {}


def _stall_watchdog(beat: list[float], threshold_s: float) -> None:
    """Debugging aid (``LOADTEST_STALL_MS``): log where the event loop's thread is whenever its 10 ms
    heartbeat is more than the threshold late, once per stall."""
    main = threading.main_thread().ident
    reported = 0.0
    while True:
        time.sleep(threshold_s / 4)
        late = time.monotonic() - beat[0]
        if late > threshold_s and beat[0] != reported:
            reported = beat[0]
            frame = sys._current_frames().get(main or 0)
            stack = "".join(traceback.format_stack(frame)[-10:]) if frame is not None else "?"
            log.warning("event loop stalled %.0f ms so far, at:\n%s", late * 1000.0, stack)


def _encode_signal(sources: SourceConfig, index: int) -> None:
    library = _libraries.get(sources)
    if library is None:
        library = _libraries[sources] = SourceLibrary(sources)
    encode_opus_cached(library.signal(index).mix)


def prepare_signals(sources: SourceConfig, indices: list[int], processes: int) -> None:
    """Encode the signals of bots ``indices`` into the Opus cache now, in ``processes`` processes, so that
    bots joining later (while others stream) only read it (``encode_opus_cached``)."""
    library = SourceLibrary(sources)
    todo = [i for i in indices if not opus_cache_path(library.signal(i).mix).exists()]
    if not todo:
        return
    if processes <= 1 or len(todo) < 4:
        for i in todo:
            encode_opus_cached(library.signal(i).mix)
        return
    with ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_encode_signal, [sources] * len(todo), todo, chunksize=max(1, len(todo) // (4 * processes))))


@dataclass(frozen=True)
class BotSpec:
    """Who a bot is: its name, room, signal index and join options."""

    name: str
    room: str
    index: int
    stages: str | None = None
    token: str | None = None
    local_addr: str | None = None
    echo_cancellation: bool = True
    url: str | None = None  # the server this bot joins through (a cluster's node); None: its host's URL


@dataclass
class _Snapshot:
    """One bot's recordings and logs, copied on the event loop for analysis in a thread."""

    bot_id: str
    room: str
    recordings: list[Recording]
    send_log: list[tuple[float, int]]
    probes: dict[str, list[dict[str, float]]]  # publisher -> its figures in the stats messages this bot got


class BotHost:
    """Owns the bots of one process and everything they recorded."""

    def __init__(self, library: SourceLibrary, url: str, max_concurrent_joins: int = 4, light: bool = True,
                 decode_share: float = 1.0, fast: bool = True) -> None:
        self.library = library
        self.url = url
        self.light = light
        self.fast = fast and light  # media off aiortc's per-packet path once connected (loadtest.wire)
        self.decode_share = decode_share
        self.bots: list[tuple[BotSpec, Bot]] = []
        self._join_gate = asyncio.Semaphore(max_concurrent_joins)
        # one thread builds the bots' signals and Opus packets: several would take turns at the GIL with the
        # event loop (a convoy: joining bots stalled the streaming ones for as long as all encodes took)
        self._media_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loadtest-media")
        self._opus: dict[int, list[bytes]] = {}
        self.loop_lag: list[tuple[float, float]] = []  # (time, ms late) of a 10 ms timer: is the load generator keeping up?
        self.cpu: list[tuple[float, float]] = []  # (time, CPU seconds of this process) every 0.5 s
        self._lag_task: asyncio.Task[None] | None = None

    async def _watch_loop(self) -> None:
        n = 0
        stall_ms = float(os.environ.get("LOADTEST_STALL_MS", "0") or 0)
        beat = [time.monotonic()]
        if stall_ms > 0:
            threading.Thread(target=_stall_watchdog, args=(beat, stall_ms / 1000.0), daemon=True,
                             name="loadtest-stall-watchdog").start()
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            now = beat[0] = time.monotonic()
            self.loop_lag.append((now, max(0.0, (now - before - 0.01) * 1000.0)))
            if n % 50 == 0:
                self.cpu.append((now, time.process_time()))
            if n % 200 == 0:
                # Everything that survived the last 2 s (recordings, send logs, the stats messages bots keep:
                # hundreds of thousands of objects after a minute of 160 bots) leaves the collector's view:
                # a full collection walking it all stalled the loop for up to a second.  Garbage cycles
                # older than that are not collected any more, which a load test of minutes can afford.
                gc.freeze()
            n += 1
            if len(self.loop_lag) > 200_000:
                del self.loop_lag[:100_000]
                del self.cpu[: len(self.cpu) // 2]

    def cpu_cores(self, since: float, until: float) -> float | None:
        """This process's CPU time over [since, until] (its samples nearest inside) per second of wall time."""
        inside = [(t, c) for t, c in self.cpu if since <= t <= until]
        if len(inside) < 2 or inside[-1][0] - inside[0][0] < 0.5:
            return None
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    # -- commands -----------------------------------------------------------------
    async def add(self, specs: list[BotSpec]) -> list[dict[str, Any]]:
        """Create and join bots; one result per spec (``ok``, ``id``, ``error``, milestones)."""
        if self._lag_task is None:
            self._lag_task = asyncio.get_running_loop().create_task(self._watch_loop())
        results = list(await asyncio.gather(*(self._join_one(s) for s in specs)))
        gc.freeze()  # the bots and their aiortc objects live to the end (see _watch_loop)
        return results

    def _media(self, index: int) -> tuple[np.ndarray, list[bytes] | None]:
        """A bot's signal and, for light bots, its Opus packets (built off the event loop)."""
        mix = self.library.signal(index).mix
        if self.light and index not in self._opus:
            self._opus[index] = encode_opus_cached(mix)
        return mix, self._opus.get(index)

    async def _join_one(self, spec: BotSpec) -> dict[str, Any]:
        mix, packets = await asyncio.get_running_loop().run_in_executor(self._media_pool, self._media, spec.index)
        bot = Bot(spec.url or self.url, spec.room, spec.name, mix, loop=True, stages=spec.stages,
                  echo_cancellation=spec.echo_cancellation, token=spec.token, local_addr=spec.local_addr,
                  light=self.light, opus_packets=packets, decode_share=self.decode_share, fast=self.fast)
        self.bots.append((spec, bot))
        error = None
        async with self._join_gate:
            try:
                await bot.join(timeout=20.0)
            except Exception as exc:  # noqa: BLE001 - a failed join is a result of the load test, not a crash
                error = f"{type(exc).__name__}: {exc}"
        if bot.errors and error is None:
            error = str(bot.errors[0])
        return {"name": spec.name, "index": spec.index, "room": spec.room, "id": bot.id, "url": bot.url,
                "ok": error is None and bot.id is not None, "error": error}

    async def status(self) -> dict[str, Any]:
        bots = [b for _, b in self.bots]
        recent = [ms for t, ms in self.loop_lag if t >= time.monotonic() - 2.0]
        return {
            "loop_lag_max_ms": int(max(recent, default=0.0)),
            "bots": len(bots),
            "joined": sum(1 for b in bots if "answered" in b.times),
            "connected": sum(1 for b in bots if "connected" in b.times),
            "streams": sum(len(b.recordings) for b in bots),
            "frames": sum(len(r.blocks) + len(r.enc_payloads) for b in bots for r in b.recordings.values()),
            "packets": sum(len(r.rtp_seq) for b in bots for r in b.recordings.values()),
            "errors": sum(len(b.errors) for b in bots),
        }

    async def sendlogs(self, since: float) -> dict[str, dict[str, Any]]:
        """Every publisher's send timelines from ``since`` on: ``wire`` (RTP packets reaching the
        transport) and ``frames`` (frames handed to the sender), plus the encode hop between them."""
        out: dict[str, dict[str, Any]] = {}
        for _, bot in self.bots:
            if bot.id is None or bot.track is None:
                continue
            frames = bot.track.send_log[bisect.bisect_left(bot.track.send_log, since, key=_first):]
            if bot.wire_sender is not None:  # the wire sender hands a packet over and sends it at once
                out[bot.id] = {"frames": frames, "wire": frames, "encode_ms": 0.0}
                continue
            wire = bot.track.wire_log[bisect.bisect_left(bot.track.wire_log, since, key=_first):]
            at = {p: t for t, p in frames}
            hops = [(t - at[p]) * 1000.0 for t, p in wire if p in at]
            out[bot.id] = {"frames": frames, "wire": wire,
                           "encode_ms": round(float(np.median(hops)), 3) if hops else None}
        return out

    async def trim(self, before: float) -> None:
        for _, bot in self.bots:
            bot.trim(before)

    async def analyze(self, since: float, until: float, sendlogs: dict[str, dict[str, Any]],
                      signals: dict[str, int], dnsmos_pairs: list[tuple[str, str]],
                      stats_reporters: list[str], marker: dict[str, Any] | None = None,
                      score_sent: bool = True) -> dict[str, Any]:
        """Figures of every stream this host's bots received in [since, until)."""
        snaps = [_Snapshot(b.id, spec.room, [r.snapshot() for r in b.recordings.values()],
                           list(b.track.send_log) if b.track is not None else [], self._probes(b, since, until))
                 for spec, b in self.bots if b.id is not None]
        bots = [self._bot_summary(spec, b) for spec, b in self.bots]
        server_stats = {b.id: self._stats_samples(b, since, until)
                        for _, b in self.bots if b.id in set(stats_reporters)}
        streams, sent = await asyncio.get_running_loop().run_in_executor(
            None, self._analyze_sync, snaps, since, until, sendlogs, signals, set(map(tuple, dnsmos_pairs)),
            marker or {}, score_sent)
        lag = [ms for t, ms in self.loop_lag if since <= t < until]
        loop_lag = {"p50": round(float(np.percentile(lag, 50)), 2), "p99": round(float(np.percentile(lag, 99)), 2),
                    "max": round(max(lag), 2)} if lag else None
        cpu = self.cpu_cores(since, until)
        span = max(1e-9, until - since)
        packets_in = sum(bisect.bisect_left(r.rtp_arrivals, until) - bisect.bisect_left(r.rtp_arrivals, since)
                         for _, b in self.bots for r in b.recordings.values())
        packets_out = sum(bisect.bisect_left(b.track.wire_log, until, key=_first)
                          - bisect.bisect_left(b.track.wire_log, since, key=_first)
                          for _, b in self.bots if b.track is not None)
        return {"streams": streams, "sent_dnsmos": sent, "bots": bots, "server_stats": server_stats,
                "loop_lag_ms": loop_lag, "cpu_cores": round(cpu, 4) if cpu is not None else None,
                "packets_per_s": {"in": round(packets_in / span, 1), "out": round(packets_out / span, 1)},
                "media": self.media_counters()}

    def media_counters(self) -> dict[str, int]:
        """The fast path's own counters, summed over this host's bots (all zero on aiortc's path)."""
        out = {"sent": 0, "skipped": 0, "not_connected": 0, "received": 0, "fallback": 0, "undecryptable": 0,
               "rtcp_dropped": 0}
        for _, bot in self.bots:
            if bot.wire_sender is not None:
                out["sent"] += bot.wire_sender.sent
                out["skipped"] += bot.wire_sender.skipped
                out["not_connected"] += bot.wire_sender.not_connected
            if bot._wire_rx is not None:
                out["received"] += bot._wire_rx.packets
                out["fallback"] += bot._wire_rx.fallback
                out["undecryptable"] += bot._wire_rx.undecryptable
                out["rtcp_dropped"] += bot._wire_rx.rtcp_dropped
        return out

    async def halt(self) -> dict[str, Any]:
        """All bots leave (their recordings stay for analysis); idempotent."""
        self._media_pool.shutdown(wait=False, cancel_futures=True)
        if self._lag_task is not None:
            self._lag_task.cancel()
            self._lag_task = None
        live = [b for _, b in self.bots if not getattr(b, "_loadtest_left", False)]
        for b in live:
            b._loadtest_left = True  # type: ignore[attr-defined]
        await asyncio.gather(*(b.leave() for b in live), return_exceptions=True)
        return {"left": len(live)}

    async def stop(self) -> dict[str, Any]:
        return await self.halt()

    # -- helpers ------------------------------------------------------------------
    @staticmethod
    def _bot_summary(spec: BotSpec, bot: Bot) -> dict[str, Any]:
        t0 = bot.times.get("join_start")
        rel = {k: round((v - t0) * 1000.0, 1) for k, v in bot.times.items() if t0 is not None and k != "join_start"}
        return {**asdict(spec), "token": None, "id": bot.id, "milestones_ms": rel,
                "errors": [e.get("code") for e in bot.errors], "renegotiations": bot.renegotiations,
                "subscriptions": {mid: [o for _, o in r.owners] for mid, r in bot.recordings.items()},
                "offered": {mid: info.get("participant") for mid, info in bot.track_info.items()},
                "transceivers": [[t.mid, t.direction, t.currentDirection, t.receiver.track is not None]
                                 for t in bot.pc.getTransceivers()]}

    @staticmethod
    def _probes(bot: Bot, since: float, until: float) -> dict[str, list[dict[str, float]]]:
        out: dict[str, list[dict[str, float]]] = {}
        for e in bot.events_of("stats"):
            if since <= e["_t"] < until:
                for s in e.get("streams", []):
                    probe = {"t": float(e["_t"])}
                    for key in ("server_latency_ms", "e2e_latency_ms"):
                        if isinstance(s.get(key), (int, float)) and s[key] > 0:
                            probe[key] = float(s[key])
                    if s.get("participant") and len(probe) > 1:
                        out.setdefault(str(s["participant"]), []).append(probe)
        return out

    @staticmethod
    def _stats_samples(bot: Bot, since: float, until: float) -> list[dict[str, Any]]:
        out = []
        for e in bot.events_of("stats"):
            if since <= e["_t"] < until:
                for s in e.get("streams", []):
                    out.append({"t": round(e["_t"], 3), **{k: s.get(k) for k in STATS_FIELDS if k in s}})
        return out

    def _analyze_sync(self, *args: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        t0 = time.monotonic()
        out = self._analyze_windows(*args)
        log.info("analysis of %d streams took %.1f s", len(out[0]), time.monotonic() - t0)
        return out

    def _analyze_windows(self, snaps: list[_Snapshot], since: float, until: float,
                         sendlogs: dict[str, dict[str, Any]], signals: dict[str, int],
                         dnsmos_pairs: set[tuple[str, ...]], marker: dict[str, Any], score_sent: bool
                         ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        templates: dict[str, list[MarkerTemplate]] = {}
        options = MatchOptions(**marker)
        timelines = {pid: SendTimeline.from_log(logs["wire"] if len(logs["wire"]) > 1 else logs["frames"])
                     for pid, logs in sendlogs.items()}
        streams: list[dict[str, Any]] = []
        for snap in snaps:
            for rec in snap.recordings:
                pub = rec.participant
                if pub is None or pub == snap.bot_id:
                    continue
                if pub in signals and pub not in templates:
                    signal = self.library.signal(signals[pub])
                    templates[pub] = [MarkerTemplate(signal.speech), MarkerTemplate(signal.mix)]
                t = time.monotonic()
                fig = measure_stream(rec, snap.bot_id, pub, snap.room, since, until, templates.get(pub, []),
                                     timelines.get(pub), options, snap.probes.get(pub))
                t1 = time.monotonic()
                if (snap.bot_id, pub) in dnsmos_pairs:
                    start = owner_since(rec, pub)
                    if start is not None:
                        fig.dnsmos = dnsmos(window_audio(rec, max(since, start), until))
                log.info("stream %s<-%s: marker %.1f s, dnsmos %.1f s", snap.bot_id, pub, t1 - t,
                         time.monotonic() - t1)
                streams.append(fig.to_dict())
        sent: dict[str, Any] = {}
        own = {s.bot_id: s for s in snaps}
        for _, pub in dnsmos_pairs if score_sent else ():
            if pub in own and pub in signals and pub not in sent:
                sent[pub] = dnsmos(self._sent_audio(own[pub].send_log, signals[pub], since, until))
        return streams, sent

    def _sent_audio(self, send_log: list[tuple[float, int]], index: int, since: float, until: float) -> np.ndarray:
        """What a publisher sent in [since, until): its looped mix at the logged positions."""
        pts = [p for t, p in send_log if since <= t < until]
        if not pts:
            return np.zeros(0, dtype=np.float32)
        mix = self.library.signal(index).mix
        idx = (np.arange(pts[0], pts[-1] + 960) % len(mix)).astype(np.int64)
        return np.clip(mix[idx], -1.0, 1.0)
