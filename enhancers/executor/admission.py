"""How much of the 10 ms tick the executor's stages use, and which stages a new stream may get.

:class:`LoadModel` keeps, per stage spec, a running linear model of the time
of one batched call as a function of its batch size (``fixed + per_stream * n``
ms), fitted from the worker's own timings of every call (exponentially
weighted moments, so it follows the machine).  Until a stage has been measured
its prior is used (``DEFAULT_STAGE_COSTS``, measured on one CPU core, or the
configured ``stage_costs``); a configured cost is also a floor under the
measured one.  The predicted tick time of a set of streams is the sum, over
the stages any of them runs, of ``fixed + per_stream * rows``.

:class:`Admission` decides what a stream that asks for stages gets: what it
asked for when that fits the budget (``target_load`` of the tick) together
with every stream already admitted, else the first lighter candidate of the
ladder that fits (:func:`candidates`), else no stages.  Streams already
admitted are never degraded to make room.  A degraded stream is upgraded
when its better candidate fits under the lower ``upgrade_load`` (hysteresis).

A prior is only a guess for this machine (DF3's was 3x too low on the development VM), so the
model's word on a spec is trusted only as far as it was measured, as TCP's slow start trusts a
path: a spec timed fewer than ``MIN_SAMPLES`` calls takes at most ``PROBE_ROWS`` streams (one), one
timed at batches of up to ``n`` streams at most ``2 n``; a stream that would go beyond waits on a
lighter list of stages that run already ("measuring") and is upgraded, checked every
``PROBE_RECHECK_S``, as the measured batch grows.  An operator's declared cost (``stage_costs``)
is trusted as it is, and so is the prior of a stage too cheap for an error to matter (VAD, limiter).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from enhancers.executor.config import ExecutorConfig
from enhancers.executor.host_cpu import TICK_MS, HostCpu
from enhancers.executor.messages import RoundResult
from enhancers.executor.shedding import LoadShedder
from enhancers.executor.stream import ExecutorStream
from enhancers.registry import DEGRADE_STEPS, LIGHTER

log = logging.getLogger("enhancers.executor")

# the share of shared cores admission fills while the executor's worker runs at the media process's priority,
# and when the stages take more than LONG_ROUND_LOAD of the tick: a long round holds the media loop off the core
# for longer at a time (the full chain at 0.55 of the tick missed 8 % of its deadlines at 0.89 of the core once,
# where DF3 at 0.39 of the tick held 20 streams at 0.87-0.90)
UNBOOSTED_CPU_TARGET = 0.8
LONG_ROUND_LOAD = 0.45
ADMISSION_RESULTS = ("admitted", "degraded", "refused")


# spec -> (fixed ms per batched call, ms per stream): measured at batch 1 and 4 on one busy CPU core
# (torch 1 thread, thread CPU time, 100 calls); a stage's prior until the worker has timed it
DEFAULT_STAGE_COSTS: dict[str, tuple[float, float]] = {  # bench/stage_cost.py, one core with VNNI (int8)
    "denoise": (0.5, 0.12), "denoise:df3": (0.5, 0.12), "denoise:gtcrn": (0.35, 0.065),
    "denoise:nsnet2": (0.6, 0.065), "denoise:rnnoise": (0.05, 0.52), "dereverb": (0.25, 0.05),
    "aec": (0.45, 0.12), "aec:webrtc": (0.06, 0.11), "vad": (0.02, 0.01), "vad:webrtc": (0.02, 0.01), "limiter": (0.04, 0.01),
}
UNKNOWN_STAGE_COST = (0.5, 1.0)  # a spec with no prior (tests' stages, new models): pessimistic
MIN_SAMPLES = 20  # calls timed before the measured model replaces the prior
HOST_MEAN_S = 5.0  # time constant of the host's measured CPU (shared cores)
PROBE_ROWS = 1  # streams a spec not yet timed may take (TCP: an initial window of one)
CHEAP_MS = 1.0  # a spec whose prior prices 64 streams under this (VAD, limiter) is not probed: 4x off is noise
PROBE_RECHECK_S = 0.5  # how often streams waiting for a spec's cost to be measured are upgraded
ALPHA = 0.05  # weight of one call in the running moments (~20 calls, a fraction of a second)


class _Moments:
    __slots__ = ("max_rows", "n", "nn", "nt", "samples", "t")

    def __init__(self) -> None:
        self.n = self.t = self.nn = self.nt = 0.0
        self.samples = self.max_rows = 0

    def add(self, rows: int, ms: float) -> None:
        a = 1.0 if self.samples == 0 else ALPHA
        self.samples += 1
        self.max_rows = max(self.max_rows, rows)
        self.n += a * (rows - self.n)
        self.t += a * (ms - self.t)
        self.nn += a * (rows * rows - self.nn)
        self.nt += a * (rows * ms - self.nt)


class LoadModel:
    """Per-stage ``fixed + per_stream * n`` cost of one batched call, from priors and measurements."""

    def __init__(self, declared: Mapping[str, tuple[float, float]] | None = None) -> None:
        self.declared = dict(declared or {})
        self._moments: dict[str, _Moments] = {}

    def observe(self, spec: str, rows: int, seconds: float) -> None:
        """One timed batched call of ``spec`` over ``rows`` streams."""
        if rows > 0:
            self._moments.setdefault(spec, _Moments()).add(rows, seconds * 1e3)

    def cost(self, spec: str) -> tuple[float, float]:
        """``(fixed_ms, per_stream_ms)`` of ``spec`` now."""
        floor = self.declared.get(spec, (0.0, 0.0))
        prior = self.declared.get(spec) or DEFAULT_STAGE_COSTS.get(spec) or UNKNOWN_STAGE_COST
        m = self._moments.get(spec)
        if m is None or m.samples < MIN_SAMPLES:
            fixed, per = prior
        else:
            var = m.nn - m.n * m.n
            if var > 0.25:  # the batch size varied enough to tell the fixed part from the per-stream one
                per = max(0.0, (m.nt - m.n * m.t) / var)
                fixed = max(0.0, m.t - per * m.n)
            else:  # one batch size: split the measured time the way the prior does
                expected = prior[0] + prior[1] * m.n
                scale = m.t / expected if expected > 0 else 1.0
                fixed, per = prior[0] * scale, prior[1] * scale
        return max(fixed, floor[0]), max(per, floor[1])

    def trusted_rows(self, spec: str) -> float:
        """How many streams the model's cost of ``spec`` may be trusted for (slow start)."""
        prior = DEFAULT_STAGE_COSTS.get(spec)
        if spec in self.declared or (prior is not None and prior[0] + 64 * prior[1] <= CHEAP_MS):
            return float("inf")
        m = self._moments.get(spec)
        if m is None or m.samples < MIN_SAMPLES:
            return PROBE_ROWS
        return max(PROBE_ROWS, 2 * m.max_rows)

    def timed(self, spec: str) -> bool:
        """``spec`` runs here: its calls have been timed."""
        m = self._moments.get(spec)
        return m is not None and m.samples >= MIN_SAMPLES

    def largest_batch(self, spec: str) -> int:
        """The most streams one timed call of ``spec`` ran (0: not timed)."""
        m = self._moments.get(spec)
        return m.max_rows if m is not None else 0

    def tick_ms(self, rows: Mapping[str, int]) -> float:
        """Predicted stage time of one tick where ``rows[spec]`` streams run ``spec``."""
        total = 0.0
        for spec, n in rows.items():
            if n > 0:
                fixed, per = self.cost(spec)
                total += fixed + per * n
        return total

    def describe(self) -> dict[str, dict[str, float | int]]:
        out: dict[str, dict[str, float | int]] = {}
        for spec in sorted(set(self._moments) | set(self.declared)):
            fixed, per = self.cost(spec)
            m = self._moments.get(spec)
            out[spec] = {"fixed_ms": round(fixed, 4), "per_stream_ms": round(per, 4),
                         "timed_calls": m.samples if m is not None else 0,
                         "largest_batch": m.max_rows if m is not None else 0}
        return out


