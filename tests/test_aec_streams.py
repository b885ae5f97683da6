"""Batching and per-stream isolation of the echo canceller stage, and its APM-style API."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from enhancers.aec import EchoCanceller, EchoCancellerStage
from enhancers.aec.offline import cancel_echo, stack_padded
from enhancers.aec.simulate import FAR_SPEECH, NEAR_SPEECH, echo_scenario, room_response, speech
from enhancers.eval.metrics import erle_db, si_sdr
from enhancers.registry import create_stage
from enhancers.stage import CHUNK, SAMPLE_RATE, BatchContext, StageStream

EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "eval"
SECONDS = 2.5

pytestmark = pytest.mark.skipif(not (EVAL / "speech").is_dir(), reason="shared eval recordings not present")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """10 ms chunks are small work: extra intra-op threads only add overhead here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cases() -> list[tuple[np.ndarray, np.ndarray]]:
    """Three echo streams with different bulk delays and rooms: (reference, mic)."""
    far = speech(FAR_SPEECH, SECONDS, EVAL)
    specs = [("impulse_response_0.wav", 60.0), ("rir_clap_44k.wav", 200.0), ("rir_48k.wav", 350.0)]
    out = []
    for i, (rir, delay) in enumerate(specs):
        far_i = np.roll(far, i * 7_000)  # different talk in each stream
        case = echo_scenario(far_i, room_response(rir, EVAL), delay, seed=i)
        out.append((case.far, case.mic))
    return out


def run(
    stage: EchoCancellerStage, streams: list[StageStream], refs: list[np.ndarray], mics: list[np.ndarray]
) -> np.ndarray:
    n = len(mics[0]) // CHUNK * CHUNK
    far, mic = stack_padded(refs, n), stack_padded(mics, n)
    out = torch.empty_like(mic)
    for i in range(0, n, CHUNK):
        out[:, i : i + CHUNK] = stage.process(
            mic[:, i : i + CHUNK], streams, BatchContext(reference=far[:, i : i + CHUNK])
        )
    return out.numpy()


def test_batched_streams_equal_each_stream_alone(cases: list[tuple[np.ndarray, np.ndarray]]) -> None:
    refs, mics = [c[0] for c in cases], [c[1] for c in cases]
    batched = cancel_echo(refs, mics).outputs
    # Non-consecutive slots in a shuffled order take the indexed (gather/scatter) path.
    stage = EchoCancellerStage()
    streams = [stage.stream() for _ in range(5)]
    order = [3, 0, 4]
    shuffled = run(stage, [streams[j] for j in order], refs, mics)
    for i, (ref, mic) in enumerate(cases):
        alone = cancel_echo([ref], [mic]).outputs[0]
        n = len(shuffled[i])
        assert np.allclose(batched[i], alone, atol=1e-5), f"stream {i}: batched != alone"
        assert np.allclose(shuffled[i], alone[:n], atol=1e-5), f"stream {i}: indexed slots != alone"
        tail = slice(int(1.5 * SAMPLE_RATE), None)
        assert erle_db(mic[tail], alone[tail], SAMPLE_RATE) >= 20.0


def test_streams_are_isolated(cases: list[tuple[np.ndarray, np.ndarray]]) -> None:
    ref, mic = cases[0]
    near = speech(NEAR_SPEECH, SECONDS, EVAL)
    silent = np.zeros_like(near)
    stage = EchoCancellerStage()
    echo_stream = stage.stream(suppression="aggressive")
    talk_stream = stage.stream(suppression="moderate", delay_hint_ms=100)
    out = run(stage, [echo_stream, talk_stream], [ref, silent], [mic, near])
    # The talker next to an echoing stream comes out untouched ...
    assert si_sdr(out[1], near) >= 30.0
    # ... and exactly as it would alone.
    alone = cancel_echo([silent], [near], [{"suppression": "moderate", "delay_hint_ms": 100}]).outputs[0]
    assert np.allclose(out[1], alone[: len(out[1])], atol=1e-6)
    # Resetting a stream forgets its adaptation: it then behaves like a new one.
    echo_stream.reset()
    again = run(stage, [echo_stream], [ref], [mic])[0]
    fresh = cancel_echo([ref], [mic], [{"suppression": "aggressive"}]).outputs[0]
    assert np.allclose(again, fresh[: len(again)], atol=1e-5)


