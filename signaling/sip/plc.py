"""Packet-loss concealment for G.711 at 8 kHz, after the idea of ITU-T G.711 Appendix I.

A lost stretch is filled by repeating the last pitch period of the decoded
history (pitch found by normalized autocorrelation between 5 and 15 ms),
at full level for the first 10 ms, then fading by 20 % per 10 ms to silence
after 60 ms.  When audio resumes, the first 4 ms of the good signal are
cross-faded with the continued synthetic signal so no click is heard.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

RATE = 8000
HISTORY = 390  # 48.75 ms: three periods of the lowest pitch searched
MIN_PITCH = 40  # 5 ms (200 Hz)
MAX_PITCH = 120  # 15 ms (66 Hz)
CORR_LEN = 160  # 20 ms compared when searching the pitch
FULL_LEVEL = 80  # the first 10 ms are repeated at full level
FADE_PER_SAMPLE = 0.2 / 80  # then 20 % less per 10 ms
MERGE = 32  # 4 ms cross-fade back into real audio


def estimate_pitch(history: np.ndarray) -> int:
    """The lag (in samples) in [MIN_PITCH, MAX_PITCH] whose shifted history matches the recent past best."""
    target = history[-CORR_LEN:]
    region = history[-CORR_LEN - MAX_PITCH:-MIN_PITCH]
    windows = sliding_window_view(region, CORR_LEN)  # window i starts MAX_PITCH - i samples back
    dots = windows @ target
    energy = np.einsum("ij,ij->i", windows, windows) + 1e-9
    score = dots / np.sqrt(energy)
    best = int(np.argmax(score))
    return MAX_PITCH - best


class Concealer:
    """Owns the decoded history of one stream and the state of the concealment in progress."""

    def __init__(self) -> None:
        self._history = np.zeros(HISTORY, dtype=np.float32)
        self._period = np.zeros(0, dtype=np.float32)
        self._phase = 0
        self._lost = 0  # samples concealed in the current loss

    @property
    def concealing(self) -> bool:
        return self._lost > 0

    def _remember(self, pcm: np.ndarray) -> None:
        if len(pcm) >= HISTORY:
            self._history = pcm[-HISTORY:].astype(np.float32)
        else:
            self._history = np.concatenate([self._history[len(pcm):], pcm]).astype(np.float32)

    def _synthesize(self, n: int, start: int) -> np.ndarray:
        """``n`` samples of the repeated period, with the fade for positions ``start``.. of the loss."""
        idx = (self._phase + np.arange(n)) % len(self._period)
        out = self._period[idx]
        pos = start + np.arange(n)
        gain = np.clip(1.0 - np.maximum(pos - FULL_LEVEL, 0) * FADE_PER_SAMPLE, 0.0, 1.0)
        return (out * gain).astype(np.float32)

    def good(self, pcm: np.ndarray) -> np.ndarray:
        """Pass real audio through; right after a loss, cross-fade into it."""
        out = pcm.astype(np.float32)
        if self._lost > 0:
            n = min(MERGE, len(out))
            if n:
                synthetic = self._synthesize(n, self._lost)
                ramp = np.linspace(0.0, 1.0, n, endpoint=False, dtype=np.float32)
                out = out.copy()
                out[:n] = ramp * out[:n] + (1.0 - ramp) * synthetic
            self._lost = 0
        self._remember(out)
        return out

    def conceal(self, n: int) -> np.ndarray:
        """``n`` samples standing in for lost audio."""
        if self._lost == 0:
            if float(np.max(np.abs(self._history))) < 1e-4:
                self._period = np.zeros(MIN_PITCH, dtype=np.float32)
            else:
                self._period = self._history[-estimate_pitch(self._history):].copy()
            self._phase = 0
        out = self._synthesize(n, self._lost)
        self._phase = (self._phase + n) % len(self._period)
        self._lost += n
        self._remember(out)
        return out

    def reset(self) -> None:
        self._history[:] = 0.0
        self._lost = 0