def candidates(requested: Sequence[str], lighter: Mapping[str, Sequence[str]] = LIGHTER,
               steps: Sequence[tuple[str, str]] = DEGRADE_STEPS) -> Iterator[list[str]]:
    """``requested`` first, then ever lighter stage lists (the ladder of ``enhancers.registry``), then ``[]``.

    Each step of ``steps`` applies to what the previous ones left: ``("drop", kind)`` removes that
    kind's stage; ``("lighter", kind)`` yields the list with each lighter variant of it in turn,
    keeping the lightest.
    """
    current = list(requested)
    seen: set[tuple[str, ...]] = set()

    def fresh(stages: list[str]) -> bool:
        key = tuple(stages)
        if key in seen:
            return False
        seen.add(key)
        return True

    if fresh(current):
        yield list(current)
    for action, kind in steps:
        index = next((i for i, s in enumerate(current) if s.split(":", 1)[0] == kind), None)
        if index is None:
            continue
        if action == "drop":
            current = current[:index] + current[index + 1:]
            if fresh(current):
                yield list(current)
        else:
            for variant in lighter.get(current[index], ()):
                current = current[:index] + [variant] + current[index + 1:]
                if fresh(current):
                    yield list(current)
    if fresh([]):
        yield []


@dataclass
class Decision:
    """What a stream gets: ``stages``, and why it is not what it asked for (``reason``; "" when it is)."""

    stages: list[str]
    result: str  # "admitted" | "degraded" | "refused"
    reason: str = ""
    measuring: bool = False  # a better list waits only for its cost to be measured at more streams


