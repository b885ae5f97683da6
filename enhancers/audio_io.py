"""Reading, writing and resampling WAV files for the CLI, eval and benchmarks."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from enhancers.stage import SAMPLE_RATE


def read_mono(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a sound file as float32 mono (channels averaged) and its sample rate."""
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return data.mean(axis=1).astype(np.float32), int(rate)


def resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    if src == dst:
        return x.astype(np.float32, copy=False)
    frac = Fraction(dst, src)
    return resample_poly(x, frac.numerator, frac.denominator).astype(np.float32)


def read_48k(path: str | Path) -> np.ndarray:
    """Read any sound file as 48 kHz mono float32."""
    x, rate = read_mono(path)
    return resample(x, rate, SAMPLE_RATE)


def write_wav(path: str | Path, x: np.ndarray, rate: int) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(x, -1.0, 1.0).astype(np.float32), rate, subtype="PCM_16")
