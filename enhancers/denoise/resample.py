"""Streaming integer-factor resampling (48 kHz <-> 16 kHz) for stages whose model runs at a lower rate.

:func:`audio_io.resample` resamples whole files; a stage needs the same chunk
by chunk, with the filter history carried from one 10 ms chunk to the next.
Both directions use one linear-phase Kaiser low-pass FIR (odd length ``L``,
cutoff below the low rate's Nyquist), so each adds exactly ``(L - 1) / 2``
samples of delay at the high rate, known in advance and declared by the stage.
The interpolator is the polyphase form (one sub-filter per output phase),
the decimator computes only the kept outputs: no work on samples thrown away.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.signal import firwin


def lowpass_taps(factor: int, length: int, cutoff: float, beta: float) -> np.ndarray:
    """Linear-phase low-pass for a ``factor``:1 rate change: ``cutoff`` as a fraction of the low
    rate's Nyquist frequency, Kaiser window ``beta``; unity gain at DC."""
    if length % 2 == 0:
        raise ValueError("an odd number of taps keeps the delay a whole number of samples")
    return firwin(length, cutoff / factor, window=("kaiser", beta)).astype(np.float64)


class StreamingDecimator:
    """Low-pass then keep every ``factor``-th sample, one chunk at a time (one stream).

    Output sample ``j`` of the stream is the filtered input at high-rate index
    ``factor * j``, delayed by :attr:`delay` high-rate samples.
    """

    def __init__(self, taps: np.ndarray, factor: int) -> None:
        self.factor = factor
        self.taps_reversed = np.ascontiguousarray(taps[::-1])
        self.history = np.zeros(len(taps) - 1)
        self.delay = (len(taps) - 1) // 2

    def process(self, x: np.ndarray) -> np.ndarray:
        """``x``: a multiple of ``factor`` samples at the high rate; returns ``len(x) // factor``."""
        if len(x) % self.factor:
            raise ValueError(f"chunk of {len(x)} samples is not a multiple of {self.factor}")
        buf = np.concatenate([self.history, x])
        windows = sliding_window_view(buf, len(self.taps_reversed))[:: self.factor]
        self.history = buf[len(x) :]
        return windows @ self.taps_reversed


class StreamingInterpolator:
    """Insert ``factor - 1`` zeros after each sample and low-pass (gain ``factor``), polyphase.

    Delay: :attr:`delay` samples at the high rate, the same low-pass as the
    decimator's giving the same delay.
    """

    def __init__(self, taps: np.ndarray, factor: int) -> None:
        self.factor = factor
        per_phase = -(-len(taps) // factor)
        padded = np.zeros(per_phase * factor)
        padded[: len(taps)] = taps * factor
        # phase p of output sample factor*m + p: sum_j h[factor*j + p] x[m - j], windows run oldest first
        self.phases = np.ascontiguousarray(padded.reshape(per_phase, factor)[::-1])  # [per_phase, factor]
        self.history = np.zeros(per_phase - 1)
        self.delay = (len(taps) - 1) // 2

    def process(self, x: np.ndarray) -> np.ndarray:
        """``x``: samples at the low rate; returns ``len(x) * factor`` samples at the high rate."""
        buf = np.concatenate([self.history, x])
        windows = sliding_window_view(buf, self.phases.shape[0])  # [len(x), per_phase]
        self.history = buf[len(x) :]
        return (windows @ self.phases).reshape(-1)
