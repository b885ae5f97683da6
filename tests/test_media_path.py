"""The forwarding path's own parts: jitter buffer, loss concealment, bounded fan-out."""

from __future__ import annotations

import asyncio
import types

import numpy as np

from mediaserver.audio_format import CHUNK
from mediaserver.fanout import EncodedPacket, Fanout, StreamEncoder, SubscriberTrack
from mediaserver.jitter import JitterBuffer
from mediaserver.opus import OpusEncoder
from tests.audio_checks import longest_silence_ms
from tests.conftest import noise, speech


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _packets(x: np.ndarray, bitrate: int = 32_000) -> list[bytes]:
    enc = OpusEncoder(bitrate=bitrate)
    return [enc.encode(x[i:i + 960]) for i in range(0, len(x) - 959, 960)]


def _play(jb: JitterBuffer, clock: FakeClock, packets: list[bytes], lost: set[int] = frozenset(),  # type: ignore[assignment]
          jitter_ms: float = 0.0, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    arrivals = []
    for i, _ in enumerate(packets):
        if i not in lost:
            arrivals.append((i * 0.02 + rng.uniform(0, jitter_ms / 1000.0), i))
    arrivals.sort()
    out = []
    k = 0
    for tick in range(len(packets) * 2 + 30):
        clock.t = tick * 0.01
        while k < len(arrivals) and arrivals[k][0] <= clock.t:
            i = arrivals[k][1]
            jb.push(i & 0xFFFF, (i * 960 + 123456) & 0xFFFFFFFF, packets[i], arrivals[k][0])
            k += 1
        out.append(jb.pull()[0])
    return np.concatenate(out)


def _replay(jb: JitterBuffer, clock: FakeClock, packets: list[bytes], arrivals: list[tuple[float, int]],
            ticks: int) -> list[float]:
    """Pushes packet ``i`` at each (time, i) of ``arrivals`` and pulls every 10 ms for ``ticks``
    ticks; the depth after each pull."""
    depths, k = [], 0
    for tick in range(ticks):
        clock.t = tick * 0.01
        while k < len(arrivals) and arrivals[k][0] <= clock.t:
            i = arrivals[k][1]
            jb.push(i, i * 960, packets[i], arrivals[k][0])
            k += 1
        jb.pull()
        depths.append(jb.depth_ms())
    return depths


def test_single_lost_packet_is_concealed_not_a_gap() -> None:
    x = noise("running_tap.wav", seconds=3.0) * 4
    pk = _packets(x)
    clock = FakeClock()
    jb = JitterBuffer(clock=clock)
    y = _play(jb, clock, pk, lost={50})
    start = int(np.argmax(np.abs(y) > 1e-3))
    body = y[start: start + int(2.5 * 48_000)]
    # aiortc's fixed buffer turns one lost packet into a 320 ms hole; here nothing is silent
    assert longest_silence_ms(body) < 10.0
    assert jb.stats.lost == 1
    assert jb.stats.fec_recovered + jb.stats.concealed_chunks >= 1


def test_jitter_is_absorbed_and_measured() -> None:
    x = speech(seconds=3.0)
    pk = _packets(x)
    clock = FakeClock()
    jb = JitterBuffer(clock=clock)
    _play(jb, clock, pk, jitter_ms=30.0)
    # RFC 3550 jitter of uniform 0-30 ms delays is around 10 ms
    assert 4.0 < jb.stats.jitter_ms < 20.0
    assert jb.stats.target_ms >= 20.0
    assert jb.stats.received == len(pk)


def test_a_late_packet_still_plays_after_an_underrun() -> None:
    """A packet that comes a little after its playout time (a stalled sender or server loop) is played
    late, with a concealed chunk inserted before it, not thrown away as lost: the delay grows instead."""
    x = speech(seconds=3.0)
    pk = _packets(x)
    clock = FakeClock()
    jb = JitterBuffer(clock=clock, min_delay_ms=20.0, start_delay_ms=20.0)
    # two stalls of the path: packets 60-61 come together 35 ms after 60 was sent, 100-101 25 ms after
    # 100 was sent (more than the 20 ms buffer: the playout runs dry before they come)
    late = {60: 0.035, 61: 0.015, 100: 0.025, 101: 0.005}
    _replay(jb, clock, pk, sorted((i * 0.02 + late.get(i, 0.0), i) for i in range(len(pk))), len(pk) * 2 + 30)
    assert jb.stats.late == 0 and jb.stats.lost == 0
    assert jb.stats.underruns >= 1 and jb.stats.concealed_chunks >= 1


def test_buffer_latency_stays_bounded_after_a_burst() -> None:
    x = speech(seconds=4.0)
    pk = _packets(x)
    clock = FakeClock()
    jb = JitterBuffer(clock=clock)
    # 40 packets (800 ms) stalled, then delivered at once
    for tick in range(400):
        clock.t = tick * 0.01
        for i in range(len(pk)):
            arrive = i * 0.02 if not 20 <= i < 60 else 60 * 0.02
            if tick * 0.01 - 0.01 < arrive <= tick * 0.01:
                jb.push(i, i * 960, pk[i], arrive)
        jb.pull()
    assert jb.depth_ms() <= jb.stats.target_ms + 80.0
    assert jb.stats.discarded > 0


def _depths(jb: JitterBuffer, clock: FakeClock, packets: list[bytes], jitter_ms: float = 0.0) -> list[float]:
    """Plays ``packets`` (20 ms apart, up to ``jitter_ms`` late, at 5 ms past the pull grid) through ``jb``."""
    rng = np.random.default_rng(3)
    arrivals = sorted((0.005 + i * 0.02 + rng.uniform(0, jitter_ms / 1000.0), i) for i in range(len(packets)))
    return _replay(jb, clock, packets, arrivals, len(packets) * 2)


def test_a_lasting_excess_delay_is_given_back_at_quiet_moments() -> None:
    """A buffer primed (or grown by a burst of underruns) well above what the stream's jitter needs
    keeps that delay for the call's life unless something takes it back: one packet at a time, at a
    quiet chunk, down to its target, without a single concealed chunk."""
    pk = _packets(np.tile(speech(seconds=4.0), 5))  # 20 s: the target decays 5 ms a second
    clock = FakeClock()
    jb = JitterBuffer(clock=clock, min_delay_ms=20.0, start_delay_ms=80.0)  # 60 ms more than it needs
    depths = _depths(jb, clock, pk, jitter_ms=2.0)
    early, late = max(depths[100:200]), max(depths[-200:])
    assert early >= 80.0
    assert late <= jb.stats.target_ms + 30.0 and late <= early - 40.0
    assert jb.stats.concealed_chunks == 0 and jb.stats.underruns == 0
    assert 2 <= jb.stats.discarded <= 4  # one 20 ms packet per excess packet, no more
    assert jb.timeline_shift == 960 * jb.stats.discarded  # each told to an echo canceller downstream


def test_the_timeline_shift_is_reported_with_the_chunk_where_the_audio_jumps() -> None:
    """An echo canceller moves its delay by ``timeline_shift`` before the chunk it comes with, so every
    skip (a trim, a burst drop) and every stretch (an underrun's concealment) must be counted exactly at
    the chunk where the played audio jumps: the input position of each chunk is its index minus a
    constant lag plus the shift reported with it."""
    # white noise coded at 128 kbit/s: each chunk matches the input at one offset only (speech is
    # periodic: a 100 Hz voice matches itself one chunk away)
    x = (np.random.default_rng(0).standard_normal(16 * 48_000) * 0.1).astype(np.float32)
    pk = _packets(x, bitrate=128_000)
    clock = FakeClock()
    jb = JitterBuffer(clock=clock, min_delay_ms=20.0, start_delay_ms=80.0)
    # 20 ms apart, then a 150 ms stall at 10 s (underruns, then silence: stretched) and its burst (dropped:
    # skipped)
    arrivals = [(0.005 + i * 0.02 + (0.15 if 500 <= i < 508 else 0.0), i) for i in range(len(pk))]
    chunks, shifts, k = [], [], 0
    for tick in range(len(pk) * 2):
        clock.t = tick * 0.01
        while k < len(arrivals) and arrivals[k][0] <= clock.t:
            i = arrivals[k][1]
            jb.push(i, i * 960, pk[i], arrivals[k][0])
            k += 1
        chunks.append(jb.pull()[0])
        shifts.append(jb.timeline_shift)
    steps = np.diff(shifts)
    assert steps.max() >= 960 and steps.min() < 0  # skips and stretches both happened
    y = np.concatenate(chunks)
    # the lag of the played audio behind the input before any jump (Opus' own delay included)
    head = y[48_000:96_000]
    corr = np.fft.irfft(np.fft.rfft(x[:2 * 96_000]) * np.conj(np.fft.rfft(head, 2 * 96_000)))
    lag = 48_000 - int(np.argmax(corr))  # y[n] = x[n - lag]
    assert shifts[48_000 // CHUNK] == 0

    def match(c: int, off: int) -> float:
        pos = c * CHUNK - lag + shifts[c] + off
        a, b = chunks[c].astype(np.float64), x[pos:pos + CHUNK].astype(np.float64)
        return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))

    # where each chunk of the played audio sits in the input, relative to where the shift says
    offsets = [-1440, -960, -480, 0, 480, 960, 1440]
    where = {}
    for c in range(100, len(chunks) - 10):
        if c * CHUNK - lag + shifts[c] + 2 * CHUNK < len(x):
            scores = [match(c, off) for off in offsets]
            if max(scores) > 0.5:  # the right offset scores ~0.75, the others ~0
                where[c] = offsets[int(np.argmax(scores))]
    assert len(where) > 1000
    assert all(off == 0 for off in where.values())
    jumped = np.nonzero(steps)[0] + 1
    after = [c for c in where if any(0 <= c - j <= 3 for j in jumped)]
    assert len(after) >= 3 and all(where[c] == 0 for c in after)


