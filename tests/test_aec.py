"""Echo cancellation on real recordings and simulated echo: echo gone, near-end kept."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from enhancers.aec.offline import OfflineResult, cancel_echo
from enhancers.aec.simulate import FAR_SPEECH, echo_scenario, room_response, speech
from enhancers.audio_io import read_48k
from enhancers.eval.metrics import erle_db, si_sdr
from enhancers.stage import SAMPLE_RATE

EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "eval"
AEC = EVAL / "aec"
FAREND = "9mkQhVtzTEy2hDk-6u2Sww_farend_singletalk"
NEAREND = "DLhjtuwiEkS-68TsUVvW5g_nearend_singletalk"
NEAREND_SECONDS = 6.0
FAREND_SECONDS = 8.0

pytestmark = pytest.mark.skipif(not AEC.is_dir(), reason="shared eval recordings not present")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """10 ms chunks are small work: extra intra-op threads only add overhead here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def level_change_db(out: np.ndarray, ref: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(out.astype(np.float64) ** 2) / np.sum(ref.astype(np.float64) ** 2)))


@pytest.fixture(scope="module")
def real() -> tuple[list[np.ndarray], OfflineResult]:
    """The far-end and near-end single-talk clips, processed as two streams of one batch."""
    n, f = int(NEAREND_SECONDS * SAMPLE_RATE), int(FAREND_SECONDS * SAMPLE_RATE)
    far = [read_48k(AEC / f"{FAREND}_lpb.wav")[:f], read_48k(AEC / f"{NEAREND}_lpb.wav")[:n]]
    mic = [read_48k(AEC / f"{FAREND}_mic.wav")[:f], read_48k(AEC / f"{NEAREND}_mic.wav")[:n]]
    return mic, cancel_echo(far, mic)


def test_real_farend_single_talk_echo_is_removed(real: tuple[list[np.ndarray], OfflineResult]) -> None:
    mic, result = real
    assert erle_db(mic[0], result.outputs[0], SAMPLE_RATE, start_s=2.0) >= 25.0
    # The estimator finds the device's echo delay (~36 ms) to within a chunk or so.
    assert result.delays_ms[0] is not None and 20.0 <= result.delays_ms[0] <= 60.0


def test_real_nearend_single_talk_is_preserved(real: tuple[list[np.ndarray], OfflineResult]) -> None:
    mic, result = real
    out = result.outputs[1]
    assert si_sdr(out, mic[1]) >= 30.0
    assert abs(level_change_db(out, mic[1])) <= 0.5
    assert result.delays_ms[1] is None  # nothing to lock on: the far end is silent


def test_simulated_300ms_echo_with_level_change_is_cancelled() -> None:
    far = speech(FAR_SPEECH, 8.0, EVAL)
    case = echo_scenario(far, room_response("impulse_response_0.wav", EVAL), 300.0, level_change_db=6.0)
    # The same stream twice: the full canceller and the linear filter alone.
    result = cancel_echo([case.far] * 2, [case.mic] * 2, [{}, {"suppression": "off"}])
    out, linear = result.outputs
    assert result.delays_ms[0] is not None and abs(result.delays_ms[0] - case.true_delay_ms) <= 30.0
    before = slice(2 * SAMPLE_RATE, case.change_at)
    after = slice(case.change_at + 2 * SAMPLE_RATE, None)  # two seconds after the echo got 6 dB louder
    assert erle_db(case.mic[before], out[before], SAMPLE_RATE) >= 25.0
    assert erle_db(case.mic[after], out[after], SAMPLE_RATE) >= 25.0
    # The adaptive filter alone removes echo; the suppressor removes much more.
    assert erle_db(case.mic[after], linear[after], SAMPLE_RATE) >= 5.0
    assert (
        erle_db(case.mic[after], out[after], SAMPLE_RATE)
        >= erle_db(case.mic[after], linear[after], SAMPLE_RATE) + 10.0
    )


