"""Echo cancellation on real recordings and simulated echo: echo gone, near-end kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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

pytestmark = pytest.mark.skipif(not AEC.is_dir(), reason="shared eval recordings not present")


def level_change_db(out: np.ndarray, ref: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(out.astype(np.float64) ** 2) / np.sum(ref.astype(np.float64) ** 2)))


@pytest.fixture(scope="module")
def real() -> tuple[list[np.ndarray], OfflineResult]:
    """The far-end and near-end single-talk clips, processed as two streams of one batch."""
    n = int(NEAREND_SECONDS * SAMPLE_RATE)
    far = [read_48k(AEC / f"{FAREND}_lpb.wav"), read_48k(AEC / f"{NEAREND}_lpb.wav")[:n]]
    mic = [read_48k(AEC / f"{FAREND}_mic.wav"), read_48k(AEC / f"{NEAREND}_mic.wav")[:n]]
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
    seconds = 10.0
    far = speech(FAR_SPEECH, seconds, EVAL)
    case = echo_scenario(far, room_response("impulse_response_0.wav", EVAL), 300.0, level_change_db=6.0)
    result = cancel_echo([case.far], [case.mic])
    out = result.outputs[0]
    assert result.delays_ms[0] is not None and abs(result.delays_ms[0] - case.true_delay_ms) <= 30.0
    start = case.change_at + 2 * SAMPLE_RATE  # two seconds after the echo got 6 dB louder
    assert erle_db(case.mic[start:], out[start:], SAMPLE_RATE) >= 25.0
    before = slice(2 * SAMPLE_RATE, case.change_at)
    assert erle_db(case.mic[before], out[before], SAMPLE_RATE) >= 25.0


def test_suppression_off_leaves_linear_filter_only() -> None:
    far = speech(FAR_SPEECH, 6.0, EVAL)
    case = echo_scenario(far, room_response("impulse_response_0.wav", EVAL), 100.0)
    result = cancel_echo([case.far, case.far], [case.mic, case.mic], [{"suppression": "off"}, {"suppression": "aggressive"}])
    tail = slice(3 * SAMPLE_RATE, None)
    linear = erle_db(case.mic[tail], result.outputs[0][tail], SAMPLE_RATE)
    full = erle_db(case.mic[tail], result.outputs[1][tail], SAMPLE_RATE)
    assert linear >= 5.0  # the adaptive filter alone removes echo
    assert full >= linear + 10.0  # and the suppressor removes much more
