"""Admission control: a full executor gives newcomers lighter stages (or none), never the admitted ones.

"Full" is made deterministic with declared stage costs (``stage_costs``: a floor under the measured
cost) on stages that really cost nothing (``tests.fault_stages.HalvingStage``): a heavy variant declared
at 6 ms per stream and a light one at 1.5 ms, against a budget of the whole 10 ms tick.  So one heavy
stream fits, a second one does not (12 ms) but its light variant does (7.5 ms), and so on.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import aiohttp
import numpy as np
import pytest

from enhancers import registry
from enhancers.executor import Executor, ExecutorConfig, ExecutorStream
from enhancers.executor.admission import candidates
from enhancers.stage import CHUNK
from loadtest.bot import Bot
from mediaserver.config import AuthConfig, EnhanceConfig, ServerConfig
from tests.conftest import ServerFactory, speech
from tests.test_telemetry import sample, scrape, wait_for

HEAVY, LIGHT = "denoise:heavy", "denoise:light"
COSTS = {HEAVY: (0.0, 6.0), LIGHT: (0.0, 1.5)}


@pytest.fixture
def test_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.STAGES, HEAVY, "tests.fault_stages:HalvingStage")
    monkeypatch.setitem(registry.STAGES, LIGHT, "tests.fault_stages:HalvingStage")
    monkeypatch.setitem(registry.LIGHTER, HEAVY, (LIGHT,))


def test_ladder_goes_down_to_no_stages() -> None:
    ladder = list(candidates(["aec", "dereverb", "denoise", "vad", "limiter"]))
    assert ladder[0] == ["aec", "dereverb", "denoise", "vad", "limiter"]
    assert ladder[1] == ["aec", "denoise", "vad", "limiter"]  # dereverb goes first
    assert ladder[2:5] == [["aec", s, "vad", "limiter"] for s in registry.LIGHTER["denoise"]]
    light = registry.LIGHTER["denoise"][-1]
    assert ladder[5] == ["aec:webrtc", light, "vad", "limiter"]  # then the light echo canceller
    assert ["aec:webrtc", "vad", "limiter"] in ladder and ["vad", "limiter"] in ladder
    assert ladder[-1] == []
    assert list(candidates([])) == [[]]


def test_on_shared_cores_the_media_process_cpu_counts_too() -> None:
    """A worker on the media process's own core: the stages fit the tick, but with what the media process
    already spends (its decode, encode, forwarding) the core is full, so the newcomer gets a lighter list."""
    from enhancers.executor.admission import Admission, LoadModel

    model = LoadModel({HEAVY: (0.0, 1.0), LIGHT: (0.0, 0.25)})
    lighter = {HEAVY: (LIGHT,)}
    own_cores = Admission(model, target_load=0.55, upgrade_load=0.45, lighter=lighter)
    shared = Admission(model, target_load=0.55, upgrade_load=0.45, lighter=lighter, shared_cpus=1, cpu_target=0.8)
    others = {HEAVY: 3}  # 3 ms of stages per tick; the newcomer's heavy list makes 4 ms: 0.4 of the tick
    assert own_cores.decide([HEAVY], others).result == "admitted"
    assert shared.decide([HEAVY], others, host_ms=2.0).result == "admitted"  # (4 + 2) / 10 = 0.6 of the core
    busy = shared.decide([HEAVY], others, host_ms=4.5)  # (4 + 4.5) / 10 = 0.85: too much; light: 0.775
    assert busy.result == "degraded" and busy.stages == [LIGHT] and "CPU full" in busy.reason
    assert shared.decide([HEAVY], others, host_ms=6.0).result == "refused"  # not even the light one fits


def test_the_core_fills_further_only_while_the_worker_runs_ahead_of_the_media_process() -> None:
    """At the media process's priority the worker's rounds wait behind the loop's bursts, so admission
    stops at 0.8 of a shared core; with the worker ahead of it (nice steps), at ``cpu_target`` (0.9),
    unless the stages make one long round of the tick."""
    from enhancers.executor.admission import UNBOOSTED_CPU_TARGET, AdmissionControl

    config = ExecutorConfig(stage_costs={HEAVY: (0.0, 1.0)}, shared_cpus=1.0, cpu_target=0.9)
    boost: list[int | None] = [None]
    control = AdmissionControl(config, {}, lambda *_: None, worker_boost=lambda: boost[0])
    assert control.cpu_target() == UNBOOSTED_CPU_TARGET == 0.8  # no worker process yet
    boost[0] = 0
    assert control.cpu_target() == 0.8  # same priority (no CAP_SYS_NICE, or a boost of 0)
    boost[0] = 5
    assert control.cpu_target() == 0.9
    others = {HEAVY: 3}  # 4 ms of stages with the newcomer, 4.5 ms of host: 0.85 of the core
    assert control.policy.decide([HEAVY], others, host_ms=4.5, cpu_limit=control.cpu_target()).result == "admitted"
    # a tick whose stages take over 0.45 of it (one long round) is held to 0.8 of the core all the same
    assert control.policy.decide([HEAVY], {HEAVY: 4}, host_ms=3.5, cpu_limit=control.cpu_target()).result \
        != "admitted"  # 5 ms of stages: 0.5 of the tick; 0.85 of the core
    assert control.policy.decide([HEAVY], {HEAVY: 4}, host_ms=2.5, cpu_limit=control.cpu_target()).result \
        == "admitted"  # 0.75 of the core
    boost[0] = 0
    assert control.policy.decide([HEAVY], others, host_ms=4.5, cpu_limit=control.cpu_target()).result != "admitted"
    assert AdmissionControl(replace(config, cpu_target=0.7), {}, lambda *_: None,
                            worker_boost=lambda: 5).cpu_target() == 0.7  # a lower setting is kept


def test_the_cpu_target_comes_from_the_environment_within_bounds() -> None:
    from mediaserver.config import load_config

    assert load_config(env={"MEDIASERVER_DEV": "1"}).enhance.cpu_target == 0.9
    env = {"MEDIASERVER_DEV": "1", "MEDIASERVER_EXECUTOR_CPU_TARGET": "0.75"}
    assert load_config(env=env).enhance.cpu_target == 0.75
    with pytest.raises(ValueError, match="CPU_TARGET"):
        load_config(env={**env, "MEDIASERVER_EXECUTOR_CPU_TARGET": "1.5"})


async def _run(streams: list[ExecutorStream], ticks: int) -> dict[int, list[bool]]:
    """Feed every stream running stages a chunk per tick; which chunks came back bypassed, per stream."""
    bypassed: dict[int, list[bool]] = {s.stream_id: [] for s in streams}
    chunk = np.full(CHUNK, 0.25, dtype=np.float32)
    for _ in range(ticks):
        live = [s for s in streams if s.stages and not s.closed]
        results = await asyncio.gather(*(s.process(chunk) for s in live))
        for s, r in zip(live, results):
            bypassed[s.stream_id].append(r.bypassed or not np.allclose(r.audio, 0.125))
        await asyncio.sleep(0.01)
    return bypassed


async def test_newcomers_get_lighter_stages_then_none_and_are_upgraded_when_load_drops(test_stages: None) -> None:
    config = ExecutorConfig(device="cpu", deadline_ms=1000.0, admission=True, target_load=1.0, upgrade_load=0.8,
                            upgrade_interval_s=0.3, stage_costs=COSTS)
    executor = Executor(config)
    await executor.start()
    try:
        changed: list[list[str]] = []
        a = executor.open_stream(HEAVY, label="a")
        b = executor.open_stream(HEAVY, label="b")
        b.on_change = lambda s: changed.append(list(s.stages))
        c = executor.open_stream(HEAVY, label="c")
        d = executor.open_stream(HEAVY, label="d")
        assert (a.stages, a.degraded_reason) == ([HEAVY], "")
        assert b.stages == c.stages == [LIGHT] and "executor full" in b.degraded_reason
        assert b.requested_stages == [HEAVY]
        assert d.stages == [] and "forwarded unprocessed" in d.degraded_reason
        stats = executor.stats()
        assert stats["admissions"] == {"admitted": 1, "degraded": 2, "refused": 1}, stats
        assert stats["degraded_streams"] == 3 and stats["load"] == pytest.approx(0.9)

        for s in (a, b, c):
            await s.wait_ready()
        bypassed = await _run([a, b, c], ticks=100)
        assert not any(bypassed[a.stream_id]), "the admitted stream lost chunks to the newcomers"
        assert not any(bypassed[b.stream_id]), "a degraded stream still runs its (lighter) stage"
        assert a.stages == [HEAVY], "an admitted stream was degraded"

        a.close()  # 6 ms freed: b's heavy stage fits under upgrade_load (6 + 1.5 for c <= 8), c's and d's not
        await wait_for(lambda: b.stages == [HEAVY], timeout=20.0)
        assert changed == [[HEAVY]] and b.degraded_reason == ""
        await asyncio.sleep(1.0)  # a few more upgrade checks: nothing else fits, nothing flaps
        assert c.stages == [LIGHT] and d.stages == [] and b.stages == [HEAVY]
        assert executor.stats()["upgrades"] == 1
        bypassed = await _run([b, c], ticks=30)
        assert not any(bypassed[b.stream_id])
    finally:
        await executor.close()


async def test_a_full_server_degrades_the_newcomer_and_tells_it(start_server: ServerFactory,
                                                                test_stages: None) -> None:
    enhance = replace(EnhanceConfig(), default_stages=(), device="cpu", deadline_ms=400.0, target_load=1.0,
                      upgrade_load=0.8, upgrade_interval_s=0.5,
                      stage_costs=tuple((spec, *cost) for spec, cost in COSTS.items()))
    rs = await start_server(ServerConfig(host="127.0.0.1", port=0, auth=AuthConfig(dev_mode=True), enhance=enhance))
    await rs.server.hub.executor.preload([HEAVY, LIGHT])  # the worker process and both stages are up
    first = Bot(rs.url, "full", "first", speech(), stages=[HEAVY])
    second = Bot(rs.url, "full", "second", speech(), stages=[HEAVY])
    listener = Bot(rs.url, "full", "listener", None, stages=[])
    await first.join()
    await listener.join()

    def stats_of(bot: Bot) -> dict | None:
        for event in reversed(listener.events_of("stats")):
            for s in event["streams"]:
                if s["participant"] == bot.id:
                    return s  # type: ignore[no-any-return]
        return None

    await wait_for(lambda: (stats_of(first) or {}).get("chunks", 0) > 100, timeout=30.0)
    await second.join()
    try:
        await wait_for(lambda: bool(second.events_of("stages-degraded")), timeout=20.0)
        event = second.events_of("stages-degraded")[0]
        assert event["stages"] == [LIGHT] and event["requested_stages"] == [HEAVY], event
        assert "executor full" in event["reason"]
        assert not first.events_of("stages-degraded")
        await wait_for(lambda: stats_of(second) is not None, timeout=30.0)
        before = stats_of(first)
        assert before is not None
        await wait_for(lambda: (stats_of(second) or {}).get("chunks", 0) > 300, timeout=30.0)
        s1, s2 = stats_of(first), stats_of(second)
        assert s1 is not None and s2 is not None
        assert s1["stages"] == [HEAVY] and s1["degraded_reason"] is None
        assert s2["stages"] == [LIGHT] and s2["requested_stages"] == [HEAVY] and s2["degraded_reason"]
        # the admitted stream keeps the SLO while the newcomer runs: < 1 % of its chunks bypassed
        assert s1["bypassed"] - before["bypassed"] < 0.01 * (s1["chunks"] - before["chunks"]), (before, s1)
        room = rs.server.rooms.rooms["full"].describe()
        described = {p["id"]: p for p in room["participants"]}
        assert described[second.id]["stages"] == [LIGHT] and described[second.id]["degraded_reason"]

        async with aiohttp.ClientSession() as http:
            health = await (await http.get(f"{rs.url}/healthz")).json()
        assert health["executor"]["load"] == pytest.approx(0.75) and health["executor"]["headroom"] > 0
        samples, text = await scrape(rs.url)
        assert sample(samples, "mediaserver_executor_admissions_total", result="admitted") >= 1
        assert sample(samples, "mediaserver_executor_admissions_total", result="degraded") == 1
        assert "mediaserver_executor_load" in text
        assert "mediaserver_executor_stage_faults_total" in text and "mediaserver_executor_stage_recoveries" in text

        await first.leave()
        await wait_for(lambda: bool(second.events_of("stages-restored")), timeout=20.0)
        assert second.events_of("stages-restored")[0]["stages"] == [HEAVY]
        await wait_for(lambda: (stats_of(second) or {}).get("stages") == [HEAVY], timeout=20.0)
    finally:
        await second.leave()
        await listener.leave()


def test_missed_deadlines_shed_the_newest_stream_one_step_not_the_older_ones() -> None:
    """The model let in more than the machine carries: the executor's own counters say so, and the stream
    admitted last moves one step down its ladder; the ones admitted before keep their stages."""
    from types import SimpleNamespace

    from enhancers.executor.admission import candidates
    from enhancers.executor.shedding import LoadShedder

    counters = {"chunks": 0, "bypass_deadline": 0, "dropped_backlog": 0}
    old = SimpleNamespace(stream_id=1, label="old", stages=["denoise"], requested_stages=["denoise"],
                          changed_at=1.0, closed=False, degraded_reason="")
    new = SimpleNamespace(stream_id=2, label="new", stages=["denoise"], requested_stages=["denoise"],
                          changed_at=2.0, closed=False, degraded_reason="")
    streams = {1: old, 2: new}
    applied: list[tuple[str, list[str]]] = []

    def apply(stream: SimpleNamespace, stages: list[str]) -> None:
        applied.append((stream.label, stages))
        stream.stages = stages

    shedder = LoadShedder(counters, max_bypass=0.01, hold_s=20.0)
    ladder = lambda requested: list(candidates(requested))  # noqa: E731
    assert shedder.check(streams, ladder, apply, now=10.0) is None  # first mark
    counters["chunks"] += 1000
    counters["bypass_deadline"] += 5  # 0.5 %: within the budget
    assert shedder.check(streams, ladder, apply, now=12.0) is None
    counters["chunks"] += 1000
    counters["bypass_deadline"] += 300  # 30 % missed their deadline: once could be a transient
    assert shedder.check(streams, ladder, apply, now=14.0) is None
    counters["chunks"] += 1000
    counters["bypass_deadline"] += 300  # and again
    assert shedder.check(streams, ladder, apply, now=16.0) is new
    assert applied == [("new", list(candidates(["denoise"]))[1])] and old.stages == ["denoise"]
    assert "overloaded" in new.degraded_reason and shedder.holding(20.0) and not shedder.holding(40.0)


def test_a_stage_not_timed_yet_takes_a_few_streams_until_its_cost_is_measured() -> None:
    """Slow start: a prior is a guess for this machine, so a burst of joins is not all let in on it. The
    first streams run the stage; the next ones wait on no stages ("measuring") until the stage has been
    timed at a batch half their number; a stage timed as expensive then admits what the tick holds."""
    from enhancers.executor.admission import MIN_SAMPLES, PROBE_ROWS, Admission, LoadModel

    spec = "denoise:gtcrn"  # prior 0.35 ms + 0.065 ms per stream: on the prior alone 16 streams fit easily
    model = LoadModel()
    policy = Admission(model, target_load=0.55, upgrade_load=0.45, lighter={})
    rows: dict[str, int] = {}
    burst = []
    for _ in range(8):
        decision = policy.decide([spec], rows)
        burst.append(decision)
        rows = policy.plus(rows, decision.stages)
    assert [d.result for d in burst[:PROBE_ROWS]] == ["admitted"] * PROBE_ROWS
    waiting = burst[PROBE_ROWS]
    assert waiting.stages == [] and waiting.measuring and "measuring the cost" in waiting.reason, waiting
    assert rows == {spec: PROBE_ROWS}

    for _ in range(MIN_SAMPLES):  # timed at the streams it runs: 1.2 ms a call
        model.observe(spec, PROBE_ROWS, 0.0012)
    assert policy.decide([spec], {spec: PROBE_ROWS}).result == "admitted"  # trusted up to twice the batch
    assert policy.decide([spec], {spec: 2 * PROBE_ROWS}).measuring

    cheap = policy.decide(["vad", "limiter"], {"vad": 32, "limiter": 32})  # too cheap for a prior's error to matter
    assert cheap.result == "admitted", cheap

    expensive = LoadModel()
    for _ in range(MIN_SAMPLES):  # the same stage on a slower machine: 6 ms a call
        expensive.observe(spec, PROBE_ROWS, 0.006)
    full = Admission(expensive, target_load=0.55, upgrade_load=0.45, lighter={}).decide([spec], {spec: PROBE_ROWS})
    assert full.result == "refused" and not full.measuring and "executor full" in full.reason, full


def test_an_overload_of_several_streams_is_shed_in_one_check_newest_first() -> None:
    """Deadlines missed with the model timed at the real batch: the newest streams go one step down each,
    as many as the model says must, and the oldest keeps its stages."""
    from types import SimpleNamespace

    from enhancers.executor.admission import candidates
    from enhancers.executor.shedding import LoadShedder

    counters = {"chunks": 0, "bypass_deadline": 0, "dropped_backlog": 0}
    streams = {i: SimpleNamespace(stream_id=i, label=f"s{i}", stages=["denoise"], requested_stages=["denoise"],
                                  changed_at=float(i), closed=False, degraded_reason="") for i in range(1, 5)}

    def apply(stream: SimpleNamespace, stages: list[str]) -> None:
        stream.stages = stages

    def fits() -> bool:  # the model: the tick holds two streams of "denoise"
        return sum(1 for s in streams.values() if s.stages == ["denoise"]) <= 2

    shedder = LoadShedder(counters, max_bypass=0.01, hold_s=20.0)
    ladder = lambda requested: list(candidates(requested))  # noqa: E731
    shedder.check(streams, ladder, apply, now=10.0, fits=fits)
    for now in (12.0, 14.0):
        counters["chunks"] += 1000
        counters["bypass_deadline"] += 400
        first = shedder.check(streams, ladder, apply, now=now, fits=fits)
    assert first is streams[4] and [s.stream_id for s in shedder.last_shed] == [4, 3]
    assert streams[1].stages == streams[2].stages == ["denoise"]
    assert streams[3].stages == streams[4].stages == list(candidates(["denoise"]))[1]
    assert shedder.shed == 2 and "overloaded" in streams[3].degraded_reason


async def test_a_burst_of_streams_gets_a_real_stage_as_its_cost_is_measured() -> None:
    """Six streams open at once on GTCRN before it ever ran: one runs it, five wait on no stages; as the
    worker times it at ever larger batches (1, 2, 4), they are upgraded and their noise is taken out too."""
    from tests.conftest import noise

    spec = "denoise:gtcrn"
    executor = Executor(ExecutorConfig(device="cpu", deadline_ms=1000.0, admission=True))
    await executor.start()
    try:
        await executor.preload([spec])
        streams = [executor.open_stream(spec, label=f"s{i}") for i in range(6)]
        assert [s.stages for s in streams] == [[spec]] + [[]] * 5
        for s in streams[1:]:
            assert "measuring the cost" in s.degraded_reason, s.degraded_reason
        assert executor.stats()["admissions"]["admitted"] == 1

        tap = noise(seconds=8.0).astype(np.float32)  # a real running tap
        tap = np.tile(tap * (0.05 / float(np.sqrt(np.mean(tap ** 2)))), 3)
        processed = 0  # chunks of a stream that waited, processed after its upgrade
        energy_in = energy_out = 0.0
        for i in range(len(tap) // CHUNK):
            chunk = np.ascontiguousarray(tap[i * CHUNK:(i + 1) * CHUNK])
            results = await asyncio.gather(*(s.process(chunk) for s in streams))
            if streams[5].stages == [spec] and not results[5].bypassed:
                processed += 1
                if processed > 100:  # its GTCRN state has settled
                    energy_in += float(np.sum(chunk ** 2))
                    energy_out += float(np.sum(results[5].audio ** 2))
                if processed >= 400:
                    break
            await asyncio.sleep(0.005)
        assert all(s.stages == [spec] for s in streams), [s.degraded_reason for s in streams]
        assert processed >= 400, f"the last stream ran GTCRN for {processed} chunks only"
        assert energy_out < 0.25 * energy_in, (energy_out, energy_in)  # GTCRN takes the tap noise out
        assert executor.stats()["upgrades"] >= 5
    finally:
        await executor.close()


def test_unpinned_media_workers_budget_their_share_of_the_cores() -> None:
    """Media workers that are not pinned (more workers than cores) share every core: each one's admission
    budgets its share, not all of them (N workers each believing it had every core admitted N times what
    fits); a worker pinned to a core of its own is told 1.0 by its entry point."""
    import os
    from dataclasses import replace

    from mediaserver.config import AuthConfig, ServerConfig
    from mediaserver.server import MediaServer

    cpus = len(os.sched_getaffinity(0))
    config = ServerConfig(auth=AuthConfig(dev_mode=True))
    assert MediaServer(replace(config, workers=2 * cpus))._shared_cpus() == 0.5
    assert MediaServer(replace(config, workers=cpus))._shared_cpus() == 1.0
    pinned = replace(config, workers=2 * cpus, enhance=replace(config.enhance, shared_cpus=1.0))
    assert MediaServer(pinned)._shared_cpus() == 1.0


def test_the_host_cost_counts_the_media_process_children_but_not_its_neighbours() -> None:
    """What admission adds to the stages on a shared core: the media process's CPU and its children's (the
    synthesizer, the executor worker's time beyond its stages), not another program's, and not a child at
    SCHED_IDLE (the quality scorer), which yields the core to every tick."""
    import subprocess
    import sys
    import time

    from enhancers.executor.host_cpu import HostCpu

    loop = "import time\nend = time.monotonic() + 8\nwhile time.monotonic() < end: pass"
    spin = [sys.executable, "-c", loop]
    spin_idle = [sys.executable, "-c", "from enhancers.process_name import idle_priority\nidle_priority()\n" + loop]

    def measure(child: bool, stage_s: float = 0.0, idle: bool = False) -> float:
        host = HostCpu(mean_s=0.5)
        proc = subprocess.Popen(spin_idle if idle else spin) if child else None
        try:
            time.sleep(0.3)
            for _ in range(5):
                host.sample()
                host.add_stage_time(stage_s)
                time.sleep(0.55)
            return host.ms
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()

    assert HostCpu(1.0).source == "tree"
    spinning_child = measure(child=True)
    assert spinning_child >= 3.0, spinning_child  # ms per 10 ms tick: a child spinning on a core of the two
    # the same child, its time reported as the stages' (an executor worker): not counted twice
    assert measure(child=True, stage_s=0.55) < spinning_child - 3.0
    assert measure(child=True, idle=True) < 1.0  # a child at SCHED_IDLE: not the host's cost
    neighbour = subprocess.Popen(spin, start_new_session=True)  # not a child of the measuring process...
    try:
        code = ("import time\nfrom enhancers.executor.host_cpu import HostCpu\nh = HostCpu(0.5)\n"
                "for _ in range(5):\n    h.sample(); time.sleep(0.55)\nprint(h.ms)")
        alone = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                     timeout=60).stdout)
    finally:
        neighbour.kill()
        neighbour.wait()
    assert alone < 1.0, alone  # ...so a process that only sleeps reads ~0