class Admission:
    """Fits stage lists into the tick budget given the streams already admitted."""

    def __init__(self, model: LoadModel, target_load: float, upgrade_load: float,
                 lighter: Mapping[str, Sequence[str]] | None = None, shared_cpus: float = 0.0,
                 cpu_target: float = 0.8) -> None:
        self.model = model
        self.target_load = target_load
        self.upgrade_load = min(upgrade_load, target_load)
        self.lighter = lighter
        self.shared_cpus = shared_cpus
        self.cpu_target = cpu_target

    @staticmethod
    def rows(stage_lists: Iterable[Sequence[str]]) -> dict[str, int]:
        rows: dict[str, int] = {}
        for stages in stage_lists:
            for spec in stages:
                rows[spec] = rows.get(spec, 0) + 1
        return rows

    def ladder(self, requested: Sequence[str]) -> list[list[str]]:
        """Every stage list ``requested`` may be given, best first (``[]`` last)."""
        return list(candidates(requested) if self.lighter is None else candidates(requested, self.lighter))

    def load(self, rows: Mapping[str, int]) -> float:
        """Predicted share of the tick the stages of ``rows`` use."""
        return self.model.tick_ms(rows) / TICK_MS

    @staticmethod
    def plus(others: Mapping[str, int], stages: Sequence[str]) -> dict[str, int]:
        """``others`` with one more stream running ``stages``."""
        rows = dict(others)
        for spec in stages:
            rows[spec] = rows.get(spec, 0) + 1
        return rows

    def _with(self, others: Mapping[str, int], stages: Sequence[str]) -> float:
        return self.load(self.plus(others, stages))

    def cpu_load(self, rows: Mapping[str, int], host_ms: float) -> float:
        """Predicted share of the shared cores used by the stages of ``rows`` plus ``host_ms`` per tick of
        the host process (0 when the worker does not share cores with it)."""
        if self.shared_cpus <= 0:
            return 0.0
        return (self.model.tick_ms(rows) + host_ms) / (TICK_MS * self.shared_cpus)

    @staticmethod
    def cpu_limit_at(load: float, cpu_limit: float) -> float:
        """The share of the shared cores a tick whose stages take ``load`` of it may fill."""
        return cpu_limit if load <= LONG_ROUND_LOAD else min(cpu_limit, UNBOOSTED_CPU_TARGET)

    def decide(self, requested: Sequence[str], others: Mapping[str, int], limit: float | None = None,
               host_ms: float = 0.0, cpu_limit: float | None = None) -> Decision:
        """The best candidate for ``requested`` that fits under ``limit`` (default ``target_load``) and, on
        shared cores, whose stages plus ``host_ms`` (the host's CPU per tick, the newcomer's included) fit
        under ``cpu_limit`` (default ``cpu_target``) of them."""
        limit = self.target_load if limit is None else limit
        cpu_limit = self.cpu_target if cpu_limit is None else cpu_limit
        before = self.load(others)
        untrusted: list[str] = []  # specs of better lists that fit but were not measured at as many streams
        for stages in self.ladder(requested):
            rows = self.plus(others, stages)
            load, cpu = self.load(rows), self.cpu_load(rows, host_ms)
            beyond = [spec for spec in stages if rows[spec] > self.model.trusted_rows(spec)]
            # meanwhile only stages that run already: no model loads just while a cost is measured
            unloaded = untrusted and any(not self.model.timed(spec) for spec in stages)
            fits = load <= limit and cpu <= self.cpu_limit_at(load, cpu_limit)
            if stages and fits and (beyond or unloaded):
                untrusted += [spec for spec in beyond if spec not in untrusted]
                continue
            if not stages or fits:
                if list(stages) == list(requested):
                    return Decision(list(stages), "admitted")
                wanted = self.plus(others, requested)
                want, want_cpu = self.load(wanted), self.cpu_load(wanted, host_ms)
                measuring = bool(untrusted)
                if measuring and want <= limit and want_cpu <= self.cpu_limit_at(want, cpu_limit):
                    timed = ", ".join(f"{spec} timed at batches of up to {self.model.largest_batch(spec)}"
                                      for spec in untrusted)
                    why = f"measuring the cost on this machine before more streams run it ({timed})"
                    return Decision(list(stages), "degraded" if stages else "refused",
                                    why + f"; running {','.join(stages) or 'no stages'} meanwhile", measuring=True)
                cpu_limit = self.cpu_limit_at(want, cpu_limit)
                if want > limit or self.shared_cpus <= 0:
                    why = (f"enhancement executor full: {','.join(requested)} would bring the load to {want:.2f} "
                           f"of the tick (target {limit:.2f}; {before:.2f} in use by the streams already admitted)")
                else:
                    why = (f"CPU full: {','.join(requested)} would bring the {self.shared_cpus:g} core(s) shared by "
                           f"the media and the enhancement processes to {want_cpu:.2f} (target {cpu_limit:.2f})")
                if not stages:
                    return Decision([], "refused", why + "; no stages fit, audio is forwarded unprocessed",
                                    measuring=measuring)
                return Decision(list(stages), "degraded", why + f"; running {','.join(stages)} instead",
                                measuring=measuring)
        return Decision([], "refused", "no candidate")  # not reached: the ladder ends with []


