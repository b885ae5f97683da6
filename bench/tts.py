"""Benchmark of the synth package: prompt latency, real-time factor and what the prompt cache saves.

Prints one JSON object. All figures come from the same run on the same machine:

* ``engine_init_ms``: loading libespeak-ng and its data (once per process).
* ``short_prompt``: latency of a short prompt, i.e. the time until its audio is available (the service
  returns a prompt whole): the bare engine call and the full ``SynthService`` path (worker thread,
  resampling to 48 kHz, normalization) with no cache.
* ``long_prompt``: the real-time factor (synthesis time / audio duration) of a ~40 s prompt.
* ``cache``: a memory hit and a disk hit of the same short prompt, against the uncached service call
  measured above (``speedup_*`` = uncached median / hit median).
* ``room_prompt``: a real server on loopback and a real aiortc listener (loadtest.bot): the time from
  ``POST /api/rooms/{id}/prompts`` to the prompt's first sample arriving at the subscriber (the first
  audible 20 ms frame, minus the prompt's own leading silence), for the first prompt of a room (its
  track is created and negotiated), later prompts (track exists) uncached, and cached.  Baseline:
  ``short_prompt.service_uncached`` above (synthesis alone).

    .venv/bin/python bench/tts.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from synth.cache import PromptCache
from synth.engine import VoiceOptions
from synth.espeak import EspeakEngine, EspeakLibrary
from synth.service import SynthService

SHORT = "You are now muted."
LONG = (
    "Welcome to the weekly planning meeting. Before we start, a few reminders. "
    "Please keep your microphone muted when you are not speaking, and use the raise hand button "
    "if you would like to ask a question. The meeting is being recorded for colleagues in other "
    "time zones. Today we will review the release schedule, go through the open incidents from last "
    "week, and agree on the priorities for the next sprint. If you are joining by phone, press star six "
    "to mute or unmute yourself, and press star nine to raise your hand. Thank you for joining."
)


def summarize(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    return {
        "median_ms": round(statistics.median(ordered) * 1000.0, 3),
        "p90_ms": round(ordered[math.ceil(0.9 * len(ordered)) - 1] * 1000.0, 3),
        "min_ms": round(ordered[0] * 1000.0, 3),
        "runs": len(ordered),
    }


def time_sync(call: Callable[[int], object], runs: int) -> list[float]:
    samples = []
    for i in range(runs):
        start = time.perf_counter()
        call(i)
        samples.append(time.perf_counter() - start)
    return samples


async def time_async(call: Callable[[int], Awaitable[object]], runs: int) -> list[float]:
    samples = []
    for i in range(runs):
        start = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - start)
    return samples


def onset_s(audio: np.ndarray, threshold: float = 0.01) -> float:
    """Time of the first 10 ms block of ``audio`` whose RMS exceeds ``threshold``."""
    blocks = audio[: len(audio) // 480 * 480].reshape(-1, 480)
    loud = np.flatnonzero(np.sqrt(np.mean(blocks * blocks, axis=1)) > threshold)
    return float(loud[0]) * 0.01 if loud.size else 0.0


async def time_to_first_audio(http: Any, url: str, bot: Any, room: str, text: str,
                              reference: SynthService) -> tuple[float, float]:
    """POST a prompt; (seconds to the 202 reply, seconds to its first sample at ``bot``)."""
    lead_in = onset_s((await reference.synthesize(text)).audio)
    start = time.monotonic()
    reply = await http.post(f"{url}/api/rooms/{room}/prompts", json={"text": text})
    replied = time.monotonic()
    assert reply.status == 202, await reply.text()
    prompt = (await reply.json())["prompt"]
    owner = f"prompt-{room}"
    heard: float | None = None
    seen = 0
    while heard is None:
        recordings = [rec for rec in bot.recordings.values()
                      if (rec.participant or bot.track_info.get(rec.mid, {}).get("participant")) == owner]
        for rec in recordings:
            blocks, arrivals = list(rec.blocks), list(rec.arrivals)
            for block, arrival in zip(blocks[seen:], arrivals[seen:]):
                if arrival >= start and float(np.sqrt(np.mean(block * block))) > 0.01:
                    heard = arrival
                    break
            seen = len(blocks)
        if time.monotonic() - start > 10.0:
            raise RuntimeError("the prompt was never heard")
        await asyncio.sleep(0.001)
    while not any(e.get("prompt") == prompt for e in bot.events_of("prompt.finished")):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.5)  # its tail is still on the way: let the track fall silent before the next run
    return replied - start, heard - start - lead_in


async def measure_room(runs: int) -> dict[str, object]:
    """API call to first prompt audio at a subscriber, through a real server and a real WebRTC client."""
    from dataclasses import replace

    import aiohttp
    from aiohttp import web

    from loadtest.bot import Bot
    from mediaserver.config import AuthConfig, EnhanceConfig, ServerConfig
    from mediaserver.server import MediaServer
    from signaling.app import create_app

    config = ServerConfig(host="127.0.0.1", port=0, auth=AuthConfig(dev_mode=True),
                          enhance=replace(EnhanceConfig(), default_stages=(), device="cpu"))
    server = MediaServer(config)
    runner = web.AppRunner(create_app(server))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    reference = SynthService(cache=PromptCache(directory=None))  # the same engine and options as the server's
    new_track: list[tuple[float, float]] = []
    uncached: list[tuple[float, float]] = []
    cached: list[tuple[float, float]] = []
    try:
        async with aiohttp.ClientSession() as http:
            for i in range(runs):
                bot = Bot(url, f"bench{i}", "listener", publish=False)
                await bot.join()
                try:
                    await asyncio.sleep(0.5)
                    new_track.append(await time_to_first_audio(http, url, bot, f"bench{i}",
                                                               f"{SHORT} Room {i}.", reference))
                    for j in range(2):
                        uncached.append(await time_to_first_audio(http, url, bot, f"bench{i}",
                                                                  f"{SHORT} Take {i} {j}.", reference))
                    cached.append(await time_to_first_audio(http, url, bot, f"bench{i}",
                                                            f"{SHORT} Room {i}.", reference))
                finally:
                    await bot.leave()
    finally:
        await reference.aclose()
        await runner.cleanup()

    def figures(samples: list[tuple[float, float]]) -> dict[str, object]:
        return {"api_reply": summarize([r for r, _ in samples]),
                "first_audio_at_subscriber": summarize([a for _, a in samples])}

    return {
        "path": "HTTP POST -> synthesis -> prompt track -> Opus -> loopback WebRTC -> aiortc subscriber",
        "first_prompt_of_room_new_track": figures(new_track),
        "later_prompt_uncached": figures(uncached),
        "later_prompt_cached": figures(cached),
    }


async def measure(runs: int, long_runs: int) -> dict[str, object]:
    start = time.perf_counter()
    EspeakLibrary.get()
    engine_init_ms = (time.perf_counter() - start) * 1000.0
    engine = EspeakEngine()
    engine.synthesize("warm up")  # the first call loads the voice's dictionary

    bare = time_sync(lambda i: engine.synthesize(f"{SHORT} {i}"), runs)
    uncached_service = SynthService(engine, PromptCache(directory=None, memory_items=0))
    await uncached_service.synthesize("warm up")
    uncached = await time_async(lambda i: uncached_service.synthesize(f"{SHORT} {i}"), runs)

    long_times = time_sync(lambda _i: engine.synthesize(LONG), long_runs)
    long_audio_s = engine.synthesize(LONG).duration_s
    long_service = await time_async(lambda _i: uncached_service.synthesize(LONG), long_runs)
    await uncached_service.aclose()

    with tempfile.TemporaryDirectory() as folder:
        cache = PromptCache(folder)
        async with SynthService(engine, cache) as service:
            first = await service.synthesize(SHORT)
            memory_hits = await time_async(lambda _i: service.synthesize(SHORT), runs)

            async def disk_hit(_i: int) -> object:
                cache.clear_memory()
                return await service.synthesize(SHORT)

            disk_hits = await time_async(disk_hit, runs)
            assert not first.cache_hit and (await service.synthesize(SHORT)).cache_hit

    uncached_median = statistics.median(uncached)
    return {
        "engine": "espeak",
        "voice": engine.default_voice(),
        "options": VoiceOptions().__dict__,
        "engine_init_ms": round(engine_init_ms, 3),
        "short_prompt": {
            "text": SHORT,
            "audio_s": round(first.duration_s, 3),
            "engine_call": summarize(bare),
            "service_uncached": summarize(uncached),
        },
        "long_prompt": {
            "chars": len(LONG),
            "audio_s": round(long_audio_s, 3),
            "engine_call": summarize(long_times),
            "service_uncached": summarize(long_service),
            "real_time_factor_engine": round(statistics.median(long_times) / long_audio_s, 5),
            "real_time_factor_service": round(statistics.median(long_service) / long_audio_s, 5),
        },
        "cache": {
            "baseline": "service_uncached short prompt (same run)",
            "memory_hit": summarize(memory_hits),
            "disk_hit": summarize(disk_hits),
            "speedup_memory_hit": round(uncached_median / statistics.median(memory_hits), 1),
            "speedup_disk_hit": round(uncached_median / statistics.median(disk_hits), 1),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few repetitions (a few seconds)")
    args = parser.parse_args()
    runs, long_runs = (10, 2) if args.quick else (50, 5)
    report = asyncio.run(measure(runs, long_runs))
    report["room_prompt"] = asyncio.run(measure_room(2 if args.quick else 5))
    report["machine"] = {"python": platform.python_version(), "processor": platform.machine()}
    report["quick"] = args.quick
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
