"""Canary / A/B rollout of a stage configuration, compared live on the quality SLIs, with automatic rollback.

A rollout (``RolloutManager.start``) names a *candidate* stage list (e.g. ``denoise:gtcrn``) and the
*baseline* it is compared with (e.g. ``denoise``; default: the server's default stages).  Every
published stream whose configured stages (its participant's, else its room's) are the baseline is
*eligible*; an eligible stream in scope (``rooms``, empty: all) joins the candidate arm with
probability ``percent`` (a hash of the rollout id and the stream id: sticky for the stream's life),
every other eligible stream is the baseline arm.  A candidate stream's stages are switched live
through the executor (``MediaServer.restage`` -> ``StreamPipeline.set_stages``: the chunks keep
flowing, the candidate's stages are loaded before the first stream switches); a stream whose
configured stages change leaves the rollout for good.

While it runs, once a second (``_evaluate``):

- quality: every DNSMOS window (``mediaserver/quality.py``) of an arm's stream that ran exactly the
  arm's stages adds its OVRL gain (after minus before) and OVRL after to the arm; arm streams get
  their windows first from the scorer's budget, which the rollout raises to
  ``scoring_cpu_share`` while it runs; ``mediaserver.rollout_stats.compare`` says whether the
  candidate is worse than the baseline by more than ``max_ovrl_drop`` (anytime-valid confidence
  sequence, error rate ``alpha``);
- latency: each arm stream's end-to-end server latency, one sample per second;
- bypassed chunks: each arm's share of chunks that skipped its stages (a failing stage fails open);
- CPU: the executor's measured time per stream of the arm's stages (per-stage timings of the
  worker: ``avg_ms / avg_batch`` of each stage).

It rolls back automatically (``auto_rollback``) when, in this order: the quality verdict is
``worse``; the candidate's mean latency exceeds the baseline's by more than
``max_latency_increase_ms``; its bypassed share exceeds the baseline's by more than
``max_bypassed``; its stage CPU per stream is more than ``max_cpu_ratio`` times the baseline's
(0: not checked).  The guards need ``guard_min_s`` seconds of samples from both arms.  Rollback
puts every candidate stream back on its configured stages, live; promotion (a command) makes
the candidate the stages of every room in scope that runs the baseline (and the default for new
rooms when the rollout covered every room).  Events go to the log and to a ``rollout`` span
(``rollout.assigned``, ``rollout.verdict``, ``rollout.rolled_back``, ``rollout.promoted``); the
streams' ``track`` spans get a ``rollout.arm`` event; metrics per arm are in
``mediaserver/rollout_telemetry.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Optional, Protocol

from opentelemetry import trace

from enhancers.registry import check_stage_specs
from mediaserver.config import RolloutConfig
from mediaserver.rollout_stats import Comparison, compare
from mediaserver.room import RoomError

if TYPE_CHECKING:
    from mediaserver.config import ServerConfig
    from mediaserver.quality import QualityMonitor, QualityReport
    from mediaserver.room import Participant, Room, RoomRegistry
    from mediaserver.stream import PublishedStream

log = logging.getLogger(__name__)

ARMS = ("baseline", "candidate")
HISTORY = 10  # finished rollouts kept for status
_MAX_SAMPLES = 3600  # per arm: latency samples (one per stream and second), windows


class RolloutHost(Protocol):
    """What a rollout needs of the server (``mediaserver.server.MediaServer``)."""

    config: ServerConfig
    rooms: RoomRegistry
    quality: QualityMonitor
    hub: Any  # mediaserver.pipeline.PipelineHub: its executor
    telemetry: Any  # mediaserver.telemetry.MediaTelemetry: per-stream spans and latency

    def restage(self, participant: Participant) -> None: ...

    async def set_room_stages(self, room: Room, stages: object) -> None: ...


def canonical_stages(stages: object) -> tuple[str, ...]:
    """A stage list in canonical form (known specs, chain order); ``RoomError("bad-stages")`` otherwise."""
    try:
        return tuple(s.spec for s in check_stage_specs(stages))
    except ValueError as exc:
        raise RoomError("bad-stages", str(exc)) from None


@dataclass(frozen=True)
class RolloutPlan:
    """A validated rollout request."""

    id: str
    candidate: tuple[str, ...]
    baseline: tuple[str, ...]
    rooms: tuple[str, ...]
    percent: float
    settings: RolloutConfig

    def label(self, arm: str) -> str:
        stages = self.candidate if arm == "candidate" else self.baseline
        return ",".join(stages) or "none"

    def in_scope(self, room_id: str) -> bool:
        return not self.rooms or room_id in self.rooms

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {"id": self.id, "candidate": list(self.candidate), "baseline": list(self.baseline),
                "rooms": list(self.rooms), "percent": self.percent,
                "max_ovrl_drop": s.max_ovrl_drop, "alpha": s.alpha, "min_windows": s.min_windows,
                "max_latency_increase_ms": s.max_latency_increase_ms, "max_bypassed": s.max_bypassed,
                "max_cpu_ratio": s.max_cpu_ratio, "guard_min_s": s.guard_min_s, "auto_rollback": s.auto_rollback,
                "scoring_cpu_share": s.scoring_cpu_share}


_NUMBERS: dict[str, tuple[float, float]] = {  # request field -> allowed range
    "max_ovrl_drop": (0.0, 4.0), "alpha": (1e-6, 0.5), "min_windows": (2, 10_000),
    "max_latency_increase_ms": (0.0, 10_000.0), "max_bypassed": (0.0, 1.0), "max_cpu_ratio": (0.0, 1000.0),
    "guard_min_s": (1.0, 86_400.0), "scoring_cpu_share": (0.0, 4.0),
}


def parse_plan(body: dict[str, Any], defaults: RolloutConfig, default_baseline: list[str]) -> RolloutPlan:
    """Check a rollout request (``RoomError("bad-rollout")``, 400, for anything wrong)."""

    def bad(message: str) -> RoomError:
        return RoomError("bad-rollout", message)

    if "candidate" not in body:
        raise bad("'candidate' (the stage list to roll out) is required")
    candidate = canonical_stages(body["candidate"])
    baseline = canonical_stages(body["baseline"] if body.get("baseline") is not None else default_baseline)
    if candidate == baseline:
        raise bad("the candidate is the baseline")
    rooms = body.get("rooms", [])
    if isinstance(rooms, str):
        rooms = [rooms]
    if not isinstance(rooms, list) or len(rooms) > 100 or not all(isinstance(r, str) and 0 < len(r) <= 64
                                                                    for r in rooms):
        raise bad("'rooms' is a list of at most 100 room ids")
    percent = body.get("percent", 50.0 if not rooms else 100.0)
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 < percent <= 100:
        raise bad("'percent' is a number in (0, 100]")
    settings = defaults
    for key, (low, high) in _NUMBERS.items():
        if key in body and body[key] is not None:
            value = body[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not low <= value <= high:
                raise bad(f"'{key}' is a number in [{low}, {high}]")
            number: Any = int(value) if key == "min_windows" else float(value)
            settings = replace(settings, **{key: number})
    if "auto_rollback" in body:
        if not isinstance(body["auto_rollback"], bool):
            raise bad("'auto_rollback' is true or false")
        settings = replace(settings, auto_rollback=body["auto_rollback"])
    rid = "r-" + hashlib.sha256(f"{time.time_ns()}".encode()).hexdigest()[:8]
    return RolloutPlan(rid, candidate, baseline, tuple(dict.fromkeys(rooms)), float(percent), settings)


@dataclass
class ArmFigures:
    """What one arm measured so far."""

    gains: deque[float] = field(default_factory=lambda: deque(maxlen=_MAX_SAMPLES))  # OVRL after - before
    ovrl: deque[float] = field(default_factory=lambda: deque(maxlen=_MAX_SAMPLES))  # OVRL after
    latency_ms: deque[float] = field(default_factory=lambda: deque(maxlen=_MAX_SAMPLES))
    windows: int = 0
    chunks: int = 0
    bypassed: int = 0
    streams: int = 0  # live streams in the arm now
    degraded: int = 0  # of which admission control runs other stages than the arm's (their figures do not count)
    stage_cpu: Optional[float] = None  # share of one core per stream, of the arm's stages (executor timings)

    @staticmethod
    def _mean(x: deque[float]) -> Optional[float]:
        return sum(x) / len(x) if x else None

    @property
    def mean_gain(self) -> Optional[float]:
        return self._mean(self.gains)

    @property
    def mean_ovrl(self) -> Optional[float]:
        return self._mean(self.ovrl)

    @property
    def mean_latency_ms(self) -> Optional[float]:
        return self._mean(self.latency_ms)

    @property
    def bypassed_ratio(self) -> Optional[float]:
        return self.bypassed / self.chunks if self.chunks else None

    def describe(self) -> dict[str, Any]:
        def r(x: Optional[float], n: int = 3) -> Optional[float]:
            return None if x is None else round(x, n)

        return {"streams": self.streams, "degraded": self.degraded, "windows": self.windows, "ovrl_gain": r(self.mean_gain),
                "ovrl": r(self.mean_ovrl), "latency_ms": r(self.mean_latency_ms, 1),
                "latency_samples": len(self.latency_ms), "bypassed_ratio": r(self.bypassed_ratio, 5),
                "stage_cpu": r(self.stage_cpu, 5)}


class Rollout:
    """Owns one rollout: its plan, its state, its streams' arms and what each arm measured."""

    def __init__(self, plan: RolloutPlan) -> None:
        self.plan = plan
        self.state = "running"  # running | rolled_back | promoted
        self.reason = ""
        self.started_at = time.time()
        self.started_mono = time.monotonic()
        self.ended_at: Optional[float] = None
        self.arms: dict[str, str] = {}  # stream id -> arm
        self.rooms_of: dict[str, str] = {}  # stream id -> room id
        self.excluded: set[str] = set()  # streams whose configured stages changed: out for good
        self.tagged: set[str] = set()  # streams whose track span carries their arm
        self.figures = {arm: ArmFigures() for arm in ARMS}
        self.comparison: Comparison = compare([], [], delta=plan.settings.max_ovrl_drop, alpha=plan.settings.alpha,
                                              min_windows=plan.settings.min_windows)
        self.counts: dict[str, tuple[int, int]] = {}  # stream -> (chunks, bypassed) at the last look
        self.span: Any = None

    @property
    def running(self) -> bool:
        return self.state == "running"

    def assign(self, stream_id: str, room_id: str) -> str:
        """The stream's arm, decided once: candidate with probability ``percent`` in scope."""
        arm = self.arms.get(stream_id)
        if arm is None:
            h = int.from_bytes(hashlib.sha256(f"{self.plan.id}:{stream_id}".encode()).digest()[:8], "big")
            chosen = self.plan.in_scope(room_id) and h / 2 ** 64 * 100.0 < self.plan.percent
            arm = self.arms[stream_id] = "candidate" if chosen else "baseline"
            self.rooms_of[stream_id] = room_id
        return arm

    def arm_of(self, stream_id: str) -> Optional[str]:
        return None if stream_id in self.excluded else self.arms.get(stream_id)

    def describe(self) -> dict[str, Any]:
        return {**self.plan.describe(), "state": self.state, "reason": self.reason or None,
                "started_at": round(self.started_at, 3),
                "ended_at": None if self.ended_at is None else round(self.ended_at, 3),
                "elapsed_s": round((self.ended_at or time.time()) - self.started_at, 1),
                "arms": {arm: self.figures[arm].describe() for arm in ARMS},
                "quality": self.comparison.as_dict(), "excluded_streams": len(self.excluded)}


