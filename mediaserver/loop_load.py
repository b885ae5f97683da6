"""How loaded the event loop's core is, and what the media process does about it.

One media process is one event loop on one core: the clock, RTP in and out, decoding, encoding and
signaling all run there.  When that core is full every stream of the process loses frames at once,
the admitted as much as the newest.  So the process measures its loop and acts before that:

* :class:`LoopBusy` reads the share of wall time the loop's thread spent running or waiting to run
  (``/proc/thread-self/schedstat``: run time plus run-queue wait; where that file is missing, the
  thread's CPU time only);
* :class:`LoopLoad` samples it once a second on the loop and hands each reading to its listeners:
  the Opus encoders' complexity (:mod:`mediaserver.encoder_load`) and the :class:`JoinGate`;
* :class:`JoinGate` refuses newcomers (``server-busy``, HTTP 503 / a WebSocket error) while the media
  clock could not keep time: in each of the last ``sustained`` readings (seconds) it skipped at least
  ``join_skipped_ticks`` of its 10 ms ticks (each one a chunk of every stream not sent).  That is the symptom of a full core
  itself, not a prediction: the busy share alone reads high well before (run-queue wait behind the
  executor worker and the quality scorer on the same core counts in it), and a burst of joins
  (DTLS handshakes) skips ticks for a second or two, then passes.  Refusing newcomers then stops the loss from growing; a load balancer or
  the client's retry takes them elsewhere.  Below ``join_min_participants`` on the process it never
  refuses (a handful of participants do not fill a core; a busy machine's stall must not refuse them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Optional

from mediaserver.room import cancel_quietly

log = logging.getLogger(__name__)

SCHEDSTAT = "/proc/thread-self/schedstat"


class LoopBusy:
    """Owns the last reading of the calling thread's run + run-queue time; ``sample()`` is the share of
    wall time since the previous call (call it from the thread to measure: the event loop's)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: Optional[tuple[float, float]] = None

    @staticmethod
    def _thread_seconds() -> float:
        try:
            with open(SCHEDSTAT, "rb") as f:
                run_ns, wait_ns, _ = f.read().split()
            return (int(run_ns) + int(wait_ns)) / 1e9
        except (OSError, ValueError):
            return time.thread_time()

    def sample(self) -> Optional[float]:
        """Busy share of the window since the last call; None on the first call."""
        now, busy = self._clock(), self._thread_seconds()
        last, self._last = self._last, (now, busy)
        if last is None or now <= last[0]:
            return None
        return max(0.0, (busy - last[1]) / (now - last[0]))


class LoopLoad:
    """Owns the once-a-second sampling task of the loop's busy share and the last reading; calls each
    listener with every reading."""

    def __init__(self, listeners: list[Callable[[float], object]], window_s: float = 1.0) -> None:
        self.listeners = listeners
        self.window_s = window_s
        self.last_busy: Optional[float] = None
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
            self.last_busy = busy
            for listener in self.listeners:
                try:
                    listener(busy)
                except Exception:  # a listener's bug must not stop the sampling of the others
                    log.exception("loop load listener failed")

    async def close(self) -> None:
        await cancel_quietly(self._task)
        self._task = None


class JoinGate:
    """Owns the decision to take one more participant on this media process, and the refusal count.

    ``observe(ticks, skipped)`` takes the media clock's counters at one reading; ``refusal(participants)`` is None (take the newcomer) or why not.
    """

    def __init__(self, skipped_limit: float = 0.01, min_participants: int = 8, sustained: int = 3) -> None:
        self.skipped_limit = skipped_limit
        self.min_participants = min_participants
        self.sustained = max(1, sustained)
        self.refused = 0
        self.skipped_share: Optional[float] = None  # of the ticks due in the last reading's window
        self._over = 0  # readings in a row at or over the limit
        self._last: Optional[tuple[int, int]] = None

    def observe(self, ticks: int, skipped: int) -> None:
        if self._last is not None:
            due = (ticks - self._last[0]) + (skipped - self._last[1])
            self.skipped_share = (skipped - self._last[1]) / due if due > 0 else None
            over = self.skipped_share is not None and self.skipped_share >= self.skipped_limit
            self._over = self._over + 1 if over else 0
        self._last = (ticks, skipped)

    def refusal(self, participants: int) -> Optional[str]:
        if self.skipped_limit > 1.0 or participants < self.min_participants or self._over < self.sustained:
            return None
        self.refused += 1
        return (f"this media server is at capacity (its media clock skipped {100 * (self.skipped_share or 0.0):.0f} % "
                f"of its ticks in the last second, {self._over} s in a row); try again later or another server")

    def stats(self) -> dict[str, object]:
        return {"skipped_ticks_limit": self.skipped_limit, "min_participants": self.min_participants,
                "skipped_share": None if self.skipped_share is None else round(self.skipped_share, 4),
                "joins_refused": self.refused}