def test_a_pause_of_the_sender_is_one_small_timeline_jump_when_it_talks_again() -> None:
    """A sender that pauses for 3 s (hold, an outage) and resumes with its RTP clock 3 s on: the buffer
    goes silent and re-primes.  Its timeline did not move 3 s against real time, only by the difference
    of the two primings: one small net jump at the first chunk after the pause, none chunk by chunk
    during it (an echo canceller told each silent chunk would lose its delay and taps)."""
    x = (np.random.default_rng(1).standard_normal(12 * 48_000) * 0.1).astype(np.float32)
    pk = _packets(x, bitrate=128_000)
    clock = FakeClock()
    jb = JitterBuffer(clock=clock, min_delay_ms=20.0, start_delay_ms=40.0)
    # packets 0-199 (4 s), a 3 s pause (150 packets' time), then 200-449; RTP time runs on through the pause
    sent = [(i if i < 200 else i + 150) for i in range(len(pk) - 150)]
    shifts, k = [], 0
    for tick in range(2 * (sent[-1] + 20)):
        clock.t = tick * 0.01
        while k < len(sent) and 0.005 + sent[k] * 0.02 <= clock.t:
            jb.push(k, sent[k] * 960, pk[k], 0.005 + sent[k] * 0.02)
            k += 1
        jb.pull()
        shifts.append(jb.timeline_shift)
    steps = np.diff(shifts)
    silent = slice(2 * 200 + 20, 2 * 350)  # from past the concealment at its start to the resume
    assert not steps[silent].any()
    resumed = [int(s) for s in steps[2 * 350:2 * 360] if s]
    assert len(resumed) == 1, resumed  # the net jump, at once
    # the concealment's stretch at the pause's start and the jump at its end: together the difference of
    # the two primings, a few packets at most
    assert abs(int(steps[2 * 200 - 10:2 * 360].sum())) <= 3 * 960


