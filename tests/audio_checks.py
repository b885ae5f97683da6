"""Signal checks used by the end-to-end tests: does what arrived sound like what was sent?"""

from __future__ import annotations

import numpy as np
from scipy.signal import fftconvolve


def best_alignment(received: np.ndarray, sent: np.ndarray) -> tuple[float, int]:
    """Max normalized cross-correlation of ``received`` against a window of ``sent``, and the lag.

    ``sent`` may be longer (a looped source): the received clip is searched in it.
    """
    r = received.astype(np.float64)
    s = sent.astype(np.float64)
    if len(r) == 0 or len(s) == 0:
        return 0.0, 0
    if len(r) > len(s):
        r = r[: len(s)]
    corr = fftconvolve(s, r[::-1], mode="valid")  # corr[k] = sum_n s[n+k] r[n]
    csum = np.concatenate([[0.0], np.cumsum(s * s)])
    win = csum[len(r):] - csum[: len(s) - len(r) + 1]
    denom = np.sqrt(np.maximum(win, 1e-9 * len(r)) * float(np.dot(r, r))) + 1e-12
    ncc = corr / denom
    k = int(np.argmax(ncc))
    return float(ncc[k]), k


def longest_silence_ms(x: np.ndarray, rate: int = 48_000, block_ms: float = 5.0,
                       threshold: float = 1e-4) -> float:
    """Longest run of blocks whose RMS is under ``threshold`` (a gap), in ms."""
    n = int(rate * block_ms / 1000)
    if len(x) < n:
        return 0.0
    blocks = x[: len(x) // n * n].reshape(-1, n)
    quiet = np.sqrt(np.mean(blocks * blocks, axis=1)) < threshold
    best = run = 0
    for q in quiet:
        run = run + 1 if q else 0
        best = max(best, run)
    return best * block_ms


def looped(x: np.ndarray, times: int = 3) -> np.ndarray:
    return np.concatenate([x] * times)


def content_match(received: np.ndarray, sent: np.ndarray, window_s: float = 0.25,
                  rate: int = 48_000, min_rms: float = 0.005) -> float:
    """Median, over voiced windows of ``received``, of the best normalized correlation with ``sent``.

    Robust to codec phase changes, concealed packets and jitter-buffer
    adjustments that shift the timeline between windows.
    """
    from scipy.signal import resample_poly

    received = resample_poly(received, 1, 3)  # 16 kHz is plenty to recognise speech
    sent = resample_poly(sent, 1, 3)
    rate = rate // 3
    n = int(window_s * rate)
    scores = []
    for i in range(0, len(received) - n + 1, n):
        w = received[i:i + n]
        if np.sqrt(np.mean(w * w)) < min_rms:
            continue
        scores.append(best_alignment(w, sent)[0])
    return float(np.median(scores)) if scores else 0.0
