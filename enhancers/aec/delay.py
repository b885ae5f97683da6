"""Bulk echo delay estimation by band-envelope cross-correlation, batched.

For every stream the estimator keeps a ring of the far-end's recent
*spectral-band onset features* (the frame-to-frame change of log band
energies, 24 bands 150 Hz - 7 kHz) and, per candidate delay (one per 10 ms
chunk, 0 ... ``max_delay_chunks``), an exponentially smoothed correlation
between the microphone's features now and the far end's features that many
chunks ago.  Onset features are level- and coloration-invariant and give a
sharp peak at the bulk delay even in reverberant rooms; the estimate moves
only when the best candidate beats the current delay by a margin for a
number of consecutive chunks (hysteresis), the way WebRTC's delay estimator
guards its binary-spectrum match.

Resolution is one chunk; the adaptive filter keeps a few partitions ahead
of the estimated delay to absorb the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from enhancers.stage import SAMPLE_RATE

# Indices into ``dly_scalars``.
DELAY, CANDIDATE, CONFIRM, LOCKED, SCORE, BEST = range(6)
N_SCALARS = 6


@dataclass(frozen=True)
class DelayConfig:
    """Search range and decision constants of the delay estimator."""

    max_delay_chunks: int = 60
    bands: int = 24
    low_hz: float = 150.0
    high_hz: float = 7000.0
    smoothing: float = 0.99  # per chunk, ~1 s memory
    min_score: float = 0.25  # normalised correlation needed to lock
    margin: float = 0.05  # a new delay must beat the current one by this much
    confirm_chunks: int = 15  # ... for this many consecutive chunks
    floor_dbfs: float = -75.0  # band power floor, per bin

    @property
    def candidates(self) -> int:
        return self.max_delay_chunks + 1


def band_matrix(cfg: DelayConfig, n_fft: int) -> torch.Tensor:
    """``[bins, bands]`` 0/1 matrix summing FFT bins into log-spaced bands."""
    bins = n_fft // 2 + 1
    hz = torch.arange(bins, dtype=torch.float64) * SAMPLE_RATE / n_fft
    edges = torch.logspace(
        math.log10(cfg.low_hz), math.log10(cfg.high_hz), cfg.bands + 1, dtype=torch.float64
    )
    m = (hz[:, None] >= edges[None, :-1]) & (hz[:, None] < edges[None, 1:])
    return m.float()


def delay_initial_state(cfg: DelayConfig) -> dict[str, torch.Tensor]:
    scalars = torch.zeros(N_SCALARS)
    scalars[DELAY] = -1.0  # no estimate yet
    scalars[CANDIDATE] = -1.0
    return {
        "dly_far": torch.zeros(cfg.candidates, cfg.bands),  # ring of far onset features
        "dly_far_last": torch.zeros(cfg.bands),
        "dly_near_last": torch.zeros(cfg.bands),
        "dly_corr": torch.zeros(cfg.candidates),
        "dly_far_var": torch.zeros(cfg.candidates),
        "dly_near_var": torch.zeros(()),
        "dly_scalars": scalars,
    }


class DelayEstimator:
    """Owns the band matrix and constants; ``update`` advances a batch of rows by one chunk."""

    def __init__(self, cfg: DelayConfig, n_fft: int, device: torch.device) -> None:
        self.cfg = cfg
        bins = band_matrix(cfg, n_fft)
        self.bands = bins.to(device)
        # Floor per band: ``floor_dbfs`` white noise seen through a Hann window, in 16-bit units.
        floor_power = (10 ** (cfg.floor_dbfs / 20) * 32768) ** 2 * 0.375 / n_fft
        self.floor = (bins.sum(0) * floor_power).clamp_min(1e-3).to(device)
        # the numba kernel's view of the same: each band's bins are one contiguous range
        self.kernel = True  # CPU: one numba kernel per update (enhancers/aec/kernels.py)
        from enhancers.aec.kernels import delay_update

        self._kernel = delay_update  # bound once: the dispatch runs every chunk
        used = bins.bool()
        first = torch.where(used.any(0), used.float().argmax(0), 0)
        self._band_lo = first.numpy().astype(np.int64)
        self._band_hi = (first + used.sum(0)).numpy().astype(np.int64)
        self._floor_np = self.floor.cpu().numpy()

    def features(self, spec_power: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Onset features (half-wave rectified change of log band energy) and the new log energies."""
        log_e = torch.log(spec_power @ self.bands + self.floor)
        return (log_e - last).clamp_min(0.0), log_e

    def update(
        self,
        st: dict[str, torch.Tensor],
        far_power: torch.Tensor,
        near_power: torch.Tensor,
        count: torch.Tensor,
    ) -> torch.Tensor:
        """One chunk for every row: returns the current bulk delay in chunks (-1 = none yet).

        ``st["dly_scalars"][:, BEST]`` also holds the best candidate of this
        chunk (without hysteresis), a guess to use before the estimate locks.

        ``far_power`` / ``near_power`` are ``[B, bins]`` power spectra of the
        newest far-end (undelayed) and microphone windows; ``count`` [B] is each
        row's chunk counter (position in the ring).
        """
        if self.kernel and far_power.device.type == "cpu":
            return self._update_kernel(st, far_power, near_power, count)
        return self.update_torch(st, far_power, near_power, count)

    def _update_kernel(
        self,
        st: dict[str, torch.Tensor],
        far_power: torch.Tensor,
        near_power: torch.Tensor,
        count: torch.Tensor,
    ) -> torch.Tensor:
        cfg = self.cfg
        for key in ("dly_far", "dly_far_last", "dly_near_last", "dly_corr", "dly_far_var", "dly_near_var",
                    "dly_scalars"):  # updated in place: pool views or the batch's copies
            if not st[key].is_contiguous():
                st[key] = st[key].contiguous()
        delay = np.empty(far_power.shape[0], dtype=np.int64)
        self._kernel(
            far_power.contiguous().numpy(), near_power.contiguous().numpy(), self._band_lo, self._band_hi,
            self._floor_np, count.contiguous().numpy(), st["dly_far"].numpy(), st["dly_far_last"].numpy(),
            st["dly_near_last"].numpy(), st["dly_corr"].numpy(), st["dly_far_var"].numpy(),
            st["dly_near_var"].numpy(), st["dly_scalars"].numpy(), float(cfg.smoothing), float(cfg.min_score),
            float(cfg.margin), float(cfg.confirm_chunks), delay,
        )
        return torch.from_numpy(delay)

    def update_torch(
        self,
        st: dict[str, torch.Tensor],
        far_power: torch.Tensor,
        near_power: torch.Tensor,
        count: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`update` in torch ops (any device; the reference of the kernel)."""
        cfg = self.cfg
        lam = cfg.smoothing
        n_cand = cfg.candidates
        far_f, st["dly_far_last"] = self.features(far_power, st["dly_far_last"])
        near_f, st["dly_near_last"] = self.features(near_power, st["dly_near_last"])
        far_f = far_f - far_f.mean(-1, keepdim=True)
        near_f = near_f - near_f.mean(-1, keepdim=True)
        rows = torch.arange(far_f.shape[0], device=far_f.device)
        ring = st["dly_far"].clone()
        ring[rows, torch.remainder(count, n_cand)] = far_f
        st["dly_far"] = ring
        # Ring slot of each candidate delay d: (count - d) mod n_cand.
        lags = torch.arange(n_cand, device=far_f.device)
        idx = torch.remainder(count[:, None] - lags[None, :], n_cand)
        past = torch.gather(ring, 1, idx[:, :, None].expand(-1, -1, cfg.bands))  # [B, n_cand, bands]
        inst = (past * near_f[:, None, :]).sum(-1)
        st["dly_corr"] = lam * st["dly_corr"] + (1 - lam) * inst
        st["dly_far_var"] = lam * st["dly_far_var"] + (1 - lam) * past.square().sum(-1)
        st["dly_near_var"] = lam * st["dly_near_var"] + (1 - lam) * near_f.square().sum(-1)
        score = st["dly_corr"] / torch.sqrt(st["dly_far_var"] * st["dly_near_var"][:, None] + 1e-6)
        return self._decide(st, score)

    def _decide(self, st: dict[str, torch.Tensor], score: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        # the per-stream scalars as separate [B] views, restacked once at the end (fewer small ops)
        current, candidate, confirm, locked, _, _ = st["dly_scalars"].unbind(1)
        best_score, best = score.max(dim=1)
        best_f = best.float()
        cur_score = torch.gather(score, 1, current.clamp_min(0).long()[:, None])[:, 0]
        cur_score = torch.where(current < 0, torch.full_like(cur_score, -1.0), cur_score)
        wants = (best_score > cfg.min_score) & (best_score > cur_score + cfg.margin) & (best_f != current)
        same = wants & (best_f == candidate)
        confirm = torch.where(same, confirm + 1, torch.where(wants, 1.0, 0.0))
        candidate = torch.where(wants, best_f, -1.0)
        switch = confirm >= cfg.confirm_chunks
        delay = torch.where(switch, best_f, current)
        locked = torch.where(switch, 1.0, locked)
        confirm = torch.where(switch, 0.0, confirm)
        chosen = torch.gather(score, 1, delay.clamp_min(0).long()[:, None])[:, 0]
        st["dly_scalars"] = torch.stack([delay, candidate, confirm, locked, chosen, best_f], 1)
        return delay
