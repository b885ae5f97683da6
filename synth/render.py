"""From an engine's native output to the server's prompt audio: resample, peak-normalize, pad, 16-bit.

These are the heavy steps of a prompt (besides the engine and its watermark): on a 5000-character
prompt (minutes of audio) each is a pass over tens of MiB of samples.  :func:`render` runs them all;
:class:`~synth.service.SynthService` calls it on its worker thread, or (the media server) in the
synthesis process of :mod:`synth.process`, which hands the result back as 16-bit samples
(:func:`to_pcm16`).
"""

from __future__ import annotations

import ctypes
import functools
import time
from fractions import Fraction

import numpy as np

from synth.engine import SynthEngine, SynthResult, VoiceOptions

OUTPUT_RATE = 48_000
CHUNK_SECONDS = 0.01
DEFAULT_PEAK_DBFS = -3.0
PCM16_SCALE = 32767.0
_CONVERT_BLOCK = 1 << 20  # samples converted at a time (bounds the temporaries of a long prompt)


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
    return np.concatenate([audio, np.zeros(short, dtype=audio.dtype)]) if short else audio


def normalize_peak(audio: np.ndarray, peak_dbfs: float | None) -> np.ndarray:
    """Scale so the loudest sample sits at ``peak_dbfs`` (prompts from any engine sound equally loud)."""
    if peak_dbfs is None or audio.size == 0:
        return np.clip(audio, -1.0, 1.0)
    peak = float(np.max(np.abs(audio)))
    if peak <= 1e-6:
        return audio
    return np.clip(audio * (10.0 ** (peak_dbfs / 20.0) / peak), -1.0, 1.0).astype(np.float32)


def render(engine: SynthEngine, text: str, options: VoiceOptions, output_rate: int = OUTPUT_RATE,
           peak_dbfs: float | None = DEFAULT_PEAK_DBFS) -> SynthResult:
    """Synthesize (the engine adds its watermark), resample to ``output_rate``, peak-normalize and pad to a
    whole number of 10 ms chunks: float32 mono."""
    started = time.perf_counter()
    native = engine.synthesize(text, options)
    audio = normalize_peak(resample_to(native.audio, native.sample_rate, output_rate), peak_dbfs)
    native.audio = np.zeros(0, np.float32)  # let go of the native samples before padding copies
    audio = pad_to_chunks(audio.astype(np.float32, copy=False), round(output_rate * CHUNK_SECONDS))
    extra = {**native.extra, "synthesis_ms": round((time.perf_counter() - started) * 1000.0, 3)}
    return SynthResult(audio=audio, sample_rate=output_rate, engine=native.engine, voice=native.voice, extra=extra)


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] -> int16 (rounded, clipped), a block at a time; int16 is returned as it is."""
    if audio.dtype == np.int16:
        return audio
    out = np.empty(len(audio), dtype=np.int16)
    for start in range(0, len(audio), _CONVERT_BLOCK):
        block = np.clip(audio[start:start + _CONVERT_BLOCK], -1.0, 1.0) * np.float32(PCM16_SCALE)
        np.rint(block, out=block)
        out[start:start + len(block)] = block
    return out


def from_pcm16(audio: np.ndarray) -> np.ndarray:
    """int16 -> float32 in [-1, 1] (the inverse of :func:`to_pcm16`); float32 is returned as it is."""
    if audio.dtype == np.float32:
        return audio
    out = np.empty(len(audio), dtype=np.float32)
    for start in range(0, len(audio), _CONVERT_BLOCK):
        np.multiply(audio[start:start + _CONVERT_BLOCK], np.float32(1.0 / PCM16_SCALE),
                    out=out[start:start + _CONVERT_BLOCK], casting="unsafe")
    return out


def release_heap() -> None:
    """Hand freed heap back to the OS: glibc keeps large freed buffers (a long prompt's synthesis
    buffers, tens of MiB) in the process otherwise, once its mmap threshold has grown."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
