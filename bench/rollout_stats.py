"""Benchmark: error rates and speed of the rollout's quality test (mediaserver/rollout_stats.py), simulated.

Each simulated rollout feeds both arms one window's OVRL gain at a time (candidate and baseline
alternately, as the scorer's round robin does) up to ``--windows`` windows per arm, and asks
``compare`` after every window, as the server does, until it says ``worse`` (a rollback).  Per-window
gains are normal, or Student-t with 3 degrees of freedom (heavy tails), with standard deviation
``sd`` (MOS) and a true candidate-minus-baseline difference ``delta_true``.  Printed as JSON per
(sd, tails, delta_true): the share of rollouts rolled back (``rollback_rate``; for
``delta_true >= -max_ovrl_drop`` that is the false-rollback rate the test promises to keep under
``alpha``) and the median number of windows per arm it took.

    .venv/bin/python bench/rollout_stats.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mediaserver.config import RolloutConfig  # noqa: E402
from mediaserver.rollout_stats import compare  # noqa: E402


def simulate(delta_true: float, sd: float, heavy: bool, windows: int, reps: int, cfg: RolloutConfig,
             rng: np.random.Generator) -> dict[str, float | None]:
    fired, took = 0, []
    for _ in range(reps):
        if heavy:
            noise = rng.standard_t(3, size=(2, windows)) / np.sqrt(3.0) * sd
        else:
            noise = rng.normal(0.0, sd, size=(2, windows))
        cand, base = list(delta_true + noise[0]), list(noise[1])
        for n in range(cfg.min_windows, windows + 1):
            if compare(cand[:n], base[:n], delta=cfg.max_ovrl_drop, alpha=cfg.alpha, min_windows=cfg.min_windows,
                       sd_floor=cfg.sd_floor).verdict == "worse":
                fired += 1
                took.append(n)
                break
    return {"rollback_rate": round(fired / reps, 4),
            "median_windows_per_arm": float(np.median(took)) if took else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=200, help="windows per arm before a rollout gives up")
    parser.add_argument("--reps", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="200 rollouts per case")
    args = parser.parse_args()
    if args.quick:
        args.reps = 200
    cfg = RolloutConfig()
    rng = np.random.default_rng(18)
    started = time.monotonic()
    cases = []
    for sd in (0.2, 0.35, 0.6):
        for heavy in (False, True):
            for delta_true in (0.0, -cfg.max_ovrl_drop, -0.3, -0.5, -1.0):
                cases.append({"sd": sd, "tails": "t3" if heavy else "normal", "delta_true": delta_true,
                              **simulate(delta_true, sd, heavy, args.windows, args.reps, cfg, rng)})
    h0 = [c["rollback_rate"] for c in cases if c["delta_true"] >= -cfg.max_ovrl_drop]
    print(json.dumps({"bench": "rollout_stats", "alpha": cfg.alpha, "max_ovrl_drop": cfg.max_ovrl_drop,
                      "min_windows": cfg.min_windows, "sd_floor": cfg.sd_floor, "windows_per_arm": args.windows,
                      "reps": args.reps, "worst_false_rollback_rate": max(h0), "cases": cases,
                      "wall_s": round(time.monotonic() - started, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