def test_a_buffer_at_its_target_drops_nothing() -> None:
    pk = _packets(np.tile(speech(seconds=4.0), 3))
    clock = FakeClock()
    jb = JitterBuffer(clock=clock, min_delay_ms=20.0, start_delay_ms=20.0)
    _depths(jb, clock, pk, jitter_ms=4.0)
    assert jb.stats.discarded == 0 and jb.stats.concealed_chunks == 0


async def test_slow_subscriber_drops_old_packets_and_stays_current() -> None:
    fanout = Fanout()
    slow = SubscriberTrack(max_queue=5)
    fast = SubscriberTrack(max_queue=5)
    slow.attach(fanout)
    fast.attach(fanout)
    for i in range(100):
        fanout.publish(EncodedPacket(data=bytes([i % 256]) * 10, pts=i * 960))
        if i % 1 == 0:
            got = await fast.recv()
            assert got.data[0] == i % 256
    # the slow one never read: it holds only the newest 100 ms, not 2 s of backlog
    first = await asyncio.wait_for(slow.recv(), 1)
    assert first.data[0] == 95
    assert slow.dropped == 95
    # timestamps stay continuous for the receiver even after the drop
    second = await slow.recv()
    assert second.pts - first.pts == 960 * 1


async def test_encoder_makes_one_packet_per_20ms_for_all_subscribers() -> None:
    enc = StreamEncoder(bitrate=24_000)
    fanout = Fanout()
    tracks = [SubscriberTrack(max_queue=100) for _ in range(10)]
    for t in tracks:
        t.attach(fanout)
    x = speech(seconds=1.0)
    for i in range(0, 48_000, 480):
        p = enc.push(x[i:i + 480])
        if p is not None:
            fanout.publish(p)
    assert enc.packets == 50
    for t in tracks:
        got = [await t.recv() for _ in range(50)]
        assert len({g.data for g in got}) > 40


