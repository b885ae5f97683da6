"""When the executor brings a failed stage or worker back, and when it stops trying.

A *fault* is a stage that hung past ``stuck_after_ms`` or a worker process that
died while running it.  After each fault the stage is disabled for a backoff
(``backoff_first_s``, doubling per fault in the window, at most
``backoff_max_s``), then loaded fresh; a stage with more than ``max_faults``
faults within ``fault_window_s`` stays disabled until the server restarts.  A
worker process that died is started again after the same kind of backoff
(:class:`RestartBackoff`), never given up on: a stage that crashes it on every
call ends up disabled, and the other stages run in the next worker.

Only the event loop touches these objects.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RecoveryPolicy:
    """Backoff and give-up thresholds for stage faults and worker restarts."""

    backoff_first_s: float = 1.0  # disabled this long after a first fault, doubling per fault
    backoff_max_s: float = 60.0  # at most this long between tries
    max_faults: int = 5  # more faults than this within fault_window_s: disabled until restart
    fault_window_s: float = 300.0

    def backoff(self, faults: int) -> float:
        """The wait after the ``faults``-th fault of the window (1-based)."""
        return float(min(self.backoff_max_s, self.backoff_first_s * 2.0 ** max(0, faults - 1)))


class _Record:
    __slots__ = ("permanent", "reason", "times", "total", "until")

    def __init__(self) -> None:
        self.times: collections.deque[float] = collections.deque()
        self.total = 0
        self.until: float | None = None  # monotonic time the backoff ends; None: enabled (or permanent)
        self.permanent = False
        self.reason = ""


class StageFaults:
    """Per-stage fault history: which stages are disabled now, why, and until when."""

    def __init__(self, policy: RecoveryPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._records: dict[str, _Record] = {}

    def fault(self, spec: str, reason: str) -> float | None:
        """Record a fault of ``spec``; returns the backoff before it is tried again, None if never."""
        now = self._clock()
        rec = self._records.setdefault(spec, _Record())
        rec.times.append(now)
        while rec.times and now - rec.times[0] > self.policy.fault_window_s:
            rec.times.popleft()
        rec.total += 1
        if rec.permanent:
            return None
        if len(rec.times) > self.policy.max_faults:
            rec.permanent, rec.until = True, None
            rec.reason = (f"permanently disabled after {len(rec.times)} faults in "
                          f"{self.policy.fault_window_s:.0f} s (last: {reason})")
            return None
        delay = self.policy.backoff(len(rec.times))
        rec.until = now + delay
        rec.reason = f"{reason}; fault {len(rec.times)} of {self.policy.max_faults} allowed, retried after {delay:g} s"
        return delay

    def enable(self, spec: str) -> bool:
        """The backoff of ``spec`` is over: enabled again (True), unless disabled for good."""
        rec = self._records.get(spec)
        if rec is None:
            return True
        if rec.permanent:
            return False
        rec.until = None
        return True

    def disabled(self, spec: str) -> bool:
        rec = self._records.get(spec)
        return rec is not None and (rec.permanent or rec.until is not None)

    def describe(self, spec: str) -> dict[str, Any]:
        """The /healthz fields of ``spec``: ``disabled``, ``disabled_reason``, ``disabled_until``, ``faults``."""
        rec = self._records.get(spec)
        if rec is None:
            return {"disabled": False, "faults": 0}
        out: dict[str, Any] = {"disabled": rec.permanent or rec.until is not None, "faults": rec.total,
                               "permanently_disabled": rec.permanent}
        if out["disabled"]:
            out["disabled_reason"] = rec.reason
        if rec.until is not None:  # wall-clock time, for people reading /healthz
            out["disabled_until"] = round(time.time() + rec.until - self._clock(), 3)
        elif rec.reason:
            out["last_fault"] = rec.reason
        return out

    def specs(self) -> list[str]:
        return list(self._records)


class RestartBackoff:
    """How long to wait before starting the worker process again after its ``n``-th recent death."""

    def __init__(self, policy: RecoveryPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._deaths: collections.deque[float] = collections.deque()

    def next_delay(self) -> float:
        now = self._clock()
        self._deaths.append(now)
        while self._deaths and now - self._deaths[0] > self.policy.fault_window_s:
            self._deaths.popleft()
        return self.policy.backoff(len(self._deaths))

    @property
    def recent(self) -> int:
        return len(self._deaths)
