"""DeepFilterNet3 in batched torch: same output as DeepFilterNet's own runtime, streaming-correct.

Real recordings from ../shared/eval; a few seconds each to keep the suite fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.signal import correlate

from enhancers.audio_io import read_48k
from enhancers.denoise.df3 import DeepFilterNet3Stage
from enhancers.denoise.df3_assets import load_df3_assets
from enhancers.denoise.df3_net import DF3Network
from enhancers.denoise.int8 import resolve_precision
from enhancers.denoise.libdf import LibDfStream
from enhancers.denoise.streaming import run_streams
from enhancers.eval.metrics import si_sdr
from enhancers.registry import create_stage
from enhancers.stage import CHUNK, BatchContext, StageStream

EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "eval"
SR = 48_000


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Small per-frame ops run fastest single-threaded on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stage() -> DeepFilterNet3Stage:
    return DeepFilterNet3Stage(native_streams=0)


def babble(seconds: float, start: float = 0.0) -> np.ndarray:
    x = read_48k(EVAL / "noisy" / "pesq_speech_babble_0dB.wav")
    return x[int(start * SR) : int((start + seconds) * SR)]


def speech_in_noise(seconds: float, snr_db: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """Clean VCTK speech plus a real kitchen recording at ``snr_db``: (noisy, clean)."""
    clean = read_48k(EVAL / "speech" / "vctk_p286_011_48k.wav")[: int(seconds * SR)]
    noise = read_48k(EVAL / "noise" / "doing_the_dishes.wav")[SR : SR + len(clean)]
    noise = noise * np.sqrt(np.mean(clean**2) / np.mean(noise**2) / 10 ** (snr_db / 10))
    return (clean + noise).astype(np.float32), clean


def test_registry_builds_df3() -> None:
    assert isinstance(create_stage("denoise"), DeepFilterNet3Stage)
    assert isinstance(create_stage("denoise:df3"), DeepFilterNet3Stage)


def test_network_matches_onnx_export_frame_by_frame() -> None:
    """Our streaming steps give what onnxruntime gives running the official graphs on the sequence."""
    ort = pytest.importorskip("onnxruntime")
    assets = load_df3_assets()
    net = DF3Network(assets)
    rng = np.random.default_rng(0)
    frames = 12
    feat_erb = (rng.standard_normal((1, 1, frames, 32)) * 0.5).astype(np.float32)
    feat_spec = (rng.standard_normal((1, 2, frames, 96)) * 0.5).astype(np.float32)
    session = {
        k: ort.InferenceSession(getattr(assets, k).model.SerializeToString())
        for k in ("enc", "erb_dec", "df_dec")
    }
    e0, e1, e2, e3, emb, c0, lsnr = session["enc"].run(None, {"feat_erb": feat_erb, "feat_spec": feat_spec})
    mask = session["erb_dec"].run(None, {"emb": emb, "e3": e3, "e2": e2, "e1": e1, "e0": e0})[0]
    coefs = session["df_dec"].run(None, {"emb": emb, "c0": c0})[0]

    erb_hist, spec_hist = torch.zeros(1, 32, 2), torch.zeros(1, 96, 2, 2)
    enc_h = [torch.zeros(1, 256)]
    erb_h = [torch.zeros(1, 256), torch.zeros(1, 256)]
    df_h = [torch.zeros(1, 256), torch.zeros(1, 256)]
    pending = torch.zeros(1, 96, 4, 10)
    with torch.inference_mode():
        for t in range(frames):
            spec_t = torch.from_numpy(feat_spec[:, :, t]).transpose(1, 2)  # [1, 96, re/im]
            skips, emb_t, c0_t, lsnr_t, erb_hist, spec_hist, enc_h = net.encoder(
                torch.from_numpy(feat_erb[:, 0, t]), spec_t, erb_hist, spec_hist, enc_h
            )
            gains, erb_h = net.erb_decoder(emb_t, skips, erb_h)
            coef_t, df_h, pending = net.df_decoder(emb_t, c0_t, df_h, pending)
            assert abs(float(lsnr_t[0]) - float(lsnr[0, t, 0])) < 1e-3
            np.testing.assert_allclose(gains.numpy(), mask[:, 0, t], atol=1e-4)
            np.testing.assert_allclose(coef_t.reshape(1, 96, 10).numpy(), coefs[:, t], atol=1e-4)


def test_batched_torch_matches_libdf_runtime(stage: DeepFilterNet3Stage) -> None:
    """Real noisy streams batched in torch vs one libDF state each: SI-SDR(ours, theirs) >= 30 dB,
    also with the per-stream attenuation limit and post filter set like libDF's."""
    babble_mix, kitchen = babble(1.2), speech_in_noise(1.2)[0]
    signals = [babble_mix, kitchen, babble_mix, kitchen]
    options: list[dict[str, float]] = [{}, {}, {"atten_lim_db": 12.0}, {"post_filter_beta": 0.02}]
    ours = run_streams(stage, signals, options, compensate_latency=False)
    for sig, opt, out in zip(signals, options, ours):
        ref = LibDfStream(**opt).process(sig)
        assert si_sdr(out[: len(ref)], ref) >= 30.0


