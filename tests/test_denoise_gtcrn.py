"""GTCRN (the official streaming ONNX graph, 16 kHz inside a 48 kHz stage) on real recordings."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import torch

from enhancers.audio_io import read_48k, read_mono, resample, write_wav
from enhancers.denoise.gtcrn import GTCRNStage
from enhancers.denoise.gtcrn_graph import (
    CACHE_SHAPES,
    gtcrn_model_path,
    gtcrn_session,
    shipped_session,
    split_caches,
    stack_caches,
)
from enhancers.denoise.streaming import run_streams
from enhancers.eval.metrics import si_sdr
from enhancers.registry import create_stage, parse_stage_list
from enhancers.stage import CHUNK, BatchContext, StageStream
from tests.test_denoise_nsnet2_rnnoise import EVAL, SR, babble
from tests.test_enhancers_cli import ENHANCERS


def kitchen_mix(seconds: float = 4.0, snr_db: float = 5.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clean VCTK speech plus a real kitchen recording at ``snr_db``: (noisy, clean, noise)."""
    clean = read_48k(EVAL / "speech" / "vctk_p286_011_48k.wav")[: int(seconds * SR)]
    noise = read_48k(EVAL / "noise" / "doing_the_dishes.wav")[5 * SR : 5 * SR + len(clean)]
    noise = noise * np.sqrt(np.mean(clean**2) / np.mean(noise**2) / 10 ** (snr_db / 10))
    return (clean + noise).astype(np.float32), clean, noise.astype(np.float32)


def pause_energy(x: np.ndarray, clean: np.ndarray) -> float:
    """Mean power of ``x`` over the 10 ms blocks where the clean speech is 30 dB below its peak block."""
    n = len(clean) // CHUNK * CHUNK
    blocks = np.mean(clean[:n].reshape(-1, CHUNK) ** 2, axis=1)
    pauses = blocks < blocks.max() * 1e-3
    assert pauses.mean() > 0.1  # the clip has pauses to measure
    return float(np.mean(x[:n].reshape(-1, CHUNK)[pauses] ** 2))


def test_registry_and_model_from_the_wheel() -> None:
    assert gtcrn_model_path().is_file()
    native, onnx = create_stage("denoise:gtcrn"), create_stage("denoise:gtcrn", runtime="onnx")
    assert isinstance(native, GTCRNStage) and native.net is not None and native.session is None
    assert isinstance(onnx, GTCRNStage) and onnx.net is None and onnx.session is not None
    assert [s.spec for s in parse_stage_list("limiter,denoise:gtcrn")] == ["denoise:gtcrn", "limiter"]


def test_batched_graph_matches_the_shipped_file_stream_by_stream() -> None:
    """The load-time rewrite (free batch) against the wheel's batch-1 file, one call per stream."""
    shipped, batched = shipped_session(), gtcrn_session()
    rng = np.random.default_rng(0)
    streams = 4
    alone = [{k: np.zeros(v, np.float32) for k, v in CACHE_SHAPES.items()} for _ in range(streams)]
    together = stack_caches(alone)
    for _ in range(25):
        mix = (rng.standard_normal((streams, 257, 1, 2)) * rng.uniform(0.01, 5.0, (streams, 1, 1, 1)))
        mix = mix.astype(np.float32)
        ref = []
        for i in range(streams):
            enh, *caches = shipped.run(None, {"mix": mix[i : i + 1], **alone[i]})
            alone[i] = dict(zip(CACHE_SHAPES, caches))
            ref.append(enh)
        enh, *caches = batched.run(None, {"mix": mix, **together})
        together = dict(zip(CACHE_SHAPES, caches))
        expected = np.concatenate(ref)
        np.testing.assert_allclose(enh, expected, atol=1e-5 * float(np.abs(expected).max()))
    for mine, theirs in zip(split_caches(together, streams), alone):
        for name in CACHE_SHAPES:
            np.testing.assert_allclose(mine[name], theirs[name], atol=1e-4)


