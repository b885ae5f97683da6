"""The media clock: one 10 ms tick for every stream of the process.

All published streams pull their next chunk on the same tick, so the
enhancement executor receives every stream's chunk at nearly the same moment
and batches them.  The clock never tries to catch up by bursting: when the
event loop stalls for more than ``max_catchup`` ticks it skips ahead and
counts the lag; a tick that is late first lets the loop read the sockets, so
that the packets that arrived during a stall reach their jitter buffers
before the ticks that play them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

log = logging.getLogger(__name__)

TICK_S = 0.010
CATCHUP_YIELDS = 3  # loop turns given to the network before a late tick


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
            elif delay < -self.tick_s:
                # Late by more than a tick (the loop was busy): let the network side run first.  The
                # datagrams that came during the stall are still in the sockets; without this, the
                # catch-up ticks run back to back before any of them reaches a jitter buffer and every
                # stream whose buffer is shorter than the stall underruns at once.  A few loop turns:
                # socket -> ICE queue -> DTLS/SRTP task -> RTP receiver -> jitter buffer.
                for _ in range(CATCHUP_YIELDS):
                    await asyncio.sleep(0)
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
