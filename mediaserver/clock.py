"""The media clock: one 10 ms tick for every stream of the process.

All published streams pull their next chunk on the same tick, so the
enhancement executor receives every stream's chunk at nearly the same moment
and batches them.  The clock never tries to catch up by bursting: when the
event loop stalls for more than ``max_catchup`` ticks it skips ahead and
counts the lag.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

log = logging.getLogger(__name__)

TICK_S = 0.010


class MediaClock:
    """Owns the tick task and the set of per-tick callbacks."""

    def __init__(self, tick_s: float = TICK_S, max_catchup: int = 5) -> None:
        self.tick_s = tick_s
        self.max_catchup = max_catchup
        self._callbacks: dict[object, Callable[[], None]] = {}
        self._task: asyncio.Task[None] | None = None
        self.ticks = 0
        self.skipped_ticks = 0
        self.last_lag_ms = 0.0
        self.max_lag_ms = 0.0

    def add(self, key: object, callback: Callable[[], None]) -> None:
        self._callbacks[key] = callback
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="media-clock")

    def remove(self, key: object) -> None:
        self._callbacks.pop(key, None)

    async def _run(self) -> None:
        next_t = time.monotonic()
        while True:
            next_t += self.tick_s
            delay = next_t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            lag = time.monotonic() - next_t
            self.last_lag_ms = lag * 1000.0
            self.max_lag_ms = max(self.max_lag_ms, self.last_lag_ms)
            if lag > self.max_catchup * self.tick_s:
                skipped = int(lag / self.tick_s)
                self.skipped_ticks += skipped
                next_t += skipped * self.tick_s
            self.ticks += 1
            for cb in list(self._callbacks.values()):
                try:
                    cb()
                except Exception:  # a broken stream must not stop the clock for everyone
                    log.exception("media clock callback failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