def test_native_runtime_matches_the_onnx_session_on_real_noisy_speech() -> None:
    """The native step (enhancers/denoise/gtcrn_native.py) against the batched ONNX Runtime session,
    stage against stage on the same chunks: four streams of noisy speech, one opened 3 chunks late
    (another phase of the 16 ms frames against the 10 ms chunks), one leaving after 1.5 s and one
    joining at 2 s on the slot it freed.  Float32 rounding apart the outputs agree: >= 40 dB SNR."""
    seconds, chunks = 4.0, 400
    noisy, _, _ = kitchen_mix(seconds)
    speech = read_48k(EVAL / "speech" / "cmu_arctic_us_aew_a0001.wav")
    speech = np.tile(speech, int(np.ceil(len(noisy) / len(speech))))[: len(noisy)]
    tap = read_48k(EVAL / "noise" / "running_tap.wav")[: len(noisy)]
    tap_mix = (speech + tap * np.sqrt(np.mean(speech**2) / np.mean(tap**2))).astype(np.float32)
    signals = (noisy, np.resize(babble(seconds), len(noisy)), tap_mix, noisy[::-1].copy())  # babble: 3.1 s, looped
    spans = ((0, chunks), (3, chunks), (0, 150), (200, chunks))  # [open, close) in chunks
    stages = {"native": GTCRNStage(), "onnx": GTCRNStage(runtime="onnx")}
    out = {name: [np.zeros(chunks * CHUNK, np.float32) for _ in signals] for name in stages}
    slots: dict[str, dict[int, int]] = {name: {} for name in stages}
    for name, stage in stages.items():
        handles: dict[int, StageStream] = {}
        for t in range(chunks):
            for i, (start, stop) in enumerate(spans):
                if t == start:
                    handles[i] = stage.stream()
                    slots[name][i] = handles[i].slot
                if t == stop and i in handles:
                    handles.pop(i).close()
            live = sorted(handles)
            audio = np.stack([signals[i][t * CHUNK : (t + 1) * CHUNK] for i in live])
            y = stage.process(torch.from_numpy(audio), [handles[i] for i in live], BatchContext()).numpy()
            for row, i in enumerate(live):
                out[name][i][t * CHUNK : (t + 1) * CHUNK] = y[row]
    assert slots["native"][3] == slots["native"][2]  # the joining stream reuses the freed slot's state rows
    for i, (start, stop) in enumerate(spans):
        ref, mine = (out[name][i][start * CHUNK : stop * CHUNK] for name in ("onnx", "native"))
        assert np.mean(ref**2) > 1e-5  # the model's output, not silence
        snr = 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - mine).astype(np.float64) ** 2))
        assert snr >= 40.0, f"stream {i}: {snr:.1f} dB"