class _ShiftingSource:
    """A microphone whose jitter buffer's timeline jumps when the test says so (``playout.timeline_shift``)."""

    def __init__(self) -> None:
        self.playout = types.SimpleNamespace(timeline_shift=0, trim_room=None)

    def pull(self) -> tuple[np.ndarray, None]:
        return np.zeros(CHUNK, dtype=np.float32), None

    def close(self) -> None:
        pass


async def test_the_echo_canceller_is_told_each_timeline_jump_once_and_only_its_own() -> None:
    """What the stream tells its ``aec`` stage: the playout's jumps from when the stage runs on (the ones
    before do not move a canceller that was not there), and a chunk dropped on the executor's backlog as
    a skip of its own (the canceller never saw it)."""
    from enhancers.aec.webrtc import SHIFT_HEADROOM
    from enhancers.executor import Executor, ExecutorConfig
    from mediaserver.clock import MediaClock
    from mediaserver.pipeline import PipelineHub
    from mediaserver.stream import _MAX_INFLIGHT, PublishedStream

    executor = Executor(ExecutorConfig(device="cpu", deadline_ms=5_000.0))
    await executor.start()
    try:
        source = _ShiftingSource()
        pipeline = PipelineHub(executor).open("mic", [])
        stream = PublishedStream("s1", "p1", "audio", source, pipeline, MediaClock())
        source.playout.timeline_shift = 960  # a trim while no stage runs
        stream._on_tick()
        pipeline.set_stages(["aec"])
        told = pipeline._executor_stream
        assert told is not None and told.aec_follows_shifts
        stream._on_tick()
        assert told.near_shift == 0
        assert source.playout.trim_room is None  # the MDF canceller follows any jump: the buffer may trim
        source.playout.timeline_shift = 1920  # one more packet skipped
        stream._on_tick()
        assert told.near_shift == 960
        while len(stream._at_executor) < _MAX_INFLIGHT:  # the executor's answers wait for the loop
            stream._on_tick()
        stream._on_tick()  # dropped on the backlog
        assert stream.counters.dropped_backlog == 1 and told.near_shift == 960
        for _ in range(100):
            await asyncio.sleep(0.01)
            if not stream._at_executor:
                break
        stream._on_tick()
        assert told.near_shift == 960 + CHUNK
        pipeline.set_stages(["aec:webrtc"])  # AEC3 follows within its far end's delay line
        stream._on_tick()
        assert source.playout.trim_room == SHIFT_HEADROOM
        for shift, room in ((960, SHIFT_HEADROOM - 960),
                            (SHIFT_HEADROOM, 0),  # past its room (a burst drop): the buffer keeps its delay
                            (-960, 960)):  # concealment gives room back
            source.playout.timeline_shift += shift
            stream._on_tick()  # told before this chunk
            stream._on_tick()  # the room the buffer may use from the next pull on
            assert source.playout.trim_room == room
        stream.closed = True
        pipeline.close()
    finally:
        await executor.close()
