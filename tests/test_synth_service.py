"""SynthService from asyncio: 48 kHz prompts, the prompt cache, concurrency and error propagation."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from synth.cache import PromptCache, cache_key
from synth.engine import EmptyText, SynthResult, TextTooLong, UnknownVoice, VoiceOptions
from synth.espeak import EspeakEngine
from synth.service import SynthService


class CountingEngine(EspeakEngine):
    """eSpeak that records how often, and on which thread, it really synthesized."""

    def __init__(self, max_chars: int = 5000) -> None:
        super().__init__(max_chars=max_chars)
        self.calls: list[str] = []
        self.threads: set[str] = set()

    def _synthesize(self, text: str, voice: str, options: VoiceOptions) -> SynthResult:
        self.calls.append(text)
        self.threads.add(threading.current_thread().name)
        return super()._synthesize(text, voice, options)


async def test_prompt_is_48k_float32_mono_with_metadata() -> None:
    async with SynthService(CountingEngine()) as service:
        result = await service.synthesize("You are now muted.")
    assert result.sample_rate == 48000
    assert result.audio.dtype == np.float32 and result.audio.ndim == 1
    assert 0.5 < result.duration_s < 3.0
    assert len(result.audio) % 480 == 0, "a whole number of 10 ms server frames"
    assert 0.6 < float(np.max(np.abs(result.audio))) <= 0.75, "peak-normalized to -3 dBFS"
    meta = result.metadata()
    assert meta["synthetic"] is True
    assert meta["engine"] == "espeak" and meta["voice"] == "en-us"
    assert meta["cache_hit"] is False and meta["sample_rate"] == 48000
    assert meta["duration_s"] == pytest.approx(result.duration_s, abs=1e-3)


async def test_cache_hit_returns_identical_audio_without_synthesizing(tmp_path: Path) -> None:
    engine = CountingEngine()
    async with SynthService(engine, PromptCache(tmp_path)) as service:
        first = await service.synthesize("Press one for sales.")
        again = await service.synthesize("Press one for sales.")
        faster = await service.synthesize("Press one for sales.", VoiceOptions(rate=1.5))
    assert not first.cache_hit and again.cache_hit and not faster.cache_hit
    assert np.array_equal(first.audio, again.audio)
    assert len(faster.audio) < len(first.audio), "options are part of the cache key"
    assert engine.calls == ["Press one for sales.", "Press one for sales."]
    assert not again.audio.flags.writeable, "cached audio is shared, so it is read-only"

    # a new process (new service, new memory) finds the prompt on disk
    fresh_engine = CountingEngine()
    async with SynthService(fresh_engine, PromptCache(tmp_path)) as service:
        from_disk = await service.synthesize("Press one for sales.")
    assert from_disk.cache_hit and fresh_engine.calls == []
    assert np.array_equal(from_disk.audio, first.audio)
    assert from_disk.metadata()["synthetic"] is True


async def test_concurrent_requests_are_served_off_the_event_loop() -> None:
    engine = CountingEngine()
    texts = [f"Participant number {n} has joined the room." for n in range(1, 6)]
    texts += texts[:2]  # duplicates arrive while the originals are still in flight
    async with SynthService(engine) as service:
        ticks = 0

        async def heartbeat() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        beat = asyncio.create_task(heartbeat())
        results = await asyncio.gather(*(service.synthesize(t) for t in texts))
        beat.cancel()
    assert all(name.startswith("synth") for name in engine.threads), "synthesis runs on the worker thread"
    assert sorted(engine.calls) == sorted(set(texts)), "each distinct prompt is synthesized once"
    assert ticks > len(set(texts)), "the event loop kept running during synthesis"
    for text, result in zip(texts, results, strict=True):
        assert result.sample_rate == 48000 and result.duration_s > 1.0
        twin = results[texts.index(text)]
        assert np.array_equal(result.audio, twin.audio)


async def test_errors_reach_the_caller() -> None:
    async with SynthService(EspeakEngine(max_chars=50)) as service:
        with pytest.raises(EmptyText):
            await service.synthesize("   ")
        with pytest.raises(TextTooLong):
            await service.synthesize("word " * 20)
        with pytest.raises(UnknownVoice):
            await service.synthesize("hello", VoiceOptions(voice="tlh-klingon"))
        # the service keeps working after failures
        assert (await service.synthesize("Still here.")).duration_s > 0.3


def test_lru_keeps_the_most_recent_prompts_and_survives_a_torn_file(tmp_path: Path) -> None:
    cache = PromptCache(tmp_path, memory_items=2)
    audio = np.linspace(-0.5, 0.5, 480, dtype=np.float32)
    keys = [cache_key(f"prompt {i}", "espeak", "en-us", VoiceOptions(), 48000) for i in range(3)]
    for key in keys:
        cache.put(key, SynthResult(audio.copy(), 48000, "espeak", "en-us"))
    assert len(cache) == 2 and cache.get_memory(keys[0]) is None
    loaded = cache.get(keys[0])
    assert loaded is not None and np.array_equal(loaded.audio, audio), "evicted from memory, found on disk"
    torn = next(tmp_path.rglob(f"{keys[1]}.npz"))
    torn.write_bytes(b"not an npz")
    cache.clear_memory()
    assert cache.get(keys[1]) is None and not torn.exists()
