"""The DNSMOS budget of the whole server: CPU seconds of the scorer process, shared fairly by the streams.

One DNSMOS window costs ~0.45 s of one core per clip on this machine (a window of a stream with
stages is two clips: before and after).  A fixed period per stream would make that cost grow with
the number of streams; instead the scorer gets a share of one core (``cpu_share``, default 0.02)
as a token bucket of CPU seconds, filled at ``cpu_share`` seconds per second up to ``burst_s``
seconds' worth, started full.  A stream that is due a window (its last one was at least
``period_s`` ago) asks for it; it is granted when the bucket holds the window's estimated cost and
the stream is among the first as many waiting streams as the bucket can pay for, in this order:
higher ``priority`` first (streams of a rollout's arms: ``mediaserver/rollout.py``), then the
stream whose last window was granted longest ago (never: first).  The grant reserves the estimate;
the window's real cost (the scorer process's CPU time for it) is charged when it is scored, and the
reservation is refunded when the window is never taken (the stream left, its audio stayed
unclean, the window was dropped).  The estimate per clip is a running mean of the measured costs.

A window may also carry an intelligibility pair (``QualityConfig.wer_every``: two Whisper tiny.en
transcriptions in the same scorer process, ~1 s of one core).  Its cost is reserved with the window
(``wer_pairs``), charged at what the scorer measured, and estimated by a running mean of its own;
the bucket always holds at least one window with a pair (``max_wer_pairs``), so that enabling WER
lowers how many windows the share pays for, never raises what the scorer spends.

Everything here runs on the monitor's scorer thread, except ``set_priority`` and ``set_boost``
(plain assignments, from the event loop).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

CLIP_COST_PRIOR_S = 0.45  # one 9.01 s segment of the P.835 model, one core of the development machine
WER_PAIR_COST_PRIOR_S = 1.2  # two Whisper tiny.en transcriptions of a 4 s window (docs/TELEMETRY.md)
_WAITING_EXPIRES_S = 5.0  # a stream that stopped asking (blocks dropped, closed) leaves the queue


@dataclass
class _Waiting:
    since: float  # last time it asked
    clips: int
    wer_pairs: int = 0


class ScoringBudget:
    """Owns the token bucket of scorer CPU seconds and the fair order in which streams get windows."""

    def __init__(self, cpu_share: float, burst_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.cpu_share = max(0.0, float(cpu_share))
        self.burst_s = max(1.0, float(burst_s))
        self.boost: Optional[float] = None  # a higher share while a rollout runs (set_boost)
        self.clip_cost_s = CLIP_COST_PRIOR_S
        self.wer_pair_cost_s = WER_PAIR_COST_PRIOR_S
        self.max_wer_pairs = 0  # pairs a window may carry (the monitor sets 1 when WER is on): sizes the bucket
        self.wer_share = 0.0  # pairs per window on average (1 / wer_every): for the windows-per-minute estimate
        self._clock = clock
        self._last = clock()
        self.tokens = self.capacity
        self.reserved_s = 0.0  # CPU seconds reserved for granted windows not scored yet
        self.last_grant: dict[str, float] = {}
        self.priority: dict[str, int] = {}
        self._waiting: dict[str, _Waiting] = {}
        self.granted = 0
        self.refunded = 0
        self.charged_s = 0.0

    @property
    def rate(self) -> float:
        """CPU seconds per second the scorer may spend."""
        return max(self.cpu_share, self.boost or 0.0)

    @property
    def capacity(self) -> float:
        return max(self.rate * self.burst_s, 2 * self.clip_cost_s + self.max_wer_pairs * self.wer_pair_cost_s)

    def _cost(self, clips: float, wer_pairs: float) -> float:
        return clips * self.clip_cost_s + wer_pairs * self.wer_pair_cost_s

    def set_priority(self, stream: str, priority: int) -> None:
        if priority:
            self.priority[stream] = priority
        else:
            self.priority.pop(stream, None)

    def set_boost(self, share: Optional[float]) -> None:
        self.boost = share

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.rate)
        self._last = now

    def _key(self, stream: str) -> tuple[int, float]:
        return (-self.priority.get(stream, 0), self.last_grant.get(stream, float("-inf")))

    def request(self, stream: str, clips: int, wer_pairs: int = 0) -> Optional[float]:
        """``stream`` is due a window of ``clips`` clips (and ``wer_pairs`` intelligibility pairs): granted now
        (the CPU seconds reserved for it, to be settled with ``charge`` or ``refund``) or not yet (None)."""
        now = self._clock()
        self._refill(now)
        self._waiting[stream] = _Waiting(now, clips, wer_pairs)
        cost = self._cost(clips, wer_pairs)
        if self.rate <= 0 or self.tokens < cost:
            return None
        stale = [s for s, w in self._waiting.items() if now - w.since > _WAITING_EXPIRES_S]
        for s in stale:
            del self._waiting[s]
        # the streams ahead of this one, and what their windows would cost first
        mine = self._key(stream)
        ahead = sum(self._cost(w.clips, w.wer_pairs) for s, w in self._waiting.items()
                    if s != stream and self._key(s) < mine)
        if self.tokens < ahead + cost:
            return None
        del self._waiting[stream]
        self.tokens -= cost
        self.reserved_s += cost
        self.last_grant[stream] = now
        self.granted += 1
        return cost

    def refund(self, reserved: float) -> None:
        """A granted window will not be scored: its reservation goes back."""
        self.reserved_s = max(0.0, self.reserved_s - reserved)
        self.tokens = min(self.capacity, self.tokens + reserved)
        self.refunded += 1

    def charge(self, reserved: float, cpu_s: float, clips: int, wer_pairs: int = 0, wer_cpu_s: float = 0.0) -> None:
        """A granted window was scored with ``cpu_s`` of the scorer's CPU for its ``clips`` DNSMOS clips and
        ``wer_cpu_s`` for its ``wer_pairs`` intelligibility pairs: settle its reservation."""
        spent = cpu_s + wer_cpu_s
        self.reserved_s = max(0.0, self.reserved_s - reserved)
        self.tokens += reserved - spent  # may go below zero: the next windows wait for it
        self.charged_s += spent
        if clips > 0 and cpu_s > 0:
            self.clip_cost_s = 0.8 * self.clip_cost_s + 0.2 * (cpu_s / clips)
        if wer_pairs > 0 and wer_cpu_s > 0:
            self.wer_pair_cost_s = 0.8 * self.wer_pair_cost_s + 0.2 * (wer_cpu_s / wer_pairs)

    def forget(self, stream: str) -> None:
        self._waiting.pop(stream, None)
        self.last_grant.pop(stream, None)
        self.priority.pop(stream, None)

    def stats(self) -> dict[str, Any]:
        self._refill(self._clock())
        return {"cpu_share": self.rate, "tokens_s": round(self.tokens, 3), "capacity_s": round(self.capacity, 3),
                "clip_cost_s": round(self.clip_cost_s, 3), "reserved_s": round(self.reserved_s, 3),
                "wer_pair_cost_s": round(self.wer_pair_cost_s, 3) if self.max_wer_pairs else None,
                "waiting": len(self._waiting),
                "granted": self.granted, "refunded": self.refunded, "charged_s": round(self.charged_s, 3),
                "windows_per_minute": round(60.0 * self.rate / self._cost(2, self.wer_share), 2)}