def test_one_chunk_in_one_chunk_out_and_declared_latency() -> None:
    stage = GTCRNStage()
    stream = stage.stream(atten_lim_db=0.0)  # 0 dB limit: the noisy spectrum back, the framing alone
    for _ in range(7):
        chunk = stage.process(torch.zeros(1, CHUNK), [stream], BatchContext())
        assert chunk.shape == (1, CHUNK) and chunk.dtype == torch.float32
    stream.close()
    impulse = np.zeros(SR // 4, dtype=np.float32)
    impulse[6001] = 0.5
    out = run_streams(stage, [impulse], [{"atten_lim_db": 0.0}], compensate_latency=False)[0]
    assert int(np.argmax(np.abs(out))) - 6001 == stage.latency_samples
    # speech through the framing and both resamplers comes back as its 0-8 kHz band
    speech = read_48k(EVAL / "speech" / "vctk_p286_011_48k.wav")[: 2 * SR]
    back = run_streams(stage, [speech], [{"atten_lim_db": 0.0}])[0]
    band = resample(resample(speech, SR, 16_000), 16_000, SR)
    assert si_sdr(back[SR // 10 : -SR // 10], band[SR // 10 : -SR // 10]) > 30.0


def test_reduces_noise_and_keeps_speech() -> None:
    noisy, clean, noise = kitchen_mix()
    b_noisy = babble(4.0)
    b_clean = read_48k(EVAL / "noisy" / "pesq_speech_clean.wav")[: len(b_noisy)]
    stage = GTCRNStage()
    out, noise_out, clean_out, b_out = run_streams(stage, [noisy, noise, clean, b_noisy])
    assert si_sdr(out, clean) > si_sdr(noisy, clean) + 4.0
    assert si_sdr(b_out, b_clean) > si_sdr(b_noisy, b_clean) + 1.5  # recorded babble at 0 dB: harder
    assert 10 * np.log10(pause_energy(noisy, clean) / pause_energy(out, clean)) > 12.0
    tail = slice(SR // 4, None)
    assert 10 * np.log10(np.mean(noise[tail] ** 2) / np.mean(noise_out[tail] ** 2)) > 12.0
    assert np.corrcoef(out, clean)[0, 1] > np.corrcoef(noisy, clean)[0, 1] + 0.05
    assert np.corrcoef(clean_out, clean)[0, 1] > 0.97  # clean speech passes nearly untouched


def test_attenuation_limit_bounds_the_suppression() -> None:
    _, _, noise = kitchen_mix(2.0)
    stage = GTCRNStage()
    free, limited = run_streams(stage, [noise, noise], [{}, {"atten_lim_db": 6.0}])
    tail = slice(SR // 4, None)
    reduction = {k: 10 * np.log10(np.mean(noise[tail] ** 2) / np.mean(y[tail] ** 2))
                 for k, y in (("free", free), ("limited", limited))}
    assert reduction["free"] > 12.0
    assert 3.0 < reduction["limited"] < 7.0


def test_streams_are_independent_at_any_frame_phase() -> None:
    """Three streams in one batch, two opened together (their frames share session calls) and one
    3 chunks later (another phase of the 16 ms hop against the 10 ms chunks), give what each
    gives alone."""
    noisy, _, _ = kitchen_mix(1.0)
    other = read_48k(EVAL / "noise" / "running_tap.wav")[: len(noisy)]
    n = len(noisy) // CHUNK
    signals, starts = (noisy, other, noisy[::-1].copy()), (0, 3, 0)
    alone = [run_streams(GTCRNStage(), [x], compensate_latency=False)[0][: n * CHUNK] for x in signals]
    stage = GTCRNStage()
    handles: dict[int, StageStream] = {}
    out = [np.zeros(n * CHUNK, np.float32) for _ in signals]
    for t in range(n + 3):
        live = [i for i in range(len(signals)) if 0 <= t - starts[i] < n]
        for i in live:
            if i not in handles:
                handles[i] = stage.stream()
        k = [t - starts[i] for i in live]
        audio = np.stack([signals[i][j * CHUNK : (j + 1) * CHUNK] for i, j in zip(live, k)])
        y = stage.process(torch.from_numpy(audio), [handles[i] for i in live], BatchContext()).numpy()
        for row, (i, j) in enumerate(zip(live, k)):
            out[i][j * CHUNK : (j + 1) * CHUNK] = y[row]
    for mine, reference in zip(out, alone):
        np.testing.assert_allclose(mine, reference, atol=1e-6)
    first = handles[0]
    first.reset()  # a reset stream starts over: the same output as a fresh one
    chunks = [torch.from_numpy(noisy[j * CHUNK : (j + 1) * CHUNK][None]) for j in range(20)]
    again = np.concatenate([stage.process(c, [first], BatchContext()).numpy()[0] for c in chunks])
    np.testing.assert_allclose(again, alone[0][: 20 * CHUNK], atol=1e-6)


def test_hostile_samples_stay_finite() -> None:
    stage = GTCRNStage()
    stream = stage.stream()
    bad = torch.full((1, CHUNK), float("nan"))
    bad[0, ::3] = float("inf")
    for _ in range(10):
        assert torch.isfinite(stage.process(bad, [stream], BatchContext())).all()


def test_cli_processes_a_file(tmp_path: Path) -> None:
    noisy, clean, _ = kitchen_mix(3.0)
    src, dst = tmp_path / "in.wav", tmp_path / "out.wav"
    write_wav(src, noisy, SR)
    proc = subprocess.run(
        [str(ENHANCERS), "process", "--stages", "denoise:gtcrn", "--device", "cpu", str(src), str(dst)],
        capture_output=True, check=False, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    y, rate = read_mono(dst)
    assert rate == SR and len(y) == len(noisy)
    assert si_sdr(y, clean) > si_sdr(noisy, clean) + 4.0  # latency compensated: aligned with the input
