"""Load shedding: when admitted streams miss their deadlines anyway, the newest one gets a lighter list.

Admission control (``enhancers.executor.admission``) prices a newcomer with a model of the stages'
cost; right after start that model is a prior, and the prior can be wrong for this machine (a core
shared with the media process, a slower CPU, cache contention).  Then the streams already admitted
miss deadlines together and fail open: everybody's chunks pass unprocessed, the silent 100 % bypass
the design rules out.  ``LoadShedder`` watches the executor's own counters instead of the model:
when in two check intervals in a row more than ``max_bypass`` of the chunks missed their deadline
(or were dropped from a backlog), the stream whose stages changed last (the newest admission) is
moved down its ladder (``Admission.ladder``) to the first list the load model prices cheaper than
what it runs, so the streams admitted before it keep what they got.  By then the model has timed
the stages at the real batch sizes: while it still says the streams do not fit (``fits``), the next
newest stream is moved one step down too, so an overload of several streams is shed in one check,
not one stream every two.
After a shed no stream is upgraded for ``hold_s`` (the model that let it in was too optimistic;
upgrades resume once the measured costs have caught up).  Loop thread only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Callable, Optional

from enhancers.executor.stream import ExecutorStream

log = logging.getLogger("enhancers.executor")

MAX_BYPASS = 0.01  # share of chunks missing their deadline over a check above which a stream is shed
HOLD_S = 20.0  # no upgrades for this long after a shed
CHECK_S = 1.5  # shortest interval judged (the caller may check more often: a stage loading stalls ~1-2 s)


class LoadShedder:
    """Owns the counter marks between checks, the shed count and the time of the last shed."""

    def __init__(self, counters: Mapping[str, int], max_bypass: float = MAX_BYPASS, hold_s: float = HOLD_S) -> None:
        self._counters = counters
        self.max_bypass = max_bypass
        self.hold_s = hold_s
        self.shed = 0
        self.last_shed: list[ExecutorStream] = []  # the streams the last shedding check moved
        self.last_shed_at = float("-inf")
        self._mark: Optional[tuple[int, int]] = None
        self._mark_at = float("-inf")
        self._bad = 0  # consecutive checks over the budget (a transient, e.g. a model loading, is one)

    def _late(self) -> tuple[int, int]:
        c = self._counters
        return c.get("chunks", 0), c.get("bypass_deadline", 0) + c.get("dropped_backlog", 0)

    def holding(self, now: float) -> bool:
        """Upgrades wait: a stream was shed less than ``hold_s`` ago."""
        return now - self.last_shed_at < self.hold_s

    def check(self, streams: Mapping[int, ExecutorStream], ladder: Callable[[list[str]], list[list[str]]],
              apply: Callable[[ExecutorStream, list[str]], None], now: float | None = None,
              cost: Callable[[ExecutorStream, list[str]], float] | None = None,
              fits: Callable[[], bool] | None = None) -> Optional[ExecutorStream]:
        """Shed if the last two intervals missed too many deadlines: the newest stream one step, then the
        next newest while ``fits()`` says the streams still do not fit; the first stream shed, or None
        (all of them: ``last_shed``).  ``cost(stream, stages)``: the predicted tick time with ``stream``
        running ``stages`` (the ladder's next step is not always cheaper at every batch size: the first
        one that is, is taken)."""
        now = time.monotonic() if now is None else now
        if now - self._mark_at < CHECK_S:
            return None
        chunks, late = self._late()
        mark, self._mark, self._mark_at = self._mark, (chunks, late), now
        if mark is None or chunks - mark[0] <= 0:
            return None
        share = (late - mark[1]) / (chunks - mark[0])
        self._bad = self._bad + 1 if share > self.max_bypass else 0
        if self._bad < 2:
            return None
        running = sorted((s for s in streams.values() if s.stages and not s.closed),
                         key=lambda s: (s.changed_at, s.stream_id), reverse=True)
        if not running:
            return None
        self.last_shed = []
        for stream in running:
            if self.last_shed and (fits is None or fits()):
                break
            self._step_down(stream, share, ladder, apply, now, cost)
            self.last_shed.append(stream)
        self.last_shed_at = now
        self._bad = 0
        self._mark = self._late()  # the next interval starts after the change
        return self.last_shed[0]

    def _step_down(self, stream: ExecutorStream, share: float, ladder: Callable[[list[str]], list[list[str]]],
                   apply: Callable[[ExecutorStream, list[str]], None], now: float,
                   cost: Callable[[ExecutorStream, list[str]], float] | None) -> None:
        options = ladder(list(stream.requested_stages or stream.stages))
        try:
            below = options[options.index(list(stream.stages)) + 1:]
        except ValueError:
            below = []
        if cost is not None:
            now_cost = cost(stream, list(stream.stages))
            below = [c for c in below if not c or cost(stream, c) < now_cost]
        lower = below[0] if below else []
        reason = (f"enhancement executor overloaded: {share:.1%} of chunks missed their deadline; "
                  f"the stream runs {','.join(lower) or 'no stages'} instead of {','.join(stream.stages)}")
        log.warning("stream %s (%s): %s", stream.stream_id, stream.label, reason)
        stream.degraded_reason, stream.changed_at = reason, now
        self.shed += 1
        apply(stream, lower)
