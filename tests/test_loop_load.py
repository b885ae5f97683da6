"""The media process under load (mediaserver/loop_load.py, encoder_load.py): Opus complexity light while the
loop's core is busy and full again once it has room; newcomers refused with server-busy once one more
would fill the core, while those already in keep hearing each other."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import aiohttp
import numpy as np
import pytest

from loadtest.bot import Bot, JoinError
from mediaserver.config import AuthConfig, EnhanceConfig, LimitsConfig, MediaConfig, ServerConfig
from mediaserver.encoder_load import EncoderComplexity
from mediaserver.loop_load import JoinGate, LoopBusy
from tests.audio_checks import content_match, looped
from tests.conftest import ServerFactory, speech


def test_busy_core_switches_to_light_at_once_and_back_only_after_calm_windows() -> None:
    policy = EncoderComplexity(5, 1, light_above=0.65, full_below=0.45, recover_windows=3)
    seen = [policy.observe(b) for b in (0.3, 0.6, 0.7, 0.5, 0.4, 0.4, 0.6, 0.4, 0.4, 0.4, 0.9)]
    # light from the first busy window; a window between the thresholds restarts the count of calm ones
    assert seen == [5, 5, 1, 1, 1, 1, 1, 1, 1, 5, 1]
    assert policy.changes == 3
    assert policy.observe(None) == 1  # no reading: no change


def test_equal_complexities_or_threshold_above_one_keep_it_fixed() -> None:
    for policy in (EncoderComplexity(5, 5), EncoderComplexity(5, 1, light_above=1.5)):
        assert not policy.adaptive
        assert [policy.observe(b) for b in (1.0, 1.0, 0.0)] == [5, 5, 5]
        assert policy.changes == 0


def test_loop_busy_reads_a_spinning_thread_as_busy_and_a_sleeping_one_as_idle() -> None:
    probe = LoopBusy()
    assert probe.sample() is None
    end = time.monotonic() + 0.3
    while time.monotonic() < end:  # runnable all along: running or waiting for a core
        pass
    spinning = probe.sample()
    time.sleep(0.3)
    sleeping = probe.sample()
    assert spinning is not None and spinning > 0.8, spinning
    assert sleeping is not None and sleeping < 0.5, sleeping


async def test_a_busy_server_encodes_lighter_and_subscribers_still_hear_the_speech(
        start_server: ServerFactory) -> None:
    # opus_light_above 0: every window counts as busy, as on a saturated core
    cfg = ServerConfig(host="127.0.0.1", port=0, auth=AuthConfig(dev_mode=True),
                       media=replace(MediaConfig(), opus_light_above=0.0, opus_complexity_under_load=1),
                       enhance=replace(EnhanceConfig(), default_stages=("limiter",), device="cpu"))
    rs = await start_server(cfg)
    rs.server.loop_load.window_s = 0.2
    sent = looped(speech("cmu_arctic_us_aew_a0001.wav"))
    pub = Bot(rs.url, "busy", "pub", sent)
    sub = Bot(rs.url, "busy", "sub", None)
    await pub.join()
    await sub.join()
    try:
        await asyncio.sleep(6.0)
        stream = rs.server.rooms.get("busy").streams[f"{pub.id}-mic"]
        assert stream.encoder.packets > 100  # re-encoded: the stream has a stage
        assert stream.encoder._encoder.complexity == 1
        heard = sub.received_from(pub.id)
        assert heard is not None and len(heard) > 48_000 * 3
        assert content_match(heard[48_000:], sent) > 0.6
        async with aiohttp.ClientSession() as http:
            health = await (await http.get(f"{rs.url}/healthz")).json()
            metrics = await (await http.get(f"{rs.url}/metrics")).text()
        assert health["encoder"]["opus_complexity"] == 1 and health["encoder"]["changes"] >= 1
        assert "mediaserver_opus_complexity 1.0" in metrics
        assert np.isfinite(health["encoder"]["loop_busy"])
    finally:
        await pub.leave()
        await sub.leave()


def test_join_gate_refuses_while_the_clock_skips_ticks_and_never_a_handful() -> None:
    gate = JoinGate(skipped_limit=0.01, min_participants=8, sustained=2)
    gate.observe(1000, 0)
    assert gate.refusal(20) is None  # one reading: no window yet
    gate.observe(1100, 0)
    assert gate.refusal(20) is None  # kept time
    gate.observe(1190, 10)  # 10 of the 100 ticks due were skipped: one second, a burst of joins, say
    assert gate.refusal(20) is None
    gate.observe(1280, 20)  # and the next second too
    assert gate.refusal(20) is not None
    assert gate.refusal(4) is None  # below min_participants: a stalled machine must not refuse a small call
    gate.observe(1380, 20)
    assert gate.refusal(20) is None  # keeping time again
    assert gate.refused == 1
    assert JoinGate(skipped_limit=1.5, busy_limit=1.5).refusal(100) is None  # off


def test_join_gate_refuses_the_join_that_would_fill_the_core_counting_those_admitted_since_the_reading() -> None:
    gate = JoinGate(skipped_limit=1.5, min_participants=8, busy_limit=0.9, smooth=3)
    gate.observe(0, 0, None, None, 0)
    for k in range(1, 4):  # a cold burst of 40: no reading with participants in it yet, all let in
        assert gate.refusal(8 * k) is None
    gate.observe(100, 0, 0.95, 0.9, 40)  # the burst's handshakes
    assert gate.predicted_busy(40) is None and gate.refusal(40) is None  # the window began with nobody in
    for t in range(2, 5):
        gate.observe(100 * t, 0, 0.80, 0.64, 40)  # then steady: the loop runs 0.016 a participant
    assert gate.predicted_busy(40) == pytest.approx(0.80 + 0.016)
    admitted = 40
    while gate.refusal(admitted) is None:  # a burst of joins between two readings
        admitted += 1
    assert admitted == 46  # 0.80 + 7 * 0.016 = 0.912: the 47th would take it over 0.9
    assert gate.refused == gate.refused_predicted == 1
    assert gate.refusal(4) is None  # never a handful
    gate.observe(500, 0, 0.86, 0.70, 46)  # the newcomers' cost shows up; still scaled from the fewest (40)
    busy, run = (0.80 + 0.80 + 0.86) / 3, (0.64 + 0.64 + 0.70) / 3
    assert gate.predicted_busy(46) == pytest.approx(busy + run * 7 / 40)
    assert gate.stats(46)["predicted_busy"] == round(busy + run * 7 / 40, 3)
    for t in range(6, 9):
        gate.observe(100 * t, 0, 0.60, 0.5, 30)  # some left: room again
    assert gate.refusal(30) is None


def test_join_gate_leaves_the_stages_wait_on_the_worker_to_the_executors_admission() -> None:
    """A loop that mostly waits on the executor's worker (its stages' rounds) is not refused on that wait:
    a newcomer adds the loop's own run share; its stages are admitted (or degraded) by the executor."""
    gate = JoinGate(skipped_limit=1.5, min_participants=8, busy_limit=0.9)
    for t in range(5):
        gate.observe(100 * t, 0, 0.70, 0.36, 12)  # 12 denoised streams: half the busy share is the wait
    assert gate.refusal(15) is None  # 0.70 + 4 * 0.03 = 0.82
    assert gate.refusal(18) is not None  # 0.70 + 7 * 0.03 = 0.91


