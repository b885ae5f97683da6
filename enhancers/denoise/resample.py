"""Streaming integer-factor resampling (48 kHz <-> 16 kHz) for stages whose model runs at a lower rate.

:func:`audio_io.resample` resamples whole files; a stage needs the same chunk
by chunk, with the filter history carried from one 10 ms chunk to the next,
for many streams at once.  Both directions use one linear-phase Kaiser
low-pass FIR (odd length ``L``, cutoff below the low rate's Nyquist), so each
adds exactly ``(L - 1) / 2`` samples of delay at the high rate, known in
advance and declared by the stage.  The interpolator is the polyphase form
(one sub-filter per output phase), the decimator computes only the kept
outputs.  Rows are streams: ``[N, n]`` chunks with ``[N, history]`` state.
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


class Decimator:
    """Low-pass then keep every ``factor``-th sample.  Shared by all streams; each stream keeps
    its own history (:meth:`initial_history`).  Output sample ``j`` of a stream is the filtered
    input at high-rate index ``factor * j``, delayed by :attr:`delay` high-rate samples."""

    def __init__(self, taps: np.ndarray, factor: int) -> None:
        self.factor = factor
        self.taps_reversed = np.ascontiguousarray(taps[::-1])
        self.delay = (len(taps) - 1) // 2

    def initial_history(self) -> np.ndarray:
        return np.zeros(len(self.taps_reversed) - 1)

    def process(self, history: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``x`` ``[N, n]`` (n a multiple of ``factor``), ``history`` ``[N, L - 1]``:
        returns ``[N, n // factor]`` and the new history."""
        if x.shape[-1] % self.factor:
            raise ValueError(f"chunk of {x.shape[-1]} samples is not a multiple of {self.factor}")
        buf = np.concatenate([history, x], axis=-1)
        windows = sliding_window_view(buf, len(self.taps_reversed), axis=-1)[..., :: self.factor, :]
        return windows @ self.taps_reversed, buf[..., x.shape[-1] :]


class Interpolator:
    """Insert ``factor - 1`` zeros after each sample and low-pass (gain ``factor``), polyphase.
    Delay: :attr:`delay` samples at the high rate, as the decimator with the same taps."""

    def __init__(self, taps: np.ndarray, factor: int) -> None:
        self.factor = factor
        per_phase = -(-len(taps) // factor)
        padded = np.zeros(per_phase * factor)
        padded[: len(taps)] = taps * factor
        # phase p of output sample factor*m + p: sum_j h[factor*j + p] x[m - j]; windows run oldest first
        self.phases = np.ascontiguousarray(padded.reshape(per_phase, factor)[::-1])  # [per_phase, factor]
        self.delay = (len(taps) - 1) // 2

    def initial_history(self) -> np.ndarray:
        return np.zeros(self.phases.shape[0] - 1)

    def process(self, history: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``x`` ``[N, n]`` at the low rate: returns ``[N, n * factor]`` and the new history."""
        buf = np.concatenate([history, x], axis=-1)
        windows = sliding_window_view(buf, self.phases.shape[0], axis=-1)  # [N, n, per_phase]
        y = windows @ self.phases  # [N, n, factor]
        return y.reshape(*y.shape[:-2], -1), buf[..., x.shape[-1] :]
