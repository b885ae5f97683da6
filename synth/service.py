"""SynthService: the asyncio facade the media server calls to turn prompt text into 48 kHz audio.

Synthesis is CPU work in native code that is not thread-safe, and its rendering (resampling, peak
normalization, padding, the watermark) passes over tens of MiB for a long prompt.  It runs off the event
loop, requests serialized, in one of two places (``isolation``):

* ``"thread"`` (the default; the CLI, benchmarks, tests): one dedicated worker thread of this process.
  Its numpy work holds the interpreter lock for stretches, so an event loop that paces audio stalls.
* ``"process"`` (the media server): one spawned, niced process of its own (:mod:`synth.process`),
  started on the first request and again after it died; this process only receives the finished audio
  as 16-bit samples (a shared mapping for long prompts: nothing is pickled, copied or converted here).

Every request goes through the :class:`~synth.cache.PromptCache`: a memory hit is answered on the event
loop without a hop, identical requests already in flight share one synthesis, and a miss is
synthesized, resampled to ``output_rate`` (48 kHz by default, mono), peak-normalized, padded with
silence to a whole number of 10 ms chunks (480 samples at 48 kHz, the server's frame size) and stored
(in memory; on disk too when the cache has a directory: written by the worker thread or the process).
The memory cache holds float32 audio in thread isolation and int16 audio in process isolation.

``synthesize`` returns float32 audio; ``synthesize(..., pcm16=True)`` int16 (full scale 32767), which is
what a prompt track plays: in process isolation that is the audio as it came back, no conversion.
Returned audio arrays are read-only: they are shared with the cache. Copy before changing them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Self

import numpy as np

from synth.cache import PromptCache, cache_key
from synth.engine import SynthEngine, SynthResult, VoiceOptions
from synth.process import EngineInfo, SynthProcess, settings_for
from synth.render import (
    CHUNK_SECONDS,
    DEFAULT_PEAK_DBFS,
    OUTPUT_RATE,
    from_pcm16,
    normalize_peak,
    pad_to_chunks,
    release_heap,
    render,
    resample_to,
    to_pcm16,
)

__all__ = ["CHUNK_SECONDS", "DEFAULT_PEAK_DBFS", "OUTPUT_RATE", "SynthService", "normalize_peak", "pad_to_chunks",
           "resample_to"]

Isolation = Literal["thread", "process"]
CONVERT_OFF_LOOP_SAMPLES = 48_000  # dtype conversions of more than 1 s of audio run on a thread


class SynthService:
    """Owns the engine (or the synthesis process), the prompt cache, the single worker thread and the
    in-flight table.

    ``engine_factory`` (process isolation): a picklable callable the child builds its engine with
    (default: ``EspeakEngine``); ``engine`` must then be None.  ``nice``: the child's nice increment.
    """

    def __init__(
        self,
        engine: SynthEngine | None = None,
        cache: PromptCache | None = None,
        output_rate: int = OUTPUT_RATE,
        peak_dbfs: float | None = DEFAULT_PEAK_DBFS,
        *,
        isolation: Isolation = "thread",
        engine_factory: Callable[[], SynthEngine] | None = None,
        nice: int = 10,
        request_timeout_s: float | None = None,
    ) -> None:
        self.cache = cache if cache is not None else PromptCache()
        self.output_rate = output_rate
        self.peak_dbfs = peak_dbfs
        self.isolation = isolation
        self.engine: SynthEngine | None = None  # the engine in this process (thread isolation only)
        self.process: SynthProcess | None = None  # the synthesis process (process isolation only)
        if isolation == "process":
            if engine is not None:
                raise ValueError("process isolation builds its engine in the child: pass engine_factory")
            settings = settings_for(engine_factory, output_rate, peak_dbfs, self.cache.directory, nice)
            self.process = SynthProcess(settings) if request_timeout_s is None else SynthProcess(
                settings, request_timeout_s=request_timeout_s)
        elif isolation == "thread":
            if engine is None:
                if engine_factory is not None:
                    engine = engine_factory()
                else:
                    from synth.espeak import EspeakEngine

                    engine = EspeakEngine()
            self.engine = engine
        else:
            raise ValueError(f"isolation must be 'thread' or 'process', not {isolation!r}")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="synth")
        self._inflight: dict[str, asyncio.Task[SynthResult]] = {}
        self._closed = False

    async def engine_info(self) -> EngineInfo:
        """Engine name, identity, default voice and text limit (process isolation: starts the process)."""
        if self.engine is not None:
            return EngineInfo.of(self.engine)
        assert self.process is not None
        return await self.process.engine_info()

    async def _key(self, text: str, options: VoiceOptions) -> str:
        if self.engine is not None:
            identity, default_voice = self.engine.identity(), self.engine.default_voice()
        else:
            info = await self.engine_info()
            identity, default_voice = info.identity, info.default_voice
        voice = options.voice if options.voice is not None else default_voice
        return cache_key(text, identity, voice, options, self.output_rate)

    async def synthesize(self, text: str, options: VoiceOptions | None = None, *, pcm16: bool = False) -> SynthResult:
        """Speak ``text``: mono at ``output_rate``, float32 (``pcm16``: int16); raises the engine's
        SynthError subclasses."""
        if self._closed:
            raise RuntimeError("SynthService is closed")
        opts = options if options is not None else VoiceOptions()
        key = await self._key(text, opts)
        cached = self.cache.get_memory(key)
        if cached is not None:
            return await self._shaped(dataclasses.replace(cached, cache_hit=True), pcm16)
        task = self._inflight.get(key)
        if task is not None:  # the same prompt is being synthesized right now: share it
            result = await asyncio.shield(task)
            return await self._shaped(dataclasses.replace(result, cache_hit=True), pcm16)
        loop = asyncio.get_running_loop()
        if self.process is not None:
            task = loop.create_task(self._from_process(key, text, opts))
        else:
            task = loop.create_task(self._run_in_worker(loop, key, text, opts))
        self._inflight[key] = task
        task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        return await self._shaped(await asyncio.shield(task), pcm16)

    async def _shaped(self, result: SynthResult, pcm16: bool) -> SynthResult:
        """``result`` with its audio as int16 (``pcm16``) or float32, read-only (long ones converted off the loop)."""
        want = np.int16 if pcm16 else np.float32
        if result.audio.dtype == want:
            return result
        convert = to_pcm16 if pcm16 else from_pcm16
        if len(result.audio) > CONVERT_OFF_LOOP_SAMPLES:
            audio = await asyncio.to_thread(convert, result.audio)
        else:
            audio = convert(result.audio)
        audio.flags.writeable = False
        return dataclasses.replace(result, audio=audio)

    async def _from_process(self, key: str, text: str, options: VoiceOptions) -> SynthResult:
        assert self.process is not None
        result = await self.process.synthesize(key, text, options)
        self.cache.remember(key, result)  # memory only: the process wrote the disk cache, if any
        self.cache.count(hit=result.cache_hit)
        return result

    async def _run_in_worker(
        self, loop: asyncio.AbstractEventLoop, key: str, text: str, options: VoiceOptions
    ) -> SynthResult:
        return await loop.run_in_executor(self._executor, self._produce, key, text, options)

    def _produce(self, key: str, text: str, options: VoiceOptions) -> SynthResult:
        """Worker thread: disk cache, else synthesize, resample, normalize and store."""
        stored = self.cache.get(key)
        if stored is not None:
            return dataclasses.replace(stored, cache_hit=True)
        assert self.engine is not None
        result = render(self.engine, text, options, self.output_rate, self.peak_dbfs)
        self.cache.put(key, result)
        if len(result.audio) > CONVERT_OFF_LOOP_SAMPLES:
            release_heap()  # the rendering's buffers of a long prompt
        return result

    async def voices(self) -> list[str]:
        """The engine's voice names (read on the worker thread or in the process: it may touch the native library)."""
        if self.process is not None:
            return await self.process.voices()
        engine = self.engine
        assert engine is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, engine.voices)

    async def aclose(self) -> None:
        """Wait for running work, then stop the worker thread (and the synthesis process)."""
        self._closed = True
        pending = list(self._inflight.values())
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self._executor.shutdown(wait=False)
        if self.process is not None:
            await self.process.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()