def test_stage_contract_and_options() -> None:
    stage = create_stage("aec")
    assert isinstance(stage, EchoCancellerStage)
    assert stage.latency_samples == 0
    with pytest.raises(ValueError):
        stage.stream(suppression="loud")
    s = stage.stream(delay_hint_ms=250)
    ctx = BatchContext(reference=None)
    out = stage.process(torch.zeros(1, CHUNK), [s], ctx)
    assert out.shape == (1, CHUNK)
    assert ctx.side["aec_delay_ms"].tolist() == [250.0]  # the hint, until the estimator locks


def test_apm_api_with_odd_frame_sizes(cases: list[tuple[np.ndarray, np.ndarray]]) -> None:
    ref, mic = cases[1]
    aec = EchoCanceller()
    aec.set_stream_delay_ms(200)
    frame = 160  # not a multiple of the 480-sample chunk
    out = []
    for i in range(0, len(mic) - frame + 1, frame):
        aec.process_reverse_stream(ref[i : i + frame])
        out.append(aec.process_stream(mic[i : i + frame]))
    processed = np.concatenate(out)
    assert len(processed) == len(mic) // frame * frame
    lat = aec.latency_samples
    assert lat == 2 * frame
    tail = slice(int(1.5 * SAMPLE_RATE), len(processed) - lat)
    aligned = processed[lat:]
    assert erle_db(mic[tail], aligned[tail], SAMPLE_RATE) >= 20.0
    est = aec.estimated_delay_ms()
    assert est is not None and abs(est - 202.0) <= 30.0
    aec.close()


async def check_the_told_canceller_follows(executor: Any, spec: str = "aec", jump: int = 2 * CHUNK) -> None:
    """On ``executor`` (not started), two ``spec`` streams get the same echo with ``jump`` samples of the
    mic's timeline skipped at 6 s; ``shift_near`` tells only the first.  The told one keeps cancelling
    across the jump; the other leaks (>= 10 dB less ERLE in the 2 s after it)."""
    far = speech(FAR_SPEECH, 10.0, EVAL)
    case = echo_scenario(far, room_response("impulse_response_0.wav", EVAL), 200.0)
    at = 6 * SAMPLE_RATE
    mic = np.concatenate([case.mic[:at], case.mic[at + jump:]])  # 20 ms of the mic's timeline skipped
    n = (len(mic) // CHUNK) * CHUNK
    outs: list[list[np.ndarray]] = [[], []]
    await executor.start()
    try:
        told, untold = (executor.open_stream(spec, timeline_jumps=True) for _ in range(2))
        await told.wait_ready()
        for start in range(0, n, CHUNK):
            if start == at:
                told.shift_near(jump)
            chunk, ref = mic[start:start + CHUNK].copy(), case.far[start:start + CHUNK].copy()
            results = await asyncio.gather(told.process(chunk, ref), untold.process(chunk, ref))
            for out, result in zip(outs, results):
                assert not result.bypassed
                out.append(result.audio)
    finally:
        await executor.close()
    mic = mic[:n]
    y_told, y_untold = (np.concatenate(o) for o in outs)
    before, after = slice(at - 2 * SAMPLE_RATE, at), slice(at, at + 2 * SAMPLE_RATE)
    assert erle_db(mic[before], y_told[before], SAMPLE_RATE) >= 25.0
    assert erle_db(mic[after], y_told[after], SAMPLE_RATE) >= 25.0  # no leak, no re-convergence
    assert erle_db(mic[after], y_untold[after], SAMPLE_RATE) <= erle_db(mic[after], y_told[after], SAMPLE_RATE) - 10.0


async def test_a_jump_of_the_mic_timeline_leaks_no_echo_once_the_canceller_is_told() -> None:
    """The SFU's jitter buffer gives back excess delay by skipping 20 ms of a talker's audio: the echo in
    it then comes 20 ms sooner after its reference.  Told through the executor (``shift_near``, here to
    a worker process), the canceller keeps cancelling across the jump; not told, it leaks echo for
    seconds while its estimator finds the new delay."""
    from enhancers.executor import Executor, ExecutorConfig

    await check_the_told_canceller_follows(
        Executor(ExecutorConfig(device="cpu", isolation="process", deadline_ms=5_000.0)))


async def test_the_light_canceller_follows_a_jump_within_its_delay_line() -> None:
    """AEC3 (``aec:webrtc``) cannot be told of a jump, but on a stream whose timeline jumps its far end
    comes through a 40 ms delay line that jumps with the microphone: 40 ms skipped, no echo leaks."""
    from enhancers.aec.webrtc import SHIFT_HEADROOM
    from enhancers.executor import Executor, ExecutorConfig

    await check_the_told_canceller_follows(Executor(ExecutorConfig(device="cpu", deadline_ms=5_000.0)),
                                           "aec:webrtc", SHIFT_HEADROOM)