class RolloutManager:
    """Owns the current rollout (at most one runs), the finished ones, and the task that evaluates it."""

    def __init__(self, server: RolloutHost) -> None:
        self._server = server
        self.config: RolloutConfig = server.config.rollout
        self.current: Optional[Rollout] = None
        self.history: deque[Rollout] = deque(maxlen=HISTORY)
        self.rollbacks: dict[str, int] = {"quality": 0, "latency": 0, "bypassed": 0, "cpu": 0, "command": 0}
        self._task: Optional[asyncio.Task[None]] = None
        self._reports: Optional[deque[QualityReport]] = None
        self._tracer = trace.get_tracer("mediaserver")
        from mediaserver.rollout_telemetry import rollout_instruments

        rollout_instruments().observe(self)

    # -- what a stream runs ------------------------------------------------------------------
    def stages_for(self, participant: Participant, stream_id: str) -> list[str]:
        """What should run on ``participant``'s stream ``stream_id``: its configured stages, or the
        candidate's when the stream is in the candidate arm of the running rollout."""
        configured = participant.effective_stages()
        r = self.current
        if r is None or not r.running or stream_id in r.excluded:
            return configured
        if canonical_stages(configured) != r.plan.baseline:
            if stream_id in r.arms:  # its stages were changed on purpose: it leaves the rollout
                r.excluded.add(stream_id)
                self._event(r, "rollout.excluded", {"mediaserver.stream": stream_id})
            return configured
        new = stream_id not in r.arms
        arm = r.assign(stream_id, participant.room.id)
        if new:
            self._assigned(r, stream_id, arm)
        return list(r.plan.candidate) if arm == "candidate" else configured

    def arm_of(self, stream_id: str) -> Optional[str]:
        """The stream's arm in the running rollout (for ``stats``), else None."""
        r = self.current
        return r.arm_of(stream_id) if r is not None and r.running else None

    def _assigned(self, r: Rollout, stream_id: str, arm: str) -> None:
        log.info("rollout %s: stream %s -> %s arm", r.plan.id, stream_id, arm)
        self._event(r, "rollout.assigned", {"mediaserver.stream": stream_id, "mediaserver.rollout.arm": arm})
        self._server.quality.set_priority(stream_id, 1)  # its windows come first from the scorer's budget
        self._tag(r, stream_id, self._find_stream(r, stream_id))

    def _tag(self, r: Rollout, stream_id: str, stream: Optional[PublishedStream]) -> None:
        """The arm on the stream's ``track`` span, once (a stream assigned as it publishes has no span yet:
        tagged at the next evaluation)."""
        if stream_id in r.tagged or stream is None:
            return
        st = self._server.telemetry.streams.get(stream)
        if st is not None:
            arm = r.arms[stream_id]
            st.span.set_attribute("mediaserver.rollout.arm", arm)
            st.span.add_event("rollout.arm", {"mediaserver.rollout": r.plan.id, "mediaserver.rollout.arm": arm})
            r.tagged.add(stream_id)

    # -- commands --------------------------------------------------------------------------------
    async def start(self, body: dict[str, Any]) -> Rollout:
        if self.current is not None and self.current.running:
            raise RoomError("rollout-running", f"rollout {self.current.plan.id} is running: promote or roll it "
                                               "back first", status=409)
        server = self._server
        plan = parse_plan(body, self.config, list(server.config.enhance.default_stages))
        executor = server.hub.executor
        if executor is None:
            raise RoomError("not-ready", "the enhancement executor is not running", status=503)
        try:  # loaded before any stream switches: no chunk passes through a stage still loading
            await executor.preload(list(plan.candidate))
        except Exception as exc:
            raise RoomError("stage-failed", f"the candidate's stages failed to load: {exc}", status=503) from None
        if self.current is not None and self.current.running:  # another start won the race meanwhile
            raise RoomError("rollout-running", "another rollout started meanwhile", status=409)
        if self.current is not None:
            self.history.appendleft(self.current)
        r = self.current = Rollout(plan)
        r.span = self._tracer.start_span("rollout", attributes={
            "mediaserver.rollout": plan.id, "mediaserver.rollout.candidate": r.plan.label("candidate"),
            "mediaserver.rollout.baseline": r.plan.label("baseline"),
            "mediaserver.rollout.rooms": ",".join(plan.rooms) or "*", "mediaserver.rollout.percent": plan.percent,
            "mediaserver.rollout.max_ovrl_drop": plan.settings.max_ovrl_drop,
            "mediaserver.rollout.alpha": plan.settings.alpha})
        log.warning("rollout %s started: candidate %s against baseline %s, rooms %s, %.0f %% of eligible streams",
                    plan.id, r.plan.label("candidate"), r.plan.label("baseline"), ",".join(plan.rooms) or "all",
                    plan.percent)
        server.quality.set_budget_boost(plan.settings.scoring_cpu_share or None)
        self._reports = server.quality.listen()
        self._restage_all()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="rollout")
        return r

    async def rollback(self, reason: str = "command", detail: str = "") -> Rollout:
        r = self._running()
        self._end(r, "rolled_back", reason, detail)
        self.rollbacks[reason] = self.rollbacks.get(reason, 0) + 1
        self._restage_all(only=r)
        return r

    async def promote(self) -> Rollout:
        r = self._running()
        self._end(r, "promoted", "command", "")
        server = self._server
        for room in list(server.rooms.rooms.values()):
            if r.plan.in_scope(room.id) and tuple(room.stages) == r.plan.baseline:
                await server.set_room_stages(room, list(r.plan.candidate))
        if not r.plan.rooms and tuple(server.rooms.default_stages) == r.plan.baseline:
            server.rooms.default_stages = list(r.plan.candidate)
        self._restage_all(only=r)
        return r

    def status(self) -> dict[str, Any]:
        return {"current": self.current.describe() if self.current is not None else None,
                "history": [r.describe() for r in self.history]}

    def _running(self) -> Rollout:
        r = self.current
        if r is None or not r.running:
            raise RoomError("no-rollout", "no rollout is running", status=404)
        return r

    def _end(self, r: Rollout, state: str, reason: str, detail: str) -> None:
        r.state, r.reason, r.ended_at = state, reason if not detail else f"{reason}: {detail}", time.time()
        attrs = {"mediaserver.rollout": r.plan.id, "mediaserver.rollout.reason": r.reason,
                 **{f"mediaserver.rollout.{k}": v for k, v in r.comparison.as_dict().items() if v is not None}}
        for arm in ARMS:
            for k, v in r.figures[arm].describe().items():
                if v is not None:
                    attrs[f"mediaserver.rollout.{arm}.{k}"] = v
        if state == "rolled_back":
            log.warning("rollout %s rolled back (%s): candidate %s -> baseline %s on %d streams; %s", r.plan.id,
                        r.reason, r.plan.label("candidate"), r.plan.label("baseline"),
                        sum(1 for a in r.arms.values() if a == "candidate"), r.comparison.as_dict())
        else:
            log.warning("rollout %s promoted: %s replaces %s", r.plan.id, r.plan.label("candidate"),
                        r.plan.label("baseline"))
        if r.span is not None:
            r.span.add_event(f"rollout.{state}", attrs)
            r.span.set_attribute("mediaserver.rollout.state", state)
            r.span.end()
        quality = self._server.quality
        quality.set_budget_boost(None)
        for stream_id in r.arms:
            quality.set_priority(stream_id, 0)
        if self._reports is not None:
            quality.unlisten(self._reports)
            self._reports = None

    def _restage_all(self, only: Optional[Rollout] = None) -> None:
        """Apply to every publishing participant (or those with a stream in ``only``) what it should run now."""
        for room in list(self._server.rooms.rooms.values()):
            for p in list(room.participants.values()):
                stream = p.published
                if stream is None or stream.closed or (only is not None and stream.id not in only.arms):
                    continue
                self._server.restage(p)

    def _find_stream(self, r: Rollout, stream_id: str) -> Optional[PublishedStream]:
        room = self._server.rooms.rooms.get(r.rooms_of.get(stream_id, ""))
        return room.streams.get(stream_id) if room is not None else None

    def _event(self, r: Rollout, name: str, attrs: dict[str, Any]) -> None:
        if r.span is not None:
            r.span.add_event(name, attrs)

    # -- evaluation --------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            r = self.current
            if r is None or not r.running:
                continue
            try:
                reason = self._evaluate(r)
            except Exception:  # never let a bug stop the watch
                log.exception("rollout %s: evaluation failed", r.plan.id)
                continue
            if reason is not None and r.plan.settings.auto_rollback and r.running:
                await self.rollback(*reason)

    def _evaluate(self, r: Rollout) -> Optional[tuple[str, str]]:
        """Take the new figures of both arms; (reason, detail) when the candidate must be rolled back."""
        s = r.plan.settings
        reports = self._reports
        while reports:
            report = reports.popleft()
            arm = r.arm_of(report.stream)
            if arm is None or report.stages != r.plan.label(arm):
                continue  # not an arm's stream, or the window ran other stages (degraded by admission)
            fig = r.figures[arm]
            fig.windows += 1
            fig.gains.append(float(report.after.ovrl - report.before.ovrl))
            fig.ovrl.append(float(report.after.ovrl))
        live = {arm: 0 for arm in ARMS}
        degraded = {arm: 0 for arm in ARMS}
        for stream_id, arm in r.arms.items():
            if stream_id in r.excluded:
                continue
            stream = self._find_stream(r, stream_id)
            if stream is None or stream.closed:
                continue
            fig = r.figures[arm]
            live[arm] += 1
            self._tag(r, stream_id, stream)
            if tuple(stream.pipeline.stages) != tuple(r.plan.candidate if arm == "candidate" else r.plan.baseline):
                degraded[arm] += 1
                continue  # degraded by admission control: its figures are not the arm's
            c = stream.counters
            prev = r.counts.get(stream_id)
            r.counts[stream_id] = (c.chunks, c.bypassed)
            if prev is not None:
                fig.chunks += c.chunks - prev[0]
                fig.bypassed += c.bypassed - prev[1]
            st = self._server.telemetry.streams.get(stream)
            latency_s = st.e2e_mean if st is not None and st.e2e_mean is not None else None
            fig.latency_ms.append(latency_s * 1000.0 if latency_s is not None else c.server_latency_ms)
        for arm in ARMS:
            r.figures[arm].streams = live[arm]
            r.figures[arm].degraded = degraded[arm]
        self._stage_cpu(r)
        before = r.comparison.verdict
        r.comparison = compare(list(r.figures["candidate"].gains), list(r.figures["baseline"].gains),
                               delta=s.max_ovrl_drop, alpha=s.alpha, min_windows=s.min_windows, sd_floor=s.sd_floor)
        if r.comparison.verdict != before:
            log.info("rollout %s: quality verdict %s (%s)", r.plan.id, r.comparison.verdict, r.comparison.as_dict())
            self._event(r, "rollout.verdict", {k if k == "verdict" else f"mediaserver.rollout.{k}": v
                                               for k, v in r.comparison.as_dict().items() if v is not None})
        return self._verdict(r)

    def _verdict(self, r: Rollout) -> Optional[tuple[str, str]]:
        s = r.plan.settings
        cand, base = r.figures["candidate"], r.figures["baseline"]
        cmp = r.comparison
        if cmp.verdict == "worse":
            return "quality", (f"OVRL gain {cmp.difference:+.2f} against the baseline (interval {cmp.lower:+.2f} .. "
                               f"{cmp.upper:+.2f}) is below -{s.max_ovrl_drop:.2f}")
        enough = min(len(cand.latency_ms), len(base.latency_ms)) >= s.guard_min_s
        cl, bl = cand.mean_latency_ms, base.mean_latency_ms
        if enough and cl is not None and bl is not None and cl - bl > s.max_latency_increase_ms:
            return "latency", f"mean latency {cl:.0f} ms against {bl:.0f} ms"
        cb, bb = cand.bypassed_ratio, base.bypassed_ratio or 0.0
        # both arms share the executor: a loaded machine bypasses chunks of both alike; a failing candidate
        # stage bypasses its own (more than max_bypassed over the baseline's, and more than twice as many)
        if min(cand.chunks, base.chunks) >= 100 * s.guard_min_s and cb is not None and cb - bb > s.max_bypassed \
                and cb > 2 * bb:
            return "bypassed", f"{cb:.1%} of the candidate's chunks bypassed against {bb:.1%}"
        cc, bc = cand.stage_cpu, base.stage_cpu
        if enough and s.max_cpu_ratio > 0 and cc is not None and bc is not None and bc > 0 \
                and cc > s.max_cpu_ratio * bc:
            return "cpu", f"stage CPU per stream {cc:.4f} against {bc:.4f} of a core"
        return None

    def _stage_cpu(self, r: Rollout) -> None:
        """Each arm's stage cost per stream (share of one core), from the worker's per-stage timings."""
        executor = self._server.hub.executor
        if executor is None:
            return
        stages = executor.stats().get("stages") or {}
        for arm in ARMS:
            specs = r.plan.candidate if arm == "candidate" else r.plan.baseline
            total = 0.0
            for spec in specs:
                st = stages.get(spec) or {}
                avg_ms, batch = st.get("avg_ms"), st.get("avg_batch")
                if not avg_ms or not batch:
                    break
                total += float(avg_ms) / float(batch) / 10.0  # ms per stream per 10 ms tick -> share of a core
            else:
                r.figures[arm].stage_cpu = total if specs else 0.0

    def close(self) -> None:
        from mediaserver.rollout_telemetry import rollout_instruments

        rollout_instruments().forget(self)
        if self._task is not None:
            self._task.cancel()
            self._task = None
        r = self.current
        if r is not None and r.running and r.span is not None:
            r.span.set_attribute("mediaserver.rollout.state", "server shutdown")
            r.span.end()
