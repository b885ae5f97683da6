"""Streaming 8 kHz <-> 48 kHz resamplers for the phone path (factor 6, polyphase FIR).

Both directions keep their filter history between calls, so a phone's audio
can be converted 10 ms at a time without clicks at chunk borders.  One
linear-phase low-pass (cutoff 3.7 kHz, Kaiser window) serves as the
interpolation filter going up and as the anti-alias filter going down.
"""

from __future__ import annotations

import functools

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

FACTOR = 6  # 48 kHz / 8 kHz
TAPS = 241  # 40 taps per phase; transition band ~3.35-4.05 kHz at 48 kHz


@functools.lru_cache(maxsize=2)
def lowpass(taps: int = TAPS, cutoff_hz: float = 3700.0, rate: int = 48_000) -> np.ndarray:
    from scipy.signal import firwin

    return np.asarray(firwin(taps, cutoff_hz, window=("kaiser", 7.0), fs=rate), dtype=np.float64)


class Upsampler:
    """Owns the input history of one 8 kHz -> 48 kHz conversion."""

    def __init__(self) -> None:
        h = lowpass() * FACTOR
        per_phase = -(-len(h) // FACTOR)
        padded = np.zeros(per_phase * FACTOR)
        padded[: len(h)] = h
        # y[6n + k] = sum_j h[6j + k] * x[n - j]: column k holds phase k, row j the tap for x[n - j]
        self._phases = padded.reshape(per_phase, FACTOR)[::-1].copy()  # rows ordered oldest..newest input
        self._history = np.zeros(per_phase - 1)

    def process(self, x: np.ndarray) -> np.ndarray:
        """``n`` samples at 8 kHz -> ``6 n`` samples at 48 kHz (float32)."""
        if len(x) == 0:
            return np.zeros(0, dtype=np.float32)
        buf = np.concatenate([self._history, x.astype(np.float64)])
        windows = sliding_window_view(buf, len(self._phases))  # [n, per_phase], oldest first
        out = windows @ self._phases  # [n, FACTOR]
        self._history = buf[len(buf) - len(self._history):]
        return out.reshape(-1).astype(np.float32)


class Downsampler:
    """Owns the input history of one 48 kHz -> 8 kHz conversion."""

    def __init__(self) -> None:
        self._taps = lowpass()[::-1].copy()
        self._history = np.zeros(len(self._taps) - 1)
        self._carry = np.zeros(0)

    def process(self, x: np.ndarray) -> np.ndarray:
        """48 kHz samples -> 8 kHz samples; a length not divisible by 6 carries over to the next call."""
        buf = np.concatenate([self._history, self._carry, x.astype(np.float64)])
        usable = (len(buf) - len(self._history)) // FACTOR * FACTOR
        if usable == 0:
            self._carry = buf[len(self._history):]
            return np.zeros(0, dtype=np.float32)
        end = len(self._history) + usable
        windows = sliding_window_view(buf[:end], len(self._taps))  # window i ends at sample i + taps - 1
        out = windows[::FACTOR] @ self._taps  # output m sits on input 6m: the grid of the 8 kHz samples
        self._carry = buf[end:]
        self._history = buf[end - len(self._history):end]
        return out.astype(np.float32)
