"""The light echo canceller (``aec:webrtc``, WebRTC AEC3 from the livekit wheel) on real recordings,
and as what an overloaded executor gives a stream that asked for the batched ``aec``."""

from __future__ import annotations

import numpy as np
import pytest

from enhancers.aec.offline import OfflineResult, cancel_echo
from enhancers.aec.webrtc import WebRtcEchoCancellerStage
from enhancers.audio_io import read_48k
from enhancers.eval.metrics import erle_db
from enhancers.executor import Executor, ExecutorConfig
from enhancers.stage import CHUNK, SAMPLE_RATE
from tests.test_aec import AEC, FAREND, FAREND_SECONDS, NEAREND, NEAREND_SECONDS, level_change_db

pytestmark = pytest.mark.skipif(not AEC.is_dir(), reason="shared eval recordings not present")


def recordings() -> tuple[list[np.ndarray], list[np.ndarray]]:
    n, f = int(NEAREND_SECONDS * SAMPLE_RATE), int(FAREND_SECONDS * SAMPLE_RATE)
    far = [read_48k(AEC / f"{FAREND}_lpb.wav")[:f], read_48k(AEC / f"{NEAREND}_lpb.wav")[:n]]
    mic = [read_48k(AEC / f"{FAREND}_mic.wav")[:f], read_48k(AEC / f"{NEAREND}_mic.wav")[:n]]
    return far, mic


@pytest.fixture(scope="module")
def real() -> tuple[list[np.ndarray], list[np.ndarray], OfflineResult]:
    """The far-end and near-end single-talk clips as two streams of one stage."""
    far, mic = recordings()
    return far, mic, cancel_echo(far, mic, stage=WebRtcEchoCancellerStage())


def test_real_farend_echo_is_removed(real: tuple[list[np.ndarray], list[np.ndarray], OfflineResult]) -> None:
    _, mic, result = real
    assert erle_db(mic[0], result.outputs[0], SAMPLE_RATE, start_s=2.0) >= 20.0  # measured 28.8 dB


def test_real_nearend_talk_passes(real: tuple[list[np.ndarray], list[np.ndarray], OfflineResult]) -> None:
    _, mic, result = real
    assert abs(level_change_db(result.outputs[1], mic[1])) <= 1.0  # measured -0.27 dB


def test_each_stream_has_its_own_canceller(real: tuple[list[np.ndarray], list[np.ndarray], OfflineResult]) -> None:
    far, mic, result = real
    alone = cancel_echo(far[:1], mic[:1], stage=WebRtcEchoCancellerStage()).outputs[0]
    np.testing.assert_array_equal(alone, result.outputs[0])


def test_declared_latency_is_where_an_impulse_comes_out() -> None:
    stage = WebRtcEchoCancellerStage()
    mic = np.zeros(SAMPLE_RATE, dtype=np.float32)
    starts = list(range(100, len(mic) - 2 * CHUNK, 4800))
    mic[starts] = 0.6
    raw = cancel_echo([np.zeros_like(mic)], [mic], stage=stage)  # aligned by the declared latency
    out = raw.outputs[0]
    for start in starts[2:]:  # after the canceller's first frames
        energy = np.cumsum(out[start - 200 : start + 600].astype(np.float64) ** 2)
        assert energy[-1] > 0.0
        median = int(np.searchsorted(energy / energy[-1], 0.5)) - 200
        assert abs(median) <= 24, f"an impulse at {start} comes out {median} samples off the declared latency"


async def test_an_overloaded_executor_gives_an_aec_stream_the_light_canceller() -> None:
    """The batched ``aec`` is declared to cost 4 ms per stream: a second stream asking for it does not
    fit the tick and gets ``aec:webrtc`` instead (not no echo cancellation), which removes its echo."""
    executor = Executor(ExecutorConfig(device="cpu", deadline_ms=1000.0, admission=True,
                                       stage_costs={"aec": (0.0, 4.0)}))
    await executor.start()
    try:
        await executor.preload(["aec", "aec:webrtc"])
        first = executor.open_stream("aec", label="first")
        second = executor.open_stream("aec", label="second")
        assert first.stages == ["aec"]
        assert second.stages == ["aec:webrtc"], second.degraded_reason
        far, mic = recordings()
        out = []
        for i in range(len(mic[0]) // CHUNK):
            part = slice(i * CHUNK, (i + 1) * CHUNK)
            chunk, reference = np.ascontiguousarray(mic[0][part]), np.ascontiguousarray(far[0][part])
            result = await second.process(chunk, reference)
            assert not result.bypassed
            out.append(result.audio)
        delay = WebRtcEchoCancellerStage.latency_samples
        audio = np.concatenate(out)[delay:]
        assert erle_db(mic[0][: len(audio)], audio, SAMPLE_RATE, start_s=2.0) >= 20.0
    finally:
        await executor.close()
