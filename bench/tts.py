"""Benchmark of the synth package: prompt latency, real-time factor and what the prompt cache saves.

Prints one JSON object. All figures come from the same run on the same machine:

* ``engine_init_ms``: loading libespeak-ng and its data (once per process).
* ``short_prompt``: latency of a short prompt, i.e. the time until its audio is available (the service
  returns a prompt whole): the bare engine call and the full ``SynthService`` path (worker thread,
  resampling to 48 kHz, normalization) with no cache.
* ``long_prompt``: the real-time factor (synthesis time / audio duration) of a ~40 s prompt.
* ``cache``: a memory hit and a disk hit of the same short prompt, against the uncached service call
  measured above (``speedup_*`` = uncached median / hit median).

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
    report["machine"] = {"python": platform.python_version(), "processor": platform.machine()}
    report["quick"] = args.quick
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