def farend_and_doubletalk(samples: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The far-end single-talk and the double-talk recordings: their references and their mics."""
    names = (FAREND, "DMTgmZwtgUilp4omPK7-OQ_doubletalk")
    return ([read_48k(AEC / f"{name}_lpb.wav")[:samples] for name in names],
            [read_48k(AEC / f"{name}_mic.wav")[:samples] for name in names])


def test_the_suppressor_kernel_computes_what_the_torch_ops_compute() -> None:
    """The numba kernel of the suppressor's gains (the CPU path) against the torch ops (the reference, and
    the GPU path), step by step from the same state, on real far-end echo and on double talk."""
    from enhancers.aec.stage import EchoCancellerStage

    stage = EchoCancellerStage()
    stage.kernels = False  # the torch chunk, which calls ``gains`` (the CPU chunk calls the kernel itself)
    sup = stage.suppressor
    checked = {"steps": 0, "active": 0}

    def both(st: dict[str, torch.Tensor], *spectra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ref_state = {k: v.clone() for k, v in st.items()}
        ref_gain, ref_flag = sup.gains_torch(ref_state, *spectra)
        gain, flag = sup._gains_kernel(st, *spectra)
        torch.testing.assert_close(gain, ref_gain, rtol=1e-3, atol=1e-4)
        assert torch.equal(flag, ref_flag)
        for key in ("sup_psd", "sup_cross", "sup_scalars"):
            torch.testing.assert_close(st[key], ref_state[key], rtol=1e-4, atol=1e-3)
        checked["steps"] += 1
        checked["active"] += int((ref_gain < 0.99).any())
        return gain, flag

    sup.gains = both  # type: ignore[method-assign]
    n = int(6.0 * SAMPLE_RATE)
    cancel_echo(*farend_and_doubletalk(n), stage=stage)
    assert checked["steps"] == n // 480 and checked["active"] > checked["steps"] // 2, checked


def test_the_delay_estimator_kernel_computes_what_the_torch_ops_compute() -> None:
    """The numba kernel of the bulk delay estimator against its torch ops, step by step from the same state
    (real far-end echo and double talk): the same delay every chunk, the same correlations."""
    from enhancers.aec.stage import EchoCancellerStage

    stage = EchoCancellerStage()
    est = stage.delay
    for k in range(est.cfg.bands):  # each band is one contiguous range of bins (what the kernel sums)
        column = est.bands[:, k]
        assert float(column.sum()) == float(column[est._band_lo[k]:est._band_hi[k]].sum()) == est._band_hi[k] - est._band_lo[k]
    delays: list[int] = []

    def both(st: dict[str, torch.Tensor], far: torch.Tensor, near: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        ref_state = {k: v.clone() for k, v in st.items()}
        ref = est.update_torch(ref_state, far, near, count).long()
        got = est._update_kernel(st, far, near, count)
        assert torch.equal(got, ref)
        for key in ("dly_far", "dly_corr", "dly_far_var", "dly_near_var", "dly_scalars"):
            torch.testing.assert_close(st[key], ref_state[key], rtol=1e-4, atol=1e-4)
        delays.extend(int(d) for d in got)
        return got

    est.update = both  # type: ignore[method-assign]
    n = int(6.0 * SAMPLE_RATE)
    cancel_echo(*farend_and_doubletalk(n), stage=stage)
    assert len(delays) == 2 * (n // 480) and max(delays) > 0  # it locked on a delay along the way


def test_the_mdf_kernels_compute_what_the_torch_ops_compute() -> None:
    """The MDF block as numba kernels and numpy FFTs against ``mdf_step`` in torch, step by step from the
    same state (real far-end echo and double talk): the same error and echo, filters and statistics."""
    from enhancers.aec import stage_cpu as aec_stage
    from enhancers.aec.mdf import mdf_step
    from enhancers.aec.mdf_kernels import mdf_step_kernels

    steps = {"n": 0, "switched": 0}

    def both(st: dict[str, torch.Tensor], x_new: torch.Tensor, x_frame: torch.Tensor, mic: torch.Tensor,
             count: torch.Tensor, cfg: Any) -> Any:
        ref_state = {k: v.clone() for k, v in st.items()}
        ref = mdf_step(ref_state, x_new, x_frame, mic, count, cfg)
        before = st["mdf_wf"].clone()
        got = mdf_step_kernels(st, x_new, x_frame, mic, count, cfg)
        scale = float(mic.abs().max()) + 1.0
        torch.testing.assert_close(got.error, ref.error, rtol=1e-3, atol=1e-3 * scale)
        torch.testing.assert_close(got.echo, ref.echo, rtol=1e-3, atol=1e-3 * scale)
        assert torch.equal(got.adapted, ref.adapted)
        for key in ("mdf_w", "mdf_wf", "mdf_x"):
            err = (st[key] - ref_state[key]).abs().max()
            assert float(err) <= 1e-3 * (float(ref_state[key].abs().max()) + 1e-6), key
        for key in ("mdf_power", "mdf_eh", "mdf_yh", "mdf_prop"):
            torch.testing.assert_close(st[key], ref_state[key], rtol=2e-3, atol=1e-3)
        # not the smoothed foreground-background differences (DAVG1, DAVG2): differences of large sums,
        # torch's float32 sums carry a few % of cancellation error there (the kernel sums in float64);
        # the decisions they feed are checked through the filters above
        torch.testing.assert_close(st["mdf_scalars"][:, 2:], ref_state["mdf_scalars"][:, 2:], rtol=2e-3, atol=1e-3)
        steps["n"] += 1
        steps["switched"] += int(not torch.equal(before, st["mdf_wf"]))
        return got

    from enhancers.aec.stage import EchoCancellerStage

    stage = EchoCancellerStage()  # (its construction runs a warm-up chunk: before the patch)
    original = aec_stage.mdf_step_kernels
    aec_stage.mdf_step_kernels = both  # type: ignore[assignment]
    try:
        n = int(6.0 * SAMPLE_RATE)
        cancel_echo(*farend_and_doubletalk(n), stage=stage)
    finally:
        aec_stage.mdf_step_kernels = original  # type: ignore[assignment]
    assert steps["n"] == n // 480 and steps["switched"] > 10, steps  # the two-path logic took part


def test_the_cpu_chunk_computes_what_the_torch_chunk_computes() -> None:
    """The whole chunk on the CPU (numpy and numba kernels, ``stage_cpu.py``) against ``process_torch``
    (the reference, and the GPU path), chunk by chunk from the same state: real far-end echo and double
    talk, batched with non-consecutive state slots (a stream closed in between), through the delay
    estimator's lock and the filters' realignment.  Outputs, every state entry and the side information
    agree to float32 rounding (FFT libraries differ)."""
    from enhancers.aec.stage import EchoCancellerStage
    from enhancers.aec.stage_cpu import process_cpu
    from enhancers.stage import CHUNK, BatchContext

    n = int(5.0 * SAMPLE_RATE) // CHUNK * CHUNK
    refs, mics = farend_and_doubletalk(n)
    stage = EchoCancellerStage()
    first, gap, second = stage.stream(), stage.stream(), stage.stream(delay_hint_ms=120.0)
    gap.close()
    streams = [second, first]  # slots 2 and 0: the state is gathered, not viewed
    far = torch.from_numpy(np.stack([refs[1], refs[0]]))
    mic = torch.from_numpy(np.stack([mics[1], mics[0]]))
    realigned = 0
    with torch.inference_mode():
        for start in range(0, n, CHUNK):
            audio, ref = mic[:, start:start + CHUNK].contiguous(), far[:, start:start + CHUNK].contiguous()
            before = {k: v.clone() for k, v in stage.state.items()}
            delays = before["filter_delay"].clone()
            ctx_ref = BatchContext(reference=ref)
            want = stage.process_torch(audio, streams, ctx_ref)
            ref_state, stage.state = stage.state, before
            ctx = BatchContext(reference=ref)
            got = process_cpu(stage, audio, streams, ctx)
            scale = float(audio.abs().max()) + 1e-3
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * scale)
            torch.testing.assert_close(ctx.side["aec_delay_ms"], ctx_ref.side["aec_delay_ms"])
            for key, value in ref_state.items():
                mine = stage.state[key]
                if not value.is_floating_point() and not value.is_complex():
                    assert torch.equal(mine, value), key
                else:  # 16-bit units: 1e-3 relative, or 1e-2 absolute (comfort noise at its start: ~0)
                    err = float((mine - value).abs().max())
                    assert err <= 1e-3 * max(float(value.abs().max()), 10.0), (key, start // CHUNK, err)
            realigned += int(not torch.equal(delays, stage.state["filter_delay"]))
    assert stage.estimated_delay_ms(first) is not None and realigned >= 1
