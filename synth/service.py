"""SynthService: the asyncio facade the media server calls to turn prompt text into 48 kHz audio.

Synthesis is CPU work in native code that is not thread-safe, so it runs off the event loop on one
dedicated worker thread (requests are serialized there). Every request goes through the
:class:`~synth.cache.PromptCache`: a memory hit is answered on the event loop without a thread hop,
identical requests already in flight share one synthesis, and a miss is synthesized, resampled to
``output_rate`` (48 kHz by default, float32 mono), peak-normalized, padded with silence to a whole
number of 10 ms chunks (480 samples at 48 kHz, the server's frame size) and stored.

Returned audio arrays are read-only: they are shared with the cache. Copy before changing them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Self

import numpy as np

from synth.cache import PromptCache, cache_key
from synth.engine import SynthEngine, SynthResult, VoiceOptions

OUTPUT_RATE = 48_000
CHUNK_SECONDS = 0.01
DEFAULT_PEAK_DBFS = -3.0


@functools.lru_cache(maxsize=8)
def _antialias_filter(up: int, down: int) -> np.ndarray:
    """The FIR filter scipy's resample_poly would design for this ratio, designed once per ratio."""
    from scipy.signal import firwin  # imported here: scipy.signal takes seconds to import

    widest = max(up, down)
    return np.asarray(firwin(2 * 10 * widest + 1, 1.0 / widest, window=("kaiser", 5.0)))


def resample_to(audio: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling (scipy's resample_poly, default Kaiser filter) to ``target_rate``; float32 out."""
    if source_rate == target_rate or audio.size == 0:
        return audio.astype(np.float32)
    from scipy.signal import resample_poly

    ratio = Fraction(target_rate, source_rate)
    up, down = ratio.numerator, ratio.denominator
    return resample_poly(audio, up, down, window=_antialias_filter(up, down)).astype(np.float32)


def pad_to_chunks(audio: np.ndarray, chunk: int) -> np.ndarray:
    """Append silence so the length is a multiple of ``chunk`` samples."""
    short = (-len(audio)) % chunk
    return np.concatenate([audio, np.zeros(short, dtype=np.float32)]) if short else audio


def normalize_peak(audio: np.ndarray, peak_dbfs: float | None) -> np.ndarray:
    """Scale so the loudest sample sits at ``peak_dbfs`` (prompts from any engine sound equally loud)."""
    if peak_dbfs is None or audio.size == 0:
        return np.clip(audio, -1.0, 1.0)
    peak = float(np.max(np.abs(audio)))
    if peak <= 1e-6:
        return audio
    return np.clip(audio * (10.0 ** (peak_dbfs / 20.0) / peak), -1.0, 1.0).astype(np.float32)


class SynthService:
    """Owns the engine, the prompt cache, the single synthesis worker thread and the in-flight table."""

    def __init__(
        self,
        engine: SynthEngine | None = None,
        cache: PromptCache | None = None,
        output_rate: int = OUTPUT_RATE,
        peak_dbfs: float | None = DEFAULT_PEAK_DBFS,
    ) -> None:
        if engine is None:
            from synth.espeak import EspeakEngine

            engine = EspeakEngine()
        self.engine = engine
        self.cache = cache if cache is not None else PromptCache()
        self.output_rate = output_rate
        self.peak_dbfs = peak_dbfs
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="synth")
        self._inflight: dict[str, asyncio.Task[SynthResult]] = {}
        self._closed = False

    def _key(self, text: str, options: VoiceOptions) -> str:
        voice = options.voice if options.voice is not None else self.engine.default_voice()
        return cache_key(text, self.engine.identity(), voice, options, self.output_rate)

    async def synthesize(self, text: str, options: VoiceOptions | None = None) -> SynthResult:
        """Speak ``text``: float32 mono at ``output_rate``; raises the engine's SynthError subclasses."""
        if self._closed:
            raise RuntimeError("SynthService is closed")
        opts = options if options is not None else VoiceOptions()
        key = self._key(text, opts)
        cached = self.cache.get_memory(key)
        if cached is not None:
            return dataclasses.replace(cached, cache_hit=True)
        task = self._inflight.get(key)
        if task is not None:  # the same prompt is being synthesized right now: share it
            result = await asyncio.shield(task)
            return dataclasses.replace(result, cache_hit=True)
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._run_in_worker(loop, key, text, opts))
        self._inflight[key] = task
        task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        return await asyncio.shield(task)

    async def _run_in_worker(
        self, loop: asyncio.AbstractEventLoop, key: str, text: str, options: VoiceOptions
    ) -> SynthResult:
        return await loop.run_in_executor(self._executor, self._produce, key, text, options)

    def _produce(self, key: str, text: str, options: VoiceOptions) -> SynthResult:
        """Worker thread: disk cache, else synthesize, resample, normalize and store."""
        stored = self.cache.get(key)
        if stored is not None:
            return dataclasses.replace(stored, cache_hit=True)
        started = time.perf_counter()
        native = self.engine.synthesize(text, options)
        audio = normalize_peak(
            resample_to(native.audio, native.sample_rate, self.output_rate), self.peak_dbfs
        )
        audio = pad_to_chunks(audio.astype(np.float32), round(self.output_rate * CHUNK_SECONDS))
        extra = {**native.extra, "synthesis_ms": round((time.perf_counter() - started) * 1000.0, 3)}
        result = SynthResult(
            audio=audio, sample_rate=self.output_rate, engine=native.engine, voice=native.voice, extra=extra
        )
        self.cache.put(key, result)
        return result

    async def voices(self) -> list[str]:
        """The engine's voice names (read on the worker thread: it may touch the native library)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.engine.voices)

    async def aclose(self) -> None:
        """Wait for running work, then stop the worker thread."""
        self._closed = True
        pending = list(self._inflight.values())
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self._executor.shutdown(wait=False)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()