def test_latency_is_declared_and_measured_with_an_impulse(stage: DeepFilterNet3Stage) -> None:
    assert stage.latency_samples == 480 + 2 * 480  # STFT overlap + two frames of lookahead
    impulse = np.zeros(SR // 2, dtype=np.float32)
    impulse[12_000] = 0.5
    out = run_streams(stage, [impulse], [{"atten_lim_db": 6.0}], compensate_latency=False)[0]
    assert int(np.argmax(np.abs(out))) - 12_000 == stage.latency_samples
    noisy, clean = speech_in_noise(1.5, snr_db=20.0)
    out = run_streams(stage, [noisy], compensate_latency=False)[0]
    xcorr = correlate(out, clean, mode="full", method="fft")
    assert int(np.argmax(xcorr)) - (len(clean) - 1) == stage.latency_samples


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_chunk_by_chunk_equals_whole_file(precision: str) -> None:
    """Streaming 10 ms at a time gives the samples of processing the whole signals at once.

    In float32 up to rounding (GEMMs of other shapes sum in another order); with int8 GRUs
    such a rounding difference can move an activation across a quantization step: -90 dB.
    The torch step both ways (the fused kernels' streaming step: the next test)."""
    stage = DeepFilterNet3Stage(native_streams=0, precision=precision, runtime="torch")
    signals = np.stack([babble(1.0), speech_in_noise(1.0)[0]])
    streamed = run_streams(stage, list(signals), compensate_latency=False)
    whole = stage.enhance(torch.from_numpy(signals), block_frames=40).numpy()
    for s, w in zip(streamed, whole):
        np.testing.assert_allclose(s, w, atol=1e-5 if stage.precision == "fp32" else 5e-5)


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_fused_kernels_match_the_torch_step(precision: str) -> None:
    """The CPU's default streaming path (numba kernels around the same GEMMs) against the torch step on
    real speech in real noise: float32 equal up to rounding; with int8 GRUs a last-bit difference can
    move an activation across a quantization step, and the recurrence carries it: as close as int8 is
    to float32 (>= 30 dB), and as good against the clean speech."""
    fused = DeepFilterNet3Stage(precision=precision)
    if fused.runtime != "fused":
        pytest.skip("no fused runtime here (int8 GRUs without FBGEMM)")
    torch_step = DeepFilterNet3Stage(precision=precision, runtime="torch")
    noisy, clean = speech_in_noise(3.0)
    signals = [noisy, babble(3.0)]
    ours, reference = run_streams(fused, signals), run_streams(torch_step, signals)
    for a, b in zip(ours, reference):
        if fused.precision == "fp32":
            np.testing.assert_allclose(a, b, atol=2e-5)
        assert si_sdr(a, b) >= 30.0
    assert abs(si_sdr(ours[0], clean) - si_sdr(reference[0], clean)) < 0.3


def test_batch_of_streams_equals_each_stream_alone() -> None:
    signals = [babble(0.8), speech_in_noise(0.8)[0], babble(0.8, start=1.5)]
    batched = run_streams(DeepFilterNet3Stage(native_streams=0), signals)
    for sig, out in zip(signals, batched):
        alone = run_streams(DeepFilterNet3Stage(native_streams=0), [sig])[0]
        np.testing.assert_allclose(out, alone, atol=2e-5)


def test_stream_state_is_isolated_across_slots_and_ticks(stage: DeepFilterNet3Stage) -> None:
    """Streams in any slot order, joining some ticks and not others, each get their own result."""
    a, b = babble(0.6), speech_in_noise(0.6)[0]
    ref_a = run_streams(DeepFilterNet3Stage(native_streams=0), [a], compensate_latency=False)[0]
    ref_b = run_streams(DeepFilterNet3Stage(native_streams=0), [b], compensate_latency=False)[0]
    gap = stage.stream()  # occupy a slot so the two streams are not contiguous
    sa, sb = stage.stream(), stage.stream()
    gap.close()
    out_a: list[np.ndarray] = []
    out_b: list[np.ndarray] = []
    ia = ib = 0
    for tick in range(2 * len(a) // CHUNK):
        rows: list[np.ndarray] = []
        streams: list[StageStream] = []
        sinks: list[list[np.ndarray]] = []
        if tick % 3 != 2 and ia < len(a) // CHUNK:  # stream a sits out every third tick
            rows.append(a[ia * CHUNK : (ia + 1) * CHUNK])
            streams.append(sa)
            sinks.append(out_a)
            ia += 1
        if ib < len(b) // CHUNK:
            rows.append(b[ib * CHUNK : (ib + 1) * CHUNK])
            streams.append(sb)
            sinks.append(out_b)
            ib += 1
        if not rows:
            continue
        order = list(range(len(rows)))[::-1] if tick % 2 else list(range(len(rows)))
        result = stage.process(
            torch.from_numpy(np.stack([rows[i] for i in order])), [streams[i] for i in order], BatchContext()
        )
        for k, i in enumerate(order):
            sinks[i].append(result[k].numpy())
    np.testing.assert_allclose(np.concatenate(out_a), ref_a[: len(out_a) * CHUNK], atol=2e-5)
    np.testing.assert_allclose(np.concatenate(out_b), ref_b[: len(out_b) * CHUNK], atol=2e-5)
    sa.close()
    sb.close()


def test_streams_out_of_slot_order_are_moved_in_line_once_and_keep_their_state() -> None:
    """A call over every stream, in an order their slots do not follow (one left and its slot was reused),
    moves their state to rows in the call's order, once and mid-stream; each stream's output goes on as
    if nothing moved, and its per-stream options (the post filter) move with it."""
    stage = DeepFilterNet3Stage(native_streams=0)
    signals = [babble(0.6), speech_in_noise(0.6)[0], babble(0.6, start=2.0)]
    options: list[dict[str, float]] = [{}, {"post_filter_beta": 0.02}, {}]
    together = run_streams(DeepFilterNet3Stage(native_streams=0), signals, options, compensate_latency=False)
    gone = stage.stream()
    streams = [stage.stream(**options[0]), stage.stream(**options[1])]
    gone.close()
    streams.append(stage.stream(**options[2]))  # takes the slot of the one that left
    assert [s.slot for s in streams] == [1, 2, 0]
    outs: list[list[np.ndarray]] = [[], [], []]
    frames = len(signals[0]) // CHUNK
    for f in range(frames):
        # first in slot order (rows 0..2 as they are), then in the streams' order: moved once
        order = [2, 0, 1] if f < frames // 2 else [0, 1, 2]
        batch = torch.from_numpy(np.stack([signals[i][f * CHUNK : (f + 1) * CHUNK] for i in order]))
        result = stage.process(batch, [streams[i] for i in order], BatchContext())
        for k, i in enumerate(order):
            outs[i].append(result[k].numpy())
        if f < frames // 2:
            assert [s.slot for s in streams] == [1, 2, 0]
        else:
            assert [s.slot for s in streams] == [0, 1, 2]
    assert stage._post_filter_slots == {1}  # the post filter moved with its stream
    for out, ref in zip(outs, together):
        np.testing.assert_allclose(np.concatenate(out), ref[: len(out) * CHUNK], atol=2e-5)
    newcomer = stage.stream()
    assert newcomer.slot == 3  # the rows after the moved ones are free
    for s in [*streams, newcomer]:
        s.close()


def test_reset_gives_a_fresh_stream(stage: DeepFilterNet3Stage) -> None:
    x = babble(0.4)
    s = stage.stream()
    run_chunks = lambda: np.concatenate(
        [
            stage.process(torch.from_numpy(x[None, i : i + CHUNK]), [s], BatchContext())[0].numpy()
            for i in range(0, len(x), CHUNK)
        ]
    )
    first = run_chunks()
    s.reset()
    np.testing.assert_allclose(run_chunks(), first, atol=1e-6)
    s.close()


def test_attenuation_limit_is_per_stream(stage: DeepFilterNet3Stage) -> None:
    """Same noise in two streams of one batch: the limited one keeps ~6 dB of ambience."""
    noise = read_48k(EVAL / "noise" / "running_tap.wav")[SR : 3 * SR]
    limited, unlimited = run_streams(stage, [noise, noise], [{"atten_lim_db": 6.0}, {}])
    tail = slice(SR // 2, None)  # past the start-up
    reduction = lambda y: 10 * np.log10(np.mean(noise[tail] ** 2) / np.mean(y[tail] ** 2))
    assert 4.5 <= reduction(limited) <= 7.5
    assert reduction(unlimited) > 15.0


def test_int8_path_stays_close_to_the_float_path() -> None:
    if resolve_precision("auto", torch.device("cpu")) != "int8":
        pytest.skip("no VNNI on this CPU: the stage runs float32")
    noisy, clean = speech_in_noise(3.0)
    exact = run_streams(DeepFilterNet3Stage(native_streams=0, precision="fp32"), [noisy])[0]
    fast = run_streams(DeepFilterNet3Stage(native_streams=0, precision="int8"), [noisy])[0]
    assert si_sdr(fast, exact) >= 30.0
    assert abs(si_sdr(fast, clean) - si_sdr(exact, clean)) < 0.3


def test_libdf_streams_move_to_torch_in_a_larger_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    import enhancers.denoise.df3 as df3

    monkeypatch.setattr(df3, "MIGRATE_FRAMES", 40)
    stage = DeepFilterNet3Stage(native_streams=2)
    first = stage.stream()
    if first.native is None:
        pytest.skip("libDF runtime not available")
    second, third = stage.stream(), stage.stream()
    assert second.native is not None and third.native is None
    x = babble(1.5)
    signals = np.stack([x, np.roll(x, 4800), np.roll(x, 9600)]).astype(np.float32)
    out = np.zeros_like(signals)
    try:
        for i in range(signals.shape[1] // CHUNK):
            sl = slice(i * CHUNK, (i + 1) * CHUNK)
            out[:, sl] = stage.process(torch.from_numpy(signals[:, sl]), [first, second, third], BatchContext())
            if i == 20:
                assert first.native is not None  # still migrating: libDF's output
        assert first.native is None and second.native is None  # handed over to torch
    finally:
        for s in (first, second, third):
            s.close()
    libdf = LibDfStream()
    try:
        reference = libdf.process(x)
    finally:
        libdf.close()
    n = len(reference)
    assert si_sdr(out[0, :n], reference) >= 25.0  # libDF's output, then torch's: no seam
