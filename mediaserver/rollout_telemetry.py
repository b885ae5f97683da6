"""A rollout's figures per arm as OpenTelemetry metrics (mediaserver/rollout.py).

Labels are bounded: ``arm`` (``baseline``/``candidate``), ``bound`` (``estimate``/``lower``/``upper``),
``reason`` (the five rollback reasons).  The series always exist (0 before any rollout), so the
dashboard's queries always resolve; a panel shows an arm's OVRL, gain and latency only where
``mediaserver_rollout_windows_total`` / ``mediaserver_rollout_streams`` say there is something
(``... and on(arm) mediaserver_rollout_windows_total > 0``).  The figures are those of the running
rollout, else of the last one (``mediaserver_rollout_active`` says which).
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Iterable
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

ARMS = ("baseline", "candidate")


class RolloutInstruments:
    """Owns the rollout instruments of the process and the managers their callbacks read."""

    def __init__(self, meter: metrics.Meter | None = None) -> None:
        meter = meter or metrics.get_meter("mediaserver")
        # mediaserver.rollout.RolloutManager (not imported: it imports this module)
        self._managers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()

        def gauge(name: str, unit: str, description: str, value: Any) -> None:
            def callback(options: CallbackOptions) -> Iterable[Observation]:
                for r in self._rollouts():
                    for arm in ARMS:
                        v = value(r.figures[arm]) if r is not None else None
                        yield Observation(float(v) if v is not None and math.isfinite(v) else 0.0, {"arm": arm})

            meter.create_observable_gauge(name, callbacks=[callback], unit=unit, description=description)

        gauge("mediaserver.rollout.streams", "{stream}", "Live streams in each arm of the rollout.",
              lambda f: f.streams)
        gauge("mediaserver.rollout.ovrl", "1", "Mean DNSMOS OVRL after the stages, over the arm's scored windows "
              "(0 until the arm has one: see mediaserver_rollout_windows_total).", lambda f: f.mean_ovrl)
        gauge("mediaserver.rollout.ovrl_gain", "1", "Mean OVRL gain (after minus before the stages) of the arm's "
              "windows: what the rollout's quality test compares.", lambda f: f.mean_gain)
        gauge("mediaserver.rollout.latency", "s", "Mean end-to-end server latency of the arm's streams (one "
              "sample per stream and second).", lambda f: None if f.mean_latency_ms is None
              else f.mean_latency_ms / 1000.0)
        gauge("mediaserver.rollout.bypassed_ratio", "1", "Share of the arm's chunks that skipped its stages.",
              lambda f: f.bypassed_ratio)
        gauge("mediaserver.rollout.stage_cpu", "1", "CPU of the arm's stages per stream, as a share of one core "
              "(the executor's per-stage timings).", lambda f: f.stage_cpu)
        meter.create_observable_counter(
            "mediaserver.rollout.windows", callbacks=[self._windows], unit="{window}",
            description="Scored quality windows the rollout counted, per arm.")
        meter.create_observable_gauge(
            "mediaserver.rollout.difference", callbacks=[self._difference], unit="1",
            description="Candidate minus baseline mean OVRL gain (estimate) and its anytime-valid interval "
                        "(lower, upper); the candidate is rolled back when upper < -max_ovrl_drop.")
        meter.create_observable_gauge(
            "mediaserver.rollout.active", callbacks=[self._active], unit="1",
            description="1 while a rollout runs (the figures are then its own), else 0 (the last rollout's).")
        meter.create_observable_counter(
            "mediaserver.rollout.rollbacks", callbacks=[self._rollbacks], unit="{rollback}",
            description="Rollbacks by reason: quality, latency, bypassed, cpu (automatic) and command.")

    def observe(self, manager: Any) -> None:
        with self._lock:
            self._managers.add(manager)

    def forget(self, manager: Any) -> None:
        with self._lock:
            self._managers.discard(manager)

    def _live(self) -> list[Any]:
        with self._lock:
            return list(self._managers)

    def _rollouts(self) -> list[Any]:
        """The one rollout the per-arm series describe: the running one, else the last started (a process
        normally has one server; tests start several, and one attribute set can have one value)."""
        rollouts = [m.current for m in self._live() if m.current is not None]
        if not rollouts:
            return [None]
        return [max(rollouts, key=lambda r: (r.running, r.started_mono))]

    def _windows(self, options: CallbackOptions) -> Iterable[Observation]:
        for r in self._rollouts():
            for arm in ARMS:
                yield Observation(r.figures[arm].windows if r is not None else 0, {"arm": arm})

    def _difference(self, options: CallbackOptions) -> Iterable[Observation]:
        for r in self._rollouts():
            c = r.comparison if r is not None else None
            for bound in ("estimate", "lower", "upper"):
                v = None if c is None else {"estimate": c.difference, "lower": c.lower, "upper": c.upper}[bound]
                yield Observation(v if v is not None and math.isfinite(v) else 0.0, {"bound": bound})

    def _active(self, options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(int(any(m.current is not None and m.current.running for m in self._live())), {})

    def _rollbacks(self, options: CallbackOptions) -> Iterable[Observation]:
        totals: dict[str, int] = {}
        for m in self._live():
            for reason, n in list(m.rollbacks.items()):
                totals[reason] = totals.get(reason, 0) + n
        for reason, n in totals.items():
            yield Observation(n, {"reason": reason})


_instruments: RolloutInstruments | None = None
_lock = threading.Lock()


def rollout_instruments() -> RolloutInstruments:
    global _instruments
    with _lock:
        if _instruments is None:
            _instruments = RolloutInstruments()
        return _instruments
