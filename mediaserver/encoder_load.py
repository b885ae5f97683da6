"""Opus encoder complexity by load: full quality while the media core has room, lighter when it is busy.

Every published stream that has stages is decoded, enhanced and encoded again once (fanout.py).  The
encoder is the largest single cost of that path: on the development machine libopus at complexity 5
takes about 150 us per 20 ms frame of speech (75 us per 10 ms tick per stream), complexity 1 about
80 us, for a PESQ wideband of 4.04 instead of 4.29 (bench/opus_complexity.py).  A server that keeps
complexity 5 when its core is full runs out of core before anything else; one that always runs
complexity 1 gives up quality it had room for.  So, as WebRTC's own encoders do under CPU pressure, the complexity follows
the load of the event loop's core:

* :class:`mediaserver.loop_load.LoopLoad` measures, once a second, the share of wall time the event
  loop's thread spent running or waiting to run, and hands each reading to ``observe``;
* :class:`EncoderComplexity` owns the complexity every encoder of the process uses now: the light one
  (``MediaConfig.opus_complexity_under_load``) from the first window at or above ``light_above``, the
  full one (``MediaConfig.opus_complexity``) again after ``recover_windows`` windows in a row at or
  below ``full_below``.  Encoders read it at each frame (an int compare; ``OPUS_SET_COMPLEXITY`` only
  on a change), so a switch applies to every stream within 20 ms and needs no registry.

Switching is seamless in libopus (the control takes effect at the next frame).  ``/metrics`` has the
complexity in use (``mediaserver_opus_complexity``) and the switches (``mediaserver_opus_complexity_changes``);
``/healthz`` has both under ``encoder``.
"""

from __future__ import annotations

import logging
from typing import Optional

log = logging.getLogger(__name__)


class EncoderComplexity:
    """Owns the Opus complexity the process's encoders use now, and the hysteresis that moves it.

    ``full`` while the loop's core has room; ``light`` from the first window whose busy share is at or
    above ``light_above``; ``full`` again after ``recover_windows`` windows in a row at or below
    ``full_below``.  ``light == full`` (or ``light_above > 1``) keeps the complexity fixed.
    """

    def __init__(self, full: int = 5, light: int = 1, *, light_above: float = 0.8, full_below: float = 0.6,
                 recover_windows: int = 5) -> None:
        for name, value in (("full", full), ("light", light)):
            if not 0 <= value <= 10:
                raise ValueError(f"Opus complexity {name}={value} is not in 0..10")
        self.full = full
        self.light = light
        self.light_above = light_above
        self.full_below = full_below
        self.recover_windows = max(1, recover_windows)
        self.current = full
        self.changes = 0
        self.last_busy: Optional[float] = None
        self._calm = 0

    @property
    def adaptive(self) -> bool:
        return self.light != self.full and self.light_above <= 1.0

    def observe(self, busy: Optional[float]) -> int:
        """Take one window's busy share; returns the complexity from now on."""
        if busy is None:
            return self.current
        self.last_busy = busy
        if not self.adaptive:
            return self.current
        if self.current == self.full:
            if busy >= self.light_above:
                self._set(self.light, busy)
        elif busy <= self.full_below:
            self._calm += 1
            if self._calm >= self.recover_windows:
                self._set(self.full, busy)
        else:
            self._calm = 0
        return self.current

    def _set(self, complexity: int, busy: float) -> None:
        log.info("opus encoders: complexity %d -> %d (event loop's core %.0f %% busy)",
                 self.current, complexity, 100 * busy)
        self.current = complexity
        self.changes += 1
        self._calm = 0

    def stats(self) -> dict[str, object]:
        return {"opus_complexity": self.current, "full": self.full, "under_load": self.light,
                "changes": self.changes,
                "loop_busy": None if self.last_busy is None else round(self.last_busy, 3)}