@pytest.mark.parametrize("rule", ["predicted", "skipped"])
async def test_a_full_server_refuses_newcomers_with_server_busy_and_keeps_the_call_going(
        start_server: ServerFactory, rule: str) -> None:
    # join_busy_limit 0: any busy share is over it, as on a full core; join_skipped_ticks 0: any reading
    # counts as a clock that could not keep time; either once two are in
    limits = (replace(LimitsConfig(), join_busy_limit=0.0, join_skipped_ticks=2.0, join_min_participants=2)
              if rule == "predicted" else
              replace(LimitsConfig(), join_busy_limit=2.0, join_skipped_ticks=0.0, join_min_participants=2))
    cfg = ServerConfig(host="127.0.0.1", port=0, auth=AuthConfig(dev_mode=True), limits=limits,
                       enhance=replace(EnhanceConfig(), default_stages=(), device="cpu"))
    rs = await start_server(cfg)
    rs.server.loop_load.window_s = 0.2
    a_sent, b_sent = looped(speech("cmu_arctic_us_aew_a0001.wav")), looped(speech("cmu_arctic_us_axb_a0005.wav"))
    a, b = Bot(rs.url, "full", "a", a_sent), Bot(rs.url, "full", "b", b_sent)
    await a.join()
    await b.join()
    late = Bot(rs.url, "full", "late", None)
    try:
        await asyncio.sleep(2.5)  # readings with both in
        with pytest.raises(JoinError, match="server-busy"):
            await late.join()
        await asyncio.sleep(4.0)
        for bot, other, sent in ((a, b, b_sent), (b, a, a_sent)):
            heard = bot.received_from(other.id)
            assert heard is not None and len(heard) > 48_000 * 3
            assert content_match(heard[48_000:], sent) > 0.6
        assert rs.server.rooms.participant_count == 2
        async with aiohttp.ClientSession() as http:
            health = await (await http.get(f"{rs.url}/healthz")).json()
            metrics = await (await http.get(f"{rs.url}/metrics")).text()
        assert health["load"]["joins_refused"] == 1
        assert health["load"]["joins_refused_predicted"] == (1 if rule == "predicted" else 0)
        if rule == "predicted":
            assert health["load"]["predicted_busy"] > 0.0
        assert "mediaserver_joins_refused_total 1.0" in metrics
    finally:
        await late.leave()
        await a.leave()
        await b.leave()
