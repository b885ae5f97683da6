"""DeepFilterNet3's signal processing around the network, batched over streams.

Mirrors libDF (``lib.rs``): a Vorbis-windowed STFT (FFT 960, hop 480,
analysis-normalized), the ERB filterbank, and the two input features with
their exponential normalization states: log ERB band powers minus a running
mean, and the low-band complex spectrum divided by the square root of a
running magnitude.  Everything works on ``[B, ...]`` tensors where each row
is one stream; states are plain tensors the caller keeps per stream.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from enhancers.denoise.df3_assets import DF3Config

MEAN_NORM_INIT = (-60.0, -90.0)
UNIT_NORM_INIT = (0.001, 0.0001)


def erb_band_widths(sr: int, fft_size: int, nb_bands: int, min_nb_freqs: int) -> list[int]:
    """Number of FFT bins in each ERB band, computed in float32 like libDF's ``erb_fb``."""
    f32 = np.float32

    def freq2erb(hz: np.float32) -> np.float32:
        return f32(9.265) * f32(np.log1p(f32(hz) / (f32(24.7) * f32(9.265))))

    def erb2freq(n_erb: np.float32) -> np.float32:
        return f32(24.7) * f32(9.265) * (f32(np.exp(f32(n_erb) / f32(9.265))) - f32(1.0))

    freq_width = f32(sr) / f32(fft_size)
    erb_low = freq2erb(f32(0.0))
    erb_high = freq2erb(f32(sr // 2))
    step = (erb_high - erb_low) / f32(nb_bands)
    widths = [0] * nb_bands
    prev_freq = 0
    freq_over = 0
    for i in range(1, nb_bands + 1):
        f = erb2freq(erb_low + f32(i) * step)
        ratio = float(f / freq_width)
        fb = math.floor(ratio + 0.5)  # Rust f32::round: half away from zero
        nb_freqs = fb - prev_freq - freq_over
        if nb_freqs < min_nb_freqs:
            freq_over = min_nb_freqs - nb_freqs
            nb_freqs = min_nb_freqs
        else:
            freq_over = 0
        widths[i - 1] = nb_freqs
        prev_freq = fb
    widths[-1] += 1
    too_large = sum(widths) - (fft_size // 2 + 1)
    if too_large > 0:
        widths[-1] -= too_large
    assert sum(widths) == fft_size // 2 + 1
    return widths


def vorbis_window(fft_size: int) -> torch.Tensor:
    half = fft_size // 2
    i = np.arange(fft_size, dtype=np.float64)
    s = np.sin(0.5 * np.pi * (i + 0.5) / half)
    return torch.from_numpy(np.sin(0.5 * np.pi * s * s).astype(np.float32))


class DF3SignalProcessing(torch.nn.Module):
    """STFT, ERB filterbank and feature normalization of DF3 (no learned weights)."""

    erb_fb: torch.Tensor
    band_of_bin: torch.Tensor
    window: torch.Tensor
    analysis_window: torch.Tensor
    synthesis_window: torch.Tensor

    def __init__(self, config: DF3Config) -> None:
        super().__init__()
        self.config = config
        self.fft_size = config.fft_size
        self.hop = config.hop_size
        self.alpha = float(config.norm_alpha)
        self.wnorm = 1.0 / (config.fft_size**2 / (2 * config.hop_size))
        widths = erb_band_widths(config.sr, config.fft_size, config.nb_erb, config.min_nb_erb_freqs)
        self.erb_widths = widths
        band_of_bin = torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(widths))
        # [F, E]: averages bin powers into bands (1/width per bin, like compute_band_corr)
        fb = torch.zeros(config.n_freqs, config.nb_erb)
        fb[torch.arange(config.n_freqs), band_of_bin] = (
            1.0 / torch.tensor(widths, dtype=torch.float32)[band_of_bin]
        )
        self.register_buffer("erb_fb", fb, persistent=False)
        self.register_buffer("band_of_bin", band_of_bin, persistent=False)
        self.register_buffer("window", vorbis_window(config.fft_size), persistent=False)
        # analysis window with the libDF analysis normalization folded in
        self.register_buffer("analysis_window", vorbis_window(config.fft_size) * self.wnorm, persistent=False)
        # the inverse real FFT of libDF (realfft) is unnormalized; torch's divides by N
        self.register_buffer(
            "synthesis_window", vorbis_window(config.fft_size) * config.fft_size, persistent=False
        )

    # -- initial per-stream states -------------------------------------------------
    def initial_mean_norm(self) -> torch.Tensor:
        return torch.linspace(MEAN_NORM_INIT[0], MEAN_NORM_INIT[1], self.config.nb_erb)

    def initial_unit_norm(self) -> torch.Tensor:
        return torch.linspace(UNIT_NORM_INIT[0], UNIT_NORM_INIT[1], self.config.nb_df)

    # -- STFT -------------------------------------------------------------------------
    def analysis(self, chunk: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        """One STFT frame per row from ``mem`` (previous hop) and ``chunk`` ([B, hop]).

        Returns the complex spectrum [B, F]; the caller stores ``chunk`` as the next ``mem``.
        """
        frame = torch.cat([mem, chunk], dim=1) * self.analysis_window
        return torch.fft.rfft(frame, dim=1)

    def synthesis(self, spec: torch.Tensor, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse FFT, window, overlap-add: returns (output [B, hop], new mem [B, hop])."""
        frame = torch.fft.irfft(spec, n=self.fft_size, dim=1) * self.synthesis_window
        return frame[:, : self.hop] + mem, frame[:, self.hop :]

    # -- features ---------------------------------------------------------------------
    def erb_feature(self, spec: torch.Tensor, mean_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized log ERB band power [B, E] and the updated mean state."""
        power = spec.real.square() + spec.imag.square()
        db = torch.log10(power @ self.erb_fb + 1e-10) * 10.0
        state = db * (1.0 - self.alpha) + mean_state * self.alpha
        return (db - state) / 40.0, state

    def cplx_feature(self, spec: torch.Tensor, unit_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-normalized low-band spectrum (complex [B, nb_df]) and the updated state."""
        low = spec[:, : self.config.nb_df]
        state = low.abs() * (1.0 - self.alpha) + unit_state * self.alpha
        return low / state.sqrt(), state

    def expand_gains(self, gains: torch.Tensor) -> torch.Tensor:
        """ERB band gains [B, E] to per-bin gains [B, F]."""
        return gains.index_select(1, self.band_of_bin)
