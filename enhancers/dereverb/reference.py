"""Reference dereverberators from ``nara_wpe`` on whole signals, for evaluation and benchmarks.

* :func:`offline_wpe` - ``nara_wpe.wpe.wpe`` (iterative, non-causal: the
  upper bound) on the same 48 kHz STFT and with the same taps and delay as the
  stage, so the only difference is online versus offline estimation;
* :func:`offline_wpe_16k` - the same at nara_wpe's usual set-up (16 kHz,
  512-point window, 128 hop), a check that the 48 kHz STFT loses nothing;
* :func:`nara_online_wpe` - ``nara_wpe.wpe.OnlineWPE`` frame by frame, the
  per-stream numpy implementation the stage follows.

All take and return 48 kHz mono float32 arrays aligned with the input.
"""

from __future__ import annotations

import numpy as np
import torch

from enhancers.audio_io import resample
from enhancers.stage import CHUNK, SAMPLE_RATE

WINDOW = 3 * CHUNK  # the stage's default STFT: 30 ms window, 10 ms hop
HOP = CHUNK


def _window(length: int) -> torch.Tensor:
    return torch.hann_window(length, periodic=True, dtype=torch.float64).sqrt()


def stft(x: np.ndarray, window: int = WINDOW, hop: int = HOP) -> np.ndarray:
    """Complex STFT ``[bins, frames]`` with a sqrt-Hann window (centred frames)."""
    signal = torch.from_numpy(np.asarray(x, dtype=np.float64))
    spec = torch.stft(signal, window, hop, window=_window(window), return_complex=True, center=True)
    return spec.numpy()


def istft(spec: np.ndarray, length: int, window: int = WINDOW, hop: int = HOP) -> np.ndarray:
    out = torch.istft(torch.from_numpy(spec), window, hop, window=_window(window), center=True, length=length)
    return out.numpy().astype(np.float32)


def offline_wpe(
    x: np.ndarray, taps: int = 10, delay: int = 3, iterations: int = 3, window: int = WINDOW, hop: int = HOP
) -> np.ndarray:
    """nara_wpe's offline WPE on one channel (``delay`` frames, ``taps`` taps, 3 iterations)."""
    from nara_wpe.wpe import wpe

    spec = stft(x, window, hop)
    out = wpe(spec[:, None, :], taps=taps, delay=delay, iterations=iterations, statistics_mode="full")
    return istft(out[:, 0, :], len(x), window, hop)


def offline_wpe_16k(x: np.ndarray, taps: int = 10, delay: int = 3, iterations: int = 3) -> np.ndarray:
    """Offline WPE at nara_wpe's customary 16 kHz, 512/128 STFT; returned at 48 kHz."""
    low = resample(x, SAMPLE_RATE, 16_000)
    out = offline_wpe(low, taps, delay, iterations, window=512, hop=128)
    back = resample(out, 16_000, SAMPLE_RATE)
    return np.pad(back, (0, max(0, len(x) - len(back))))[: len(x)]


class NaraOnlineWpe:
    """One stream of ``nara_wpe.wpe.OnlineWPE`` (single channel) with its frame buffer.

    nara's online window ends two frames earlier than its offline one, so the
    stage's ``delay`` maps to ``delay - 2`` here (at least 0).
    """

    def __init__(self, bins: int, taps: int = 10, delay: int = 3, alpha: float = 0.997) -> None:
        from nara_wpe.wpe import OnlineWPE

        self.wpe = OnlineWPE(taps=taps, delay=max(0, delay - 2), alpha=alpha, channel=1, frequency_bins=bins)

    def step(self, frame: np.ndarray) -> np.ndarray:
        """Dereverberate one spectrum ``[bins]``."""
        out: np.ndarray = self.wpe.step_frame(frame[:, None])[:, 0]
        return out


def nara_online_wpe(
    x: np.ndarray, taps: int = 10, delay: int = 3, alpha: float = 0.997, window: int = WINDOW, hop: int = HOP
) -> np.ndarray:
    """nara_wpe's ``OnlineWPE`` run frame by frame over the stage's STFT."""
    spec = stft(x, window, hop)
    online = NaraOnlineWpe(spec.shape[0], taps, delay, alpha)
    out = np.stack([online.step(spec[:, t]) for t in range(spec.shape[1])], axis=1)
    return istft(out, len(x), window, hop)
