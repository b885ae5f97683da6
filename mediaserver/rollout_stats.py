"""The statistics of a rollout: is the candidate worse than the baseline, with how much confidence.

The quality figure of one scored window (``mediaserver/quality.py``) is its OVRL *gain*: DNSMOS OVRL
after the stages minus OVRL before them, on the same 4 s of audio.  The gain takes out how noisy
the input was (which differs between streams, rooms and minutes far more than between denoisers),
so windows of different streams can be pooled per arm.  The rollout compares the mean gain of the
candidate arm with the baseline arm's: ``d = mean(candidate) - mean(baseline)``.

The server looks at ``d`` after every new window, for as long as the rollout runs, so a fixed-sample
interval (a t-test, a bootstrap interval) recomputed at every look would be wrong far more often
than its nominal level.  Instead ``confidence_sequence`` returns an *anytime-valid* interval: the
two-sided normal-mixture boundary of Robbins (Howard, Ramdas, McAuliffe, Sekhon, "Time-uniform,
nonparametric, nonasymptotic confidence sequences", Ann. Statist. 2021, eq. (14)), applied as in
Waudby-Smith et al., "Time-uniform central limit theory and asymptotic confidence sequences"
(2024) to the difference of two means with the plug-in variance ``v = s_c^2/n_c + s_b^2/n_b``.
With the information ``I = 1/v`` (a Brownian motion's intrinsic time: ``I * d`` has variance
``I``), the radius is::

    r = sqrt((I + rho) * ln((I + rho) / (rho * alpha^2))) / I

and ``P(the true difference ever leaves [d - r, d + r]) <= alpha`` over the whole rollout, however
often it is looked at (asymptotically: the variance is estimated and windows are taken as
independent).  ``rho`` sets where the boundary is tightest (``tuning_rho``: at the information of
``2 * min_windows`` windows per arm with a per-window standard deviation of 0.35 MOS).  Each
arm's standard deviation is floored at ``sd_floor`` (0.1 MOS) so that a few near-identical windows
cannot make the interval collapse.

Decision (``verdict``), with ``delta`` the stated threshold (``max_ovrl_drop``, 0.1 MOS):

- ``worse``: both arms have at least ``min_windows`` windows and the upper end ``d + r < -delta``:
  the candidate loses more than ``delta`` of OVRL gain; the server rolls back.  Error rate: a
  candidate whose true difference is ``>= -delta`` is rolled back with probability at most
  ``alpha`` (0.05) over the whole rollout (measured: bench/rollout_stats.py);
- ``not-worse``: the lower end ``d - r > -delta``: the candidate is within ``delta`` of the
  baseline or better (promotion stays a command);
- ``undecided`` otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

SD_REFERENCE = 0.35  # MOS: a typical per-window standard deviation of the OVRL gain (tuning only)


@dataclass(frozen=True)
class Comparison:
    """The candidate-minus-baseline difference of mean OVRL gain and its anytime-valid interval."""

    difference: float
    lower: float
    upper: float
    n_candidate: int
    n_baseline: int
    verdict: str  # "worse" | "not-worse" | "undecided"

    def as_dict(self) -> dict[str, object]:
        return {"difference": _r(self.difference), "lower": _r(self.lower), "upper": _r(self.upper),
                "n_candidate": self.n_candidate, "n_baseline": self.n_baseline, "verdict": self.verdict}


def _r(x: float) -> float | None:
    return round(x, 4) if math.isfinite(x) else None


def tuning_rho(min_windows: int, alpha: float) -> float:
    """The mixture precision that makes the boundary tightest at ``2 * min_windows`` windows per arm
    (Howard et al. 2021, section 3.5: rho = m / (2 ln(1/alpha) + ln(1 + 2 ln(1/alpha))))."""
    n = 2 * max(1, min_windows)
    info = 1.0 / (2 * SD_REFERENCE ** 2 / n)
    a = 2 * math.log(1.0 / alpha)
    return info / (a + math.log(1 + a))


def _mean_var(x: Sequence[float]) -> tuple[float, float]:
    n = len(x)
    m = sum(x) / n
    v = sum((a - m) ** 2 for a in x) / (n - 1) if n > 1 else 0.0
    return m, v


def confidence_sequence(candidate: Sequence[float], baseline: Sequence[float], alpha: float, rho: float,
                        sd_floor: float = 0.1) -> tuple[float, float, float]:
    """(difference of means, lower, upper); infinite bounds while an arm has no window."""
    if not candidate or not baseline:
        return math.nan, -math.inf, math.inf
    mc, vc = _mean_var(candidate)
    mb, vb = _mean_var(baseline)
    floor = sd_floor ** 2
    v = max(vc, floor) / len(candidate) + max(vb, floor) / len(baseline)
    info = 1.0 / v
    radius = math.sqrt((info + rho) * math.log((info + rho) / (rho * alpha ** 2))) / info
    d = mc - mb
    return d, d - radius, d + radius


def compare(candidate: Sequence[float], baseline: Sequence[float], *, delta: float, alpha: float,
            min_windows: int, sd_floor: float = 0.1) -> Comparison:
    """The verdict on the candidate after the windows so far (see the module's docstring)."""
    d, lower, upper = confidence_sequence(candidate, baseline, alpha, tuning_rho(min_windows, alpha), sd_floor)
    enough = len(candidate) >= min_windows and len(baseline) >= min_windows
    verdict = "undecided"
    if enough and upper < -delta:
        verdict = "worse"
    elif enough and lower > -delta:
        verdict = "not-worse"
    return Comparison(d, lower, upper, len(candidate), len(baseline), verdict)
