"""VAD stages find speech in real recordings; the limiter stops clipping without touching quiet speech."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from enhancers.audio_io import read_48k
from enhancers.eval.metrics import si_sdr
from enhancers.file_pipeline import process_array
from enhancers.limiter import LimiterStage
from enhancers.stage import CHUNK, BatchContext

EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "eval"
CEILING = 10 ** (-1 / 20)  # the limiter's default -1 dBFS
PAD = 72_000  # 1.5 s of noise only before and after the speech


def speech_in_noise(noise_name: str, noise_peak: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real speech between two stretches of real noise; per-chunk speech / noise-only masks."""
    speech = read_48k(EVAL / "speech" / "vctk_p286_011_48k.wav")
    noise = np.tile(read_48k(EVAL / "noise" / noise_name), 4)
    mix = np.zeros(len(speech) + 2 * PAD, dtype=np.float32)
    mix[PAD : PAD + len(speech)] = speech
    mix += noise[: len(mix)] / np.abs(noise).max() * noise_peak
    clean = np.zeros_like(mix)
    clean[PAD : PAD + len(speech)] = speech
    frames = clean[: len(clean) // CHUNK * CHUNK].reshape(-1, CHUNK)
    level = 10 * np.log10((frames**2).mean(axis=1) + 1e-12)
    is_speech = level > level.max() - 25.0
    noise_only = np.zeros(len(frames), dtype=bool)
    noise_only[: PAD // CHUNK] = True
    noise_only[(PAD + len(speech)) // CHUNK + 50 :] = True  # after the 0.5 s release
    return mix, is_speech, noise_only


@pytest.mark.parametrize("spec", ["vad", "vad:silero"])
@pytest.mark.parametrize("noise", ["running_tap.wav", "freesound_573577_48k.wav"])
def test_vad_high_on_speech_low_on_noise(spec: str, noise: str) -> None:
    mix, is_speech, noise_only = speech_in_noise(noise, noise_peak=0.12)  # about 18-20 dB SNR
    run = process_array(mix, spec, device="cpu")
    np.testing.assert_array_equal(run.audio, mix)  # VAD leaves the audio alone
    prob = run.side["vad"][: len(is_speech)]
    assert prob[is_speech].mean() > 0.9
    assert prob[noise_only].mean() < 0.15
    assert (prob[noise_only] > 0.5).mean() < 0.1


def test_vad_silence_is_not_speech() -> None:
    speech = read_48k(EVAL / "speech" / "cmu_arctic_us_axb_a0004.wav")
    x = np.concatenate([np.zeros(48_000, dtype=np.float32), speech])
    for spec in ("vad", "vad:silero"):
        prob = process_array(x, spec, device="cpu").side["vad"]
        assert prob[:100].max() < 0.05
        assert prob[100:].max() > 0.9


def test_limiter_keeps_boosted_speech_under_ceiling() -> None:
    speech = read_48k(EVAL / "speech" / "vctk_p286_011_48k.wav")
    boosted = speech * 10 ** (12 / 20)  # +12 dB: peaks near +6 dBFS
    assert np.abs(boosted).max() > 1.5
    out = process_array(boosted, "limiter", device="cpu").audio
    assert np.abs(out).max() <= CEILING + 1e-6
    assert np.corrcoef(out, boosted)[0, 1] > 0.95  # same speech, just turned down at the peaks


def test_limiter_leaves_quiet_speech_alone() -> None:
    for name, peak in (("vctk_p286_011_48k.wav", 0.25), ("xmas_44k.wav", 0.5)):
        speech = read_48k(EVAL / "speech" / name)
        quiet = speech / np.abs(speech).max() * peak
        out = process_array(quiet, "limiter", device="cpu").audio
        assert si_sdr(out, quiet) > 40.0
        assert np.abs(out - quiet).max() < 1e-4


def test_limiter_hot_speech_only_touched_at_peaks() -> None:
    speech = read_48k(EVAL / "speech" / "vctk_p286_011_48k.wav")
    hot = speech / np.abs(speech).max() * 0.9  # -0.9 dBFS peaks: inside the soft knee
    out = process_array(hot, "limiter", device="cpu").audio
    assert np.abs(out).max() <= CEILING + 1e-6
    assert si_sdr(out, hot) > 30.0


@settings(max_examples=25, deadline=None)
@given(
    gain_db=st.floats(-20.0, 40.0),
    freq=st.floats(20.0, 20_000.0),
    impulses=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_limiter_never_exceeds_ceiling(gain_db: float, freq: float, impulses: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = np.arange(8 * CHUNK) / 48_000
    wave = np.sin(2 * np.pi * freq * t) + 0.3 * rng.standard_normal(len(t))
    wave[rng.integers(0, len(t), impulses)] = 5.0
    x = (wave * 10 ** (gain_db / 20)).astype(np.float32).reshape(2, 4 * CHUNK)  # two streams
    stage = LimiterStage()
    streams = [stage.stream(), stage.stream()]
    for k in range(4):
        chunk = torch.from_numpy(np.ascontiguousarray(x[:, k * CHUNK : (k + 1) * CHUNK]))
        y = stage.process(chunk, streams, BatchContext())
        assert float(y.abs().max()) <= CEILING + 1e-6
        assert torch.all(y.abs() <= chunk.abs() + 1e-6)  # gain only, never boosts