class AdmissionControl:
    """The executor's admission bookkeeping: decisions, the load model's inputs, upgrades, counters.

    ``streams`` is the executor's live map of streams (read, never changed here); ``apply``
    gives a stream a new stage list (``Executor._apply_stages``).  Loop thread only.
    """

    def __init__(self, config: ExecutorConfig, streams: Mapping[int, ExecutorStream],
                 apply: Callable[[ExecutorStream, list[str], Any], None],
                 counters: Mapping[str, int] | None = None,
                 worker_boost: Callable[[], int | None] | None = None) -> None:
        self.config = config
        self._worker_boost = worker_boost  # nice steps the worker runs ahead of this process (None: unknown)
        self.shedder = LoadShedder(counters if counters is not None else {})  # the executor's own counters
        self.model = LoadModel(config.stage_costs)
        self.policy = Admission(self.model, config.target_load, config.upgrade_load, config.ladder,
                                config.shared_cpus, config.cpu_target)
        # what the host costs on the shared cores per tick (shared cores only; enhancers/executor/host_cpu.py)
        self.host = HostCpu(HOST_MEAN_S)
        self.counts: dict[str, int] = dict.fromkeys(ADMISSION_RESULTS, 0)
        self.upgrades = 0
        self._streams = streams
        self._apply = apply
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._stage_ms = 0.0  # measured stage time per round, running mean
        self._measuring: set[int] = set()  # degraded streams whose better list waits for a measurement

    def cpu_target(self) -> float:
        """The share of the shared cores admission fills: ``config.cpu_target`` while the worker runs ahead
        of the media process, else at most ``UNBOOSTED_CPU_TARGET`` (at equal priority the media loop's
        bursts delay a round in progress, and deadlines are missed from about there on)."""
        boost = self._worker_boost() if self._worker_boost is not None else None
        target = self.config.cpu_target
        return target if boost is not None and boost > 0 else min(target, UNBOOSTED_CPU_TARGET)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._schedule()

    def load(self) -> float:
        """Predicted share of the tick the stages of all streams, as admitted now, use."""
        return self.policy.load(self.policy.rows(s.stages for s in self._streams.values()))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None

    def _others(self, stream: ExecutorStream) -> dict[str, int]:
        return self.policy.rows(s.stages for s in self._streams.values() if s is not stream)

    def admit(self, stream: ExecutorStream) -> list[str]:
        """The stages ``stream`` gets for its ``requested_stages`` now (sets its ``degraded_reason``)."""
        requested = stream.requested_stages
        decision = Decision(list(requested), "admitted")
        if self.config.admission and requested:
            decision = self.policy.decide(requested, self._others(stream), host_ms=self._host_now(stream),
                                          cpu_limit=self.cpu_target())
        if requested:
            self.counts[decision.result] += 1
        stream.degraded_reason, stream.changed_at = decision.reason, time.monotonic()
        self._note_measuring(stream, decision)
        if decision.reason:
            log.log(logging.INFO if decision.measuring else logging.WARNING, "stream %s (%s): %s",
                    stream.stream_id, stream.label, decision.reason)
            self._schedule(force=True)  # (a new stream is not in ``streams`` yet)
        return decision.stages

    def _note_measuring(self, stream: ExecutorStream, decision: Decision) -> None:
        if decision.measuring:
            self._measuring.add(stream.stream_id)
        else:
            self._measuring.discard(stream.stream_id)

    def observe(self, results: Iterable[RoundResult]) -> None:
        """The worker's timings of a finished job's stage calls."""
        for result in results:
            stage_s = 0.0
            for spec, rows, seconds in result.timings:
                self.model.observe(spec, rows, seconds)
                stage_s += seconds
            self.host.add_stage_time(stage_s)
            self._stage_ms += ALPHA * (stage_s * 1e3 - self._stage_ms)

    # -- the host's CPU (shared cores) -----------------------------------------------------------
    def _host_now(self, stream: ExecutorStream) -> float:
        """The host's CPU per tick with ``stream`` in it: measured, or the prior per enhanced stream until
        measured, plus the newcomer's prior when it has no stages yet (0 on cores of its own)."""
        if self.config.shared_cpus <= 0:
            return 0.0
        self.host.sample()
        return self._host_estimate(stream) + (self.config.host_ms_per_stream if not stream.stages else 0.0)

    def _host_estimate(self, without: ExecutorStream | None = None) -> float:
        """The host's CPU per tick: measured, but at least the prior per enhanced stream (``without`` aside)."""
        enhanced = sum(1 for s in self._streams.values() if s is not without and s.stages)
        return max(self.host.ms, self.config.host_ms_per_stream * enhanced)

    # -- upgrades --------------------------------------------------------------------------
    def _interval(self) -> float:
        self._measuring &= self._streams.keys()
        if self._measuring:
            return min(self.config.upgrade_interval_s, PROBE_RECHECK_S)
        return self.config.upgrade_interval_s

    def _schedule(self, force: bool = False) -> None:
        if self._timer is None and self._loop is not None and (
                force or self.config.shared_cpus > 0
                or any(s.degraded_reason or (self.config.admission and s.stages) for s in self._streams.values())):
            self._timer = self._loop.call_later(self._interval(), self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self.config.shared_cpus > 0:
            self.host.sample()
        now = time.monotonic()
        if self.config.admission:
            def shed(stream: ExecutorStream, stages: list[str]) -> None:
                self._apply(stream, stages, stream.options)
                if stream.on_change is not None:
                    stream.on_change(stream)

            def cost(stream: ExecutorStream, stages: list[str]) -> float:
                return self.model.tick_ms(self.policy.plus(self._others(stream), stages))

            def fits() -> bool:
                rows = self.policy.rows(s.stages for s in self._streams.values())
                load = self.policy.load(rows)
                return (load <= self.config.target_load and self.policy.cpu_load(rows, self._host_estimate())
                        <= self.policy.cpu_limit_at(load, self.cpu_target()))

            if self.shedder.check(self._streams, self.policy.ladder, shed, now, cost, fits):
                for stream in self.shedder.last_shed:
                    self._measuring.discard(stream.stream_id)
                self._schedule()
                return
        if not self.shedder.holding(now):
            for stream in [s for s in self._streams.values() if s.degraded_reason]:  # oldest first
                wait = PROBE_RECHECK_S if stream.stream_id in self._measuring else self.config.upgrade_interval_s
                if now - stream.changed_at >= wait:
                    self._try_upgrade(stream, now)
        self._schedule()

    def _try_upgrade(self, stream: ExecutorStream, now: float) -> None:
        """A better stage list for ``stream`` if it fits under ``upgrade_load`` (not just the target)."""
        target = self.cpu_target()
        limit, cpu_limit = self.config.upgrade_load, target - (self.config.target_load - self.config.upgrade_load)
        if stream.stream_id in self._measuring:  # it was let in at the target, only its cost was not known yet
            limit, cpu_limit = self.config.target_load, target
        decision = self.policy.decide(stream.requested_stages, self._others(stream), limit,
                                      host_ms=self._host_now(stream), cpu_limit=cpu_limit)
        rank = {tuple(c): i for i, c in enumerate(self.policy.ladder(stream.requested_stages))}
        if rank.get(tuple(decision.stages), len(rank)) >= rank.get(tuple(stream.stages), len(rank)):
            if not decision.measuring:
                self._measuring.discard(stream.stream_id)  # what it waits for now is load, not a measurement
            return
        self._note_measuring(stream, decision)
        self.upgrades += 1
        log.info("stream %s (%s): load allows %s again (asked for %s)", stream.stream_id, stream.label,
                 ",".join(decision.stages) or "no stages", ",".join(stream.requested_stages))
        stream.degraded_reason, stream.changed_at = decision.reason, now
        self._apply(stream, decision.stages, stream.options)
        if stream.on_change is not None:
            stream.on_change(stream)

    def stats(self) -> dict[str, Any]:
        """The load the admitted streams' stages put on the 10 ms tick, predicted and measured; admissions."""
        load = self.load()
        return {
            "load": round(load, 4),  # predicted stage time per tick / 10 ms, the streams as admitted now
            "measured_load": round(self._stage_ms / TICK_MS, 4),  # measured stage time per round / 10 ms
            "target_load": self.config.target_load,
            "shared_cpus": self.config.shared_cpus,  # 0: the worker has cores of its own
            "host_ms_per_tick": round(self.host.ms, 3),  # what the host costs on the shared cores
            "host_cpu_source": self.host.source,  # "tree": its processes less the stages; "process": its own
            "cpu_load": round(self.policy.cpu_load(self.policy.rows(s.stages for s in self._streams.values()),
                                                   self.host.ms), 4),
            "cpu_target": self.cpu_target(),  # in effect: capped while the worker is not ahead of this process
            "headroom": round(max(0.0, self.config.target_load - load), 4),
            "admission": self.config.admission,
            "admissions": dict(self.counts),
            "upgrades": self.upgrades,
            "shed": self.shedder.shed,  # streams moved down their ladder because deadlines were missed
            "degraded_streams": sum(1 for s in self._streams.values() if s.degraded_reason),
            "load_model": self.model.describe(),
        }
