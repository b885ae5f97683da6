"""Server-side echo cancellation end to end: the others must not hear themselves."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from enhancers.audio_io import read_48k
from loadtest.bot import Bot
from mediaserver.config import AuthConfig, EnhanceConfig, ServerConfig
from tests.audio_checks import best_alignment, content_match
from tests.conftest import ServerFactory, eval_file, speech
from tests.echo_bot import EchoBot


def _energy_db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(x.astype(np.float64) ** 2) + 1e-12))


# what each canceller must reach: echo reduction, and the content match of the bot's own speech in double
# talk.  AEC3 (the light one) models ~50 ms of the 200 ms room here (21-37 dB in five runs) and its residual
# suppressor cuts into double talk (match 0.51-0.62; the batched one 0.88): the eval's AECMOS says the same
@pytest.mark.parametrize(("canceller", "reduction_db", "min_match"), [("aec", 20.0, 0.5), ("aec:webrtc", 12.0, 0.35)])
async def test_echo_of_the_others_is_removed_but_the_bots_speech_arrives(start_server: ServerFactory, canceller: str,
                                                                        reduction_db: float, min_match: float) -> None:
    """Both echo cancellers, while the server's jitter buffer trims its priming excess (20-40 ms skipped on
    the microphone's timeline: the MDF canceller moves its delay, AEC3's far end jumps in its delay line)."""
    # The canceller must keep the stream's time continuity to converge, so this test measures it with a
    # deadline a loaded 2-core CI box can meet; under overload the executor fails open (echo passes
    # through, counted as bypassed), which tests/test_faults.py covers.
    config = ServerConfig(host="127.0.0.1", port=0, auth=AuthConfig(dev_mode=True),
                          enhance=replace(EnhanceConfig(), device="cpu", deadline_ms=150.0))
    rs = await start_server(config)
    await rs.server.hub.executor.preload([canceller])
    ir = read_48k(eval_file("rir", "rir_48k.wav"))[: 48_000 // 5]  # 200 ms of a measured room
    ir = ir / (np.linalg.norm(ir) + 1e-9) * 0.5  # the echo arrives 6 dB below what the speaker plays
    far = np.concatenate([speech("cmu_arctic_us_aew_a0001.wav"), speech("cmu_arctic_us_aew_a0003.wav")])
    # the echo bot is silent for 7 s (echo only), then speaks
    own_speech = speech("cmu_arctic_us_axb_a0005.wav")
    own = np.concatenate([np.zeros(48_000 * 7, dtype=np.float32), own_speech])
    talkers = {}
    echoers = {}
    for room, stages in (("echo-off", []), ("echo-on", [canceller])):
        talkers[room] = Bot(rs.url, room, "talker", far, stages=[])
        echoers[room] = EchoBot(rs.url, room, "speakerphone", own, ir, delay_s=0.15, stages=stages,
                                echo_cancellation=not stages)
    try:
        for room in talkers:
            await talkers[room].join()
            await echoers[room].join()
        await asyncio.sleep(12.5)
        measured = {}
        for room in talkers:
            heard = talkers[room].received_from(echoers[room].id)  # type: ignore[arg-type]
            assert len(heard) > 48_000 * 9, f"{room}: too little audio from the speakerphone"
            # seconds 3-6.8: the speakerphone only plays back the talker (converged by then); long enough
            # that the talker's looped sentences cannot all be in a pause there
            echo_part = heard[48_000 * 3: int(48_000 * 6.8)]
            # its own speech (1.6 s, from second 7 of its loop, over the talker's: double talk), found
            # where it arrived; its level and likeness there, against the room without the canceller
            tail = heard[48_000 * 6:]
            match, at = best_alignment(own_speech, tail)
            own_part = tail[at:at + len(own_speech)]
            measured[room] = (_energy_db(echo_part), _energy_db(own_part), max(match, content_match(own_part, own)))
        on_stream = rs.server.rooms.get("echo-on").participants[echoers["echo-on"].id].published  # type: ignore[union-attr,index]
        stats = rs.server.stream_stats(on_stream)  # type: ignore[arg-type]
        print("measured (echo dB, own speech dB):", measured, "aec stream:",
              {k: stats.get(k) for k in ("echo_delay_ms", "chunks", "bypassed", "jitter_buffer_ms", "jitter_target_ms",
                                        "jitter_timeline_shift_ms")},
              "executor:", {k: v for k, v in rs.server.hub.stats().items() if "bypass" in k or "drop" in k},
              "mic late frames:", echoers["echo-on"].track.late_frames)  # type: ignore[attr-defined]
        off_echo, off_own, _ = measured["echo-off"]
        on_echo, on_own, on_match = measured["echo-on"]
        assert off_echo > -45.0, "the simulated echo path produced no echo"
        assert off_echo - on_echo >= reduction_db, f"echo reduced by only {off_echo - on_echo:.1f} dB"
        # the speakerphone's own speech still arrives at a similar level
        assert on_own > off_own - 6.0, (on_own, off_own)
        assert on_match > min_match, f"the speakerphone's own speech is damaged (content match {on_match:.2f})"
    finally:
        for bots in (talkers, echoers):
            for bot in bots.values():
                await bot.leave()
