"""Streaming STFT analysis and overlap-add synthesis, batched across streams.

One STFT frame per 10 ms chunk: the hop equals the chunk (480 samples at
48 kHz) and the window spans ``overlap`` hops (3 by default: 30 ms, 33.3 Hz
bins).  Analysis and synthesis use a square-root periodic Hann window, so an
unmodified spectrum reconstructs the input exactly, delayed by
``window - hop`` samples (20 ms for the default).  The per-stream state is
two small real buffers; this module only defines the arithmetic, the stage
keeps the buffers in its slot pool.
"""

from __future__ import annotations

import math

import torch


class StreamingStft:
    """Window, sizes and the per-chunk analysis/synthesis of a streaming STFT.

    Owns no per-stream state: :meth:`analyze` and :meth:`synthesize` take the
    input history ``[N, window - hop]`` and the overlap-add tail
    ``[N, window - hop]`` and return their updated values.
    """

    def __init__(self, hop: int, overlap: int = 3, device: torch.device | str = "cpu") -> None:
        if overlap < 2:
            raise ValueError("overlap must be at least 2 hops")
        self.hop = hop
        self.window_length = hop * overlap
        self.bins = self.window_length // 2 + 1
        periodic_hann = torch.hann_window(self.window_length, periodic=True, dtype=torch.float64)
        # sqrt-Hann analysis x sqrt-Hann synthesis sums to overlap/2 across hops.
        root = periodic_hann.sqrt()
        self.analysis_window = root.to(torch.float32).to(device)
        self.synthesis_window = (root / (overlap / 2.0)).to(torch.float32).to(device)

    @property
    def latency_samples(self) -> int:
        """Delay of the reconstructed signal behind the input, in samples."""
        return self.window_length - self.hop

    @property
    def history_length(self) -> int:
        return self.window_length - self.hop

    def bin_of_frequency(self, hz: float, sample_rate: int) -> int:
        """Index of the first bin at or above ``hz`` (clamped to the bin count)."""
        return min(self.bins, math.ceil(hz * self.window_length / sample_rate))

    def analyze(self, chunk: torch.Tensor, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Spectrum ``[N, bins]`` of the frame ending with ``chunk`` ``[N, hop]``, and the new history."""
        frame = torch.cat((history, chunk), dim=1)
        spectrum = torch.fft.rfft(frame * self.analysis_window, dim=1)
        return spectrum, frame[:, self.hop :]

    def synthesize(self, spectrum: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Output chunk ``[N, hop]`` from ``spectrum`` ``[N, bins]`` and the new overlap-add tail."""
        frame = torch.fft.irfft(spectrum, n=self.window_length, dim=1) * self.synthesis_window
        head = frame[:, : self.history_length] + tail
        out = head[:, : self.hop]
        new_tail = torch.cat((head[:, self.hop :], frame[:, self.history_length :]), dim=1)
        return out, new_tail
