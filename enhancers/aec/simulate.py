"""Simulated echo scenarios built from real recordings, for evaluation and tests.

Far-end talk is real read speech; its echo is the speech convolved with a
measured room impulse response, delayed by a bulk (network + device) delay,
at a given echo return loss, with the echo level stepping by
``level_change_db`` halfway through (the echo path changes, the filter has to
re-converge).  Optional near-end speech makes it double talk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.signal import fftconvolve

from enhancers.audio_io import read_48k
from enhancers.stage import SAMPLE_RATE

EVAL_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "eval"
FAR_SPEECH = (
    "vctk_p286_011_48k.wav",
    "cmu_arctic_us_aew_a0001.wav",
    "cmu_arctic_us_axb_a0004.wav",
    "cmu_arctic_us_aew_a0002.wav",
    "cmu_arctic_us_axb_a0005.wav",
    "cmu_arctic_us_aew_a0003.wav",
    "cmu_arctic_us_axb_a0006.wav",
)
NEAR_SPEECH = ("xmas_44k.wav", "cmu_arctic_a0010.wav")
RIRS = ("impulse_response_0.wav", "rir_clap_44k.wav", "rir_48k.wav")


def rms_dbfs(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.square(x, dtype=np.float64)) + 1e-20))


def set_level(x: np.ndarray, dbfs: float) -> np.ndarray:
    return (x * 10 ** ((dbfs - rms_dbfs(x)) / 20)).astype(np.float32)


def speech(
    names: tuple[str, ...], seconds: float, eval_dir: Path = EVAL_DIR, gap_s: float = 0.25
) -> np.ndarray:
    """Real speech files back to back (with short pauses), looped to ``seconds``, at -20 dBFS."""
    n = int(seconds * SAMPLE_RATE)
    parts: list[np.ndarray] = []
    while sum(len(p) for p in parts) < n:
        for name in names:
            parts.append(read_48k(eval_dir / "speech" / name))
            parts.append(np.zeros(int(gap_s * SAMPLE_RATE), dtype=np.float32))
    return set_level(np.concatenate(parts)[:n], -20.0)


def room_response(name: str, eval_dir: Path = EVAL_DIR) -> np.ndarray:
    h = read_48k(eval_dir / "rir" / name)
    return (h / (np.max(np.abs(h)) + 1e-12)).astype(np.float32)


@dataclass
class EchoScenario:
    """One simulated stream: what the SFU sent (``far``), what came back (``mic``) and its parts."""

    far: np.ndarray
    mic: np.ndarray
    echo: np.ndarray
    near: np.ndarray
    change_at: int  # sample where the echo level steps
    true_delay_ms: float  # bulk delay + the room response's direct-path delay


def echo_scenario(
    far: np.ndarray,
    rir: np.ndarray,
    delay_ms: float,
    level_change_db: float = 0.0,
    echo_dbfs: float = -26.0,
    near: np.ndarray | None = None,
    noise_dbfs: float = -65.0,
    seed: int = 0,
) -> EchoScenario:
    """Mic = delayed, reverberant echo of ``far`` (+ ``near``) + white noise; level step at the midpoint."""
    n = len(far)
    shift = round(delay_ms * SAMPLE_RATE / 1000)
    echo = fftconvolve(far, rir)[:n]
    echo = np.concatenate([np.zeros(shift, dtype=np.float32), echo[: n - shift]])
    echo = set_level(echo, echo_dbfs)
    change_at = n // 2
    echo[change_at:] *= np.float32(10 ** (level_change_db / 20))
    rng = np.random.default_rng(seed)
    noise = set_level(rng.standard_normal(n).astype(np.float32), noise_dbfs)
    near_sig = np.zeros(n, dtype=np.float32) if near is None else near[:n].astype(np.float32)
    mic = (echo + near_sig + noise).astype(np.float32)
    direct = float(np.argmax(np.abs(rir))) * 1000.0 / SAMPLE_RATE
    return EchoScenario(
        far=far, mic=mic, echo=echo, near=near_sig, change_at=change_at, true_delay_ms=delay_ms + direct
    )
