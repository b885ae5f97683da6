"""Batched look-ahead-free peak limiter with a soft knee and per-stream gain state.

Per sample, a peak envelope follows ``|x|`` with instant attack and an
exponential release; a soft-knee static curve with infinite ratio above the
ceiling turns the envelope into a gain.  Because the envelope is never below
``|x|`` and the curve never maps a level above the ceiling, ``|y| <= ceiling``
holds for every sample without look-ahead (latency 0).  The release recursion
``env[n] = max(|x[n]|, r * env[n-1])`` is solved for a whole chunk at once:
``env[n] = r**n * max(r * env[-1], cummax_k(|x[k]| * r**-k))``, so the stage
is a handful of tensor ops for all streams together, no loop over samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from enhancers.stage import CHUNK, SAMPLE_RATE, BatchContext, Stage, StageStream


def db_to_gain(db: float) -> float:
    return float(10.0 ** (db / 20.0))


class LimiterStage(Stage):
    """Owns the limiter curve and each stream's peak-envelope state (one float per slot).

    ``ceiling_db``: the output never exceeds this peak level (dBFS).  ``knee_db``:
    width of the soft knee, centred on the ceiling; levels below
    ``ceiling - knee/2`` pass untouched.  ``release_ms``: time constant of the
    envelope's return after a peak.
    """

    name = "limiter"
    latency_samples = 0

    def __init__(
        self,
        device: str | torch.device = "cpu",
        ceiling_db: float = -1.0,
        knee_db: float = 6.0,
        release_ms: float = 80.0,
    ) -> None:
        super().__init__(device)
        if ceiling_db > 0.0:
            raise ValueError("ceiling_db must be <= 0 dBFS")
        if knee_db < 0.0 or release_ms < 1.0:
            raise ValueError("knee_db must be >= 0 and release_ms >= 1")
        self.ceiling_db = float(ceiling_db)
        self.knee_db = float(knee_db)
        self.release_ms = float(release_ms)
        self.ceiling = db_to_gain(ceiling_db)
        decay = math.exp(-1.0 / (release_ms * 1e-3 * SAMPLE_RATE))
        k = torch.arange(CHUNK, dtype=torch.float64)
        self._decay = decay
        self._grow_weights = (decay**-k).to(torch.float32).to(self.device)  # r**-k
        self._decay_weights = (decay**k).to(torch.float32).to(self.device)  # r**k

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {"envelope": torch.zeros((), dtype=torch.float32)}

    def envelope(self, magnitude: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Peak envelope ``[N, CHUNK]`` of ``magnitude`` continuing from ``previous`` ``[N]``."""
        held = torch.cummax(magnitude * self._grow_weights, dim=1).values
        start = (previous * self._decay).unsqueeze(1)
        return torch.maximum(held, start) * self._decay_weights

    def gain(self, envelope: torch.Tensor) -> torch.Tensor:
        """Soft-knee, infinite-ratio gain for a peak envelope (linear, <= 1)."""
        level_db = 20.0 * torch.log10(envelope.clamp_min(1e-9))
        over = level_db - (self.ceiling_db - self.knee_db / 2.0)
        if self.knee_db > 0.0:
            knee_cut = -(over.clamp(0.0, self.knee_db) ** 2) / (2.0 * self.knee_db)
        else:
            knee_cut = torch.zeros_like(over)
        above_cut = -(over - self.knee_db).clamp_min(0.0)
        return torch.pow(10.0, (knee_cut + above_cut) / 20.0)

    def process(self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext) -> torch.Tensor:
        slots = self.slots(streams)
        state = self.state["envelope"]
        env = self.envelope(audio.abs(), state.index_select(0, slots))
        state.index_copy_(0, slots, env[:, -1])
        return (audio * self.gain(env)).clamp(-self.ceiling, self.ceiling)
