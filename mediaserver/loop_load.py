"""How loaded the event loop's core is, and what the media process does about it.

One media process is one event loop on one core: the clock, RTP in and out, decoding, encoding and
signaling all run there.  When that core is full every stream of the process loses frames at once,
the admitted as much as the newest.  So the process measures its loop and acts before that:

* :class:`LoopBusy` reads the share of wall time the loop's thread spent running or waiting to run
  (``/proc/thread-self/schedstat``: run time plus run-queue wait; where that file is missing, the
  thread's CPU time only);
* :class:`LoopLoad` samples it once a second on the loop and hands each reading to its listeners:
  the Opus encoders' complexity (:mod:`mediaserver.encoder_load`) and the :class:`JoinGate`;
* :class:`JoinGate` refuses newcomers (``server-busy``, HTTP 503 / a WebSocket error) before one more
  would fill the loop's core, and while the media clock could not keep time:

  - *predicted*: the loop's busy share with one more participant over ``busy_limit`` (default 0.9):
    the mean busy share of the last ``smooth`` readings plus, for each participant beyond the fewest
    on the process in those readings (``then``), the loop's own run share per participant
    (``busy + run * (now + 1 - then) / then``).  The newcomer brings its media work (decode,
    fan-out, encode) to the loop; its stages' cost is the executor's to admit (it waits on the
    worker ahead of the loop, the run-queue wait in ``busy``), so only the run share is scaled.  The
    joins admitted since the last reading count at once: a burst of eight is not all let in on one
    reading.  Loss starts when the core is full, before the clock skips many ticks (measured: 1 % of
    frames lost at a busy share of 0.95 with 0.2 % of ticks skipped), so the gate acts on the
    prediction;
  - *symptom*: in each of the last ``sustained`` readings (seconds) the clock skipped at least
    ``join_skipped_ticks`` of its 10 ms ticks (each one a chunk of every stream not sent): a load
    the prediction missed (another process took the core, say).

  Refusing newcomers keeps the loss of those already in from starting; a load balancer or the
  client's retry takes them elsewhere.  Below ``join_min_participants`` on the process it never
  refuses (a handful of participants do not fill a core; a busy machine's stall must not refuse
  them), nor on the first burst of joins, before a reading with participants exists.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Callable, Optional

from mediaserver.room import cancel_quietly

log = logging.getLogger(__name__)

SCHEDSTAT = "/proc/thread-self/schedstat"


class LoopBusy:
    """Owns the last reading of the calling thread's run and run-queue times; ``sample()`` is the share
    of wall time since the previous call that it was busy (running or waiting to run), ``last_run`` the
    share it ran (call it from the thread to measure: the event loop's)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: Optional[tuple[float, float, float]] = None
        self.last_run: Optional[float] = None

    @staticmethod
    def _thread_seconds() -> tuple[float, float]:
        """(run, run + run-queue wait) seconds of the calling thread."""
        try:
            with open(SCHEDSTAT, "rb") as f:
                run_ns, wait_ns, _ = f.read().split()
            return int(run_ns) / 1e9, (int(run_ns) + int(wait_ns)) / 1e9
        except (OSError, ValueError):
            cpu = time.thread_time()
            return cpu, cpu

    def sample(self) -> Optional[float]:
        """Busy share of the window since the last call; None on the first call."""
        now, (run, busy) = self._clock(), self._thread_seconds()
        last, self._last = self._last, (now, run, busy)
        if last is None or now <= last[0]:
            return None
        self.last_run = max(0.0, (run - last[1]) / (now - last[0]))
        return max(0.0, (busy - last[2]) / (now - last[0]))


class LoopLoad:
    """Owns the once-a-second sampling task of the loop's busy share and the last reading; calls each
    listener with every reading."""

    def __init__(self, listeners: list[Callable[[float], object]], window_s: float = 1.0) -> None:
        self.listeners = listeners
        self.window_s = window_s
        self.last_busy: Optional[float] = None
        self.last_run: Optional[float] = None  # of ``last_busy``: the share the loop's thread ran
        self._probe = LoopBusy()
        self._task: Optional[asyncio.Task[None]] = None

    def start(self) -> None:
        """Start sampling (call on the loop to measure)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-load")

    async def _run(self) -> None:
        self._probe.sample()  # the first reading opens the first window
        while True:
            await asyncio.sleep(self.window_s)
            busy = self._probe.sample()
            if busy is None:
                continue
            self.last_busy, self.last_run = busy, self._probe.last_run
            for listener in self.listeners:
                try:
                    listener(busy)
                except Exception:  # a listener's bug must not stop the sampling of the others
                    log.exception("loop load listener failed")

    async def close(self) -> None:
        await cancel_quietly(self._task)
        self._task = None


class JoinGate:
    """Owns the decision to take one more participant on this media process, the readings it rests on
    and the refusal count.

    ``observe(ticks, skipped, busy, run, participants)`` takes the media clock's counters, the loop's
    busy and run shares and the participant count at one reading; ``refusal(participants)`` is None
    (take the newcomer) or why not.
    """

    def __init__(self, skipped_limit: float = 0.01, min_participants: int = 8, sustained: int = 3,
                 busy_limit: float = 0.9, smooth: int = 3) -> None:
        self.skipped_limit = skipped_limit
        self.busy_limit = busy_limit
        self.min_participants = min_participants
        self.sustained = max(1, sustained)
        self.refused = 0
        self.refused_predicted = 0  # of ``refused``: on the prediction, before the clock skipped ticks
        self.skipped_share: Optional[float] = None  # of the ticks due in the last reading's window
        self._over = 0  # readings in a row at or over the limit
        self._last: Optional[tuple[int, int]] = None
        self._busy: deque[tuple[float, float]] = deque(maxlen=max(1, smooth))  # (busy, run) shares
        self._participants: deque[int] = deque(maxlen=max(1, smooth) + 1)  # at each window's edges

    def observe(self, ticks: int, skipped: int, busy: Optional[float] = None, run: Optional[float] = None,
                participants: Optional[int] = None) -> None:
        if self._last is not None:
            due = (ticks - self._last[0]) + (skipped - self._last[1])
            self.skipped_share = (skipped - self._last[1]) / due if due > 0 else None
            over = self.skipped_share is not None and self.skipped_share >= self.skipped_limit
            self._over = self._over + 1 if over else 0
        self._last = (ticks, skipped)
        if participants is not None:
            if busy is not None and self._participants:
                self._busy.append((busy, busy if run is None else min(run, busy)))
            self._participants.append(participants)

    def predicted_busy(self, participants: int) -> Optional[float]:
        """The loop's busy share with one participant more than ``participants``; None without a
        reading of the process with participants in it."""
        if not self._busy:
            return None
        then = min(list(self._participants)[-len(self._busy) - 1:])  # at either edge of the readings' windows
        if then <= 0:
            return None
        busy = sum(b for b, _ in self._busy) / len(self._busy)
        run = sum(r for _, r in self._busy) / len(self._busy)
        return busy + run * (participants + 1 - then) / then

    def refusal(self, participants: int) -> Optional[str]:
        if participants < self.min_participants:
            return None
        if self.skipped_limit <= 1.0 and self._over >= self.sustained:
            self.refused += 1
            return (f"this media server is at capacity (its media clock skipped "
                    f"{100 * (self.skipped_share or 0.0):.0f} % of its ticks in the last second, {self._over} s "
                    f"in a row); try again later or another server")
        predicted = self.predicted_busy(participants)
        if self.busy_limit <= 1.0 and predicted is not None and predicted > self.busy_limit:
            self.refused += 1
            self.refused_predicted += 1
            return (f"this media server is at capacity (one more participant would take its media loop's core "
                    f"to {100 * predicted:.0f} % busy, over its limit of {100 * self.busy_limit:.0f} %); "
                    f"try again later or another server")
        return None

    def stats(self, participants: int = 0) -> dict[str, object]:
        predicted = self.predicted_busy(participants)
        return {"skipped_ticks_limit": self.skipped_limit, "busy_limit": self.busy_limit,
                "min_participants": self.min_participants,
                "skipped_share": None if self.skipped_share is None else round(self.skipped_share, 4),
                "predicted_busy": None if predicted is None else round(predicted, 3),
                "joins_refused": self.refused, "joins_refused_predicted": self.refused_predicted}
