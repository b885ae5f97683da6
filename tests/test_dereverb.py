"""Dereverberation stage: it removes reverberation from real measured-RIR speech,
its latency is what it declares, batching is exact, and streams are isolated."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.signal import fftconvolve

from enhancers.audio_io import read_48k
from enhancers.dereverb import DereverbStage
from enhancers.eval.metrics import pesq_wb, si_sdr
from enhancers.stage import CHUNK, SAMPLE_RATE, BatchContext, StageStream

EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "eval"


def run(stage: DereverbStage, streams: list[StageStream], signals: np.ndarray) -> np.ndarray:
    """Feed ``signals`` ``[N, T]`` chunk by chunk; return the outputs ``[N, T]``."""
    chunks = torch.from_numpy(np.ascontiguousarray(signals, dtype=np.float32)).view(len(streams), -1, CHUNK)
    out = [stage.process(chunks[:, i], streams, BatchContext()) for i in range(chunks.shape[1])]
    return torch.cat(out, dim=1).numpy()


def aligned(stage: DereverbStage, output: np.ndarray, length: int) -> np.ndarray:
    return output[..., stage.latency_samples : stage.latency_samples + length]


def pad_for_latency(stage: DereverbStage, x: np.ndarray) -> np.ndarray:
    n = -(-(x.shape[-1] + stage.latency_samples) // CHUNK) * CHUNK
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: the 10 ms ops are tiny, and threads only contend on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    files = ["cmu_arctic_us_aew_a0001.wav", "cmu_arctic_us_axb_a0004.wav", "cmu_arctic_us_aew_a0002.wav"]
    return np.concatenate([read_48k(EVAL / "speech" / f) for f in files])


def test_reduces_reverberation_of_measured_rir(speech: np.ndarray) -> None:
    rir = read_48k(EVAL / "rir" / "impulse_response_0.wav")
    rir = rir / np.abs(rir).max()
    peak = int(np.abs(rir).argmax())
    reverberant = fftconvolve(speech, rir)[: len(speech)]
    target = fftconvolve(speech, rir[: peak + SAMPLE_RATE // 20])[: len(speech)]  # direct path + 50 ms
    scale = 0.3 / np.abs(reverberant).max()
    reverberant, target = reverberant * scale, target * scale

    stage = DereverbStage()
    out = aligned(
        stage, run(stage, [stage.stream()], pad_for_latency(stage, reverberant[None]))[0], len(speech)
    )

    assert np.isfinite(out).all()
    gain_sdr = si_sdr(out, target) - si_sdr(reverberant, target)
    gain_pesq = pesq_wb(out, target, SAMPLE_RATE) - pesq_wb(reverberant, target, SAMPLE_RATE)
    assert gain_sdr > 0.5, gain_sdr
    assert gain_pesq > 0.05, gain_pesq


def test_latency_is_declared_and_within_one_hop_plus_chunk() -> None:
    stage = DereverbStage()
    assert stage.latency_samples <= stage.stft.hop + CHUNK
    x = np.zeros((1, 20 * CHUNK), dtype=np.float32)
    position = 3 * CHUNK + 123
    x[0, position] = 0.5
    out = run(stage, [stage.stream()], x)[0]
    assert int(np.abs(out).argmax()) == position + stage.latency_samples
    # A fresh stream's filter is zero: the impulse comes through intact.
    expected = np.zeros_like(out)
    expected[position + stage.latency_samples] = 0.5
    np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("update_stride", [1, 2])
def test_batched_streams_equal_each_stream_alone(speech: np.ndarray, update_stride: int) -> None:
    rng = np.random.default_rng(0)
    rir = read_48k(EVAL / "rir" / "rir_clap_44k.wav")
    length = 150 * CHUNK
    signals = np.stack(
        [fftconvolve(speech[o : o + length], rir)[:length] * 0.1 for o in (0, 40_000, 90_000)]
        + [0.01 * rng.standard_normal(length)]
    ).astype(np.float32)
    options: list[dict[str, Any]] = [{}, {"taps": 6}, {"delay": 2, "alpha": 0.99}, {}]

    alone = []
    for signal, opts in zip(signals, options):
        stage = DereverbStage(update_stride=update_stride)
        alone.append(run(stage, [stage.stream(**opts)], signal[None])[0])

    # Together in one stage, with non-consecutive slots and a shuffled row order.
    stage = DereverbStage(block_rows=3, update_stride=update_stride)
    spare = [stage.stream() for _ in range(2)]
    streams = [stage.stream(**opts) for opts in options]
    spare[0].close()
    order = [2, 0, 3, 1]
    together = run(stage, [streams[i] for i in order], signals[order])
    for row, i in enumerate(order):
        np.testing.assert_allclose(together[row], alone[i], atol=2e-5, rtol=0)


def test_stream_state_is_isolated_and_reset(speech: np.ndarray) -> None:
    length = 100 * CHUNK
    reverberant = fftconvolve(speech[:length], read_48k(EVAL / "rir" / "rir_48k.wav"))[:length] * 0.05
    reverberant = reverberant.astype(np.float32)

    fresh = DereverbStage()
    reference = run(fresh, [fresh.stream()], reverberant[None])[0]

    stage = DereverbStage()
    busy, other = stage.stream(), stage.stream()
    run(stage, [busy, other], np.stack([reverberant, reverberant[::-1].copy()]))
    # A stream opened in a released slot, and a reset stream, both start from scratch.
    other.close()
    reopened = stage.stream()
    busy.reset()
    out = run(stage, [busy, reopened], np.stack([reverberant, reverberant]))
    np.testing.assert_allclose(out[0], reference, atol=2e-5, rtol=0)
    np.testing.assert_allclose(out[1], reference, atol=2e-5, rtol=0)


def test_muted_stream_and_steady_tone_stay_finite() -> None:
    stage = DereverbStage()
    # A steady tone leaves all but one direction of each bin's correlation matrix unexcited; with
    # alpha=0.8 their inverse would grow by 0.8**-1000 (float32 overflow) without the bound.
    muted, tone = stage.stream(), stage.stream(alpha=0.8)
    t = np.arange(1000 * CHUNK) / SAMPLE_RATE
    signals = np.stack([np.zeros_like(t), 0.3 * np.sin(2 * np.pi * 1000.0 * t)]).astype(np.float32)
    out = run(stage, [muted, tone], signals)
    assert np.isfinite(out).all()
    assert np.abs(out[0]).max() == 0.0
    for key, value in stage.state.items():
        assert torch.isfinite(value[tone.slot]).all(), key


def test_rejects_bad_stream_options() -> None:
    stage = DereverbStage(taps=8, max_delay=4)
    with pytest.raises(ValueError):
        stage.stream(taps=9)
    with pytest.raises(ValueError):
        stage.stream(delay=5)
    with pytest.raises(ValueError):
        stage.stream(alpha=1.5)


def test_the_wpe_kernel_computes_what_the_torch_ops_compute(speech: np.ndarray) -> None:
    """The numba kernel of one WPE frame (the CPU path) against the torch step (the reference and the GPU
    path), frame by frame from the same state, two streams of reverberant speech."""
    from enhancers.dereverb.wpe import WpeState

    stage = DereverbStage()
    wpe = stage.wpe
    kernel, torch_step = wpe._step_kernel, wpe._step
    frames = {"n": 0}

    def both(frame: torch.Tensor, state: WpeState, group: int) -> torch.Tensor:
        ref_state = state.map(lambda t: t.clone())
        ref = torch_step(frame, ref_state, group)
        got = kernel(frame, state, group)
        scale = float(frame.abs().max()) + 1e-6
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4 * scale)
        torch.testing.assert_close(state.filter, ref_state.filter, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(state.roots[group], ref_state.roots[group], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(state.root_scale, ref_state.root_scale, rtol=1e-4, atol=0.0)
        assert torch.equal(state.history, ref_state.history)
        frames["n"] += 1
        return got

    wpe._step_kernel = both  # type: ignore[method-assign]
    rir = read_48k(EVAL / "rir" / "rir_48k.wav")
    wet = fftconvolve(speech[: 4 * SAMPLE_RATE], rir)[: 4 * SAMPLE_RATE]
    signals = np.stack([wet, np.roll(wet, 12_345)]).astype(np.float32) * 0.3
    run(stage, [stage.stream(), stage.stream()], signals)
    assert frames["n"] >= 4 * SAMPLE_RATE // CHUNK
