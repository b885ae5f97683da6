"""The DNSMOS budget: the scorer's CPU is bounded for the whole server, and streams share it fairly.

``ScoringBudget`` driven with a simulated clock and the costs a real scorer reports: streams ask
for a window every second while due (as the monitor does, once per 1 s block), windows are charged
what they cost.  Spending stays within ``cpu_share`` of one core plus the burst, every stream gets
its turn (round robin), a rollout's arm streams go first, and windows never taken give their
reservation back.
"""

from __future__ import annotations

from collections import Counter

from mediaserver.quality_budget import ScoringBudget


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _run(budget: ScoringBudget, clock: Clock, streams: list[str], seconds: int, cost_s: float = 0.5,
         clips: int = 2) -> Counter[str]:
    got: Counter[str] = Counter()
    for _ in range(seconds):
        clock.t += 1.0
        for s in streams:
            reserved = budget.request(s, clips)
            if reserved is not None:
                got[s] += 1
                budget.charge(reserved, cost_s * clips, clips)  # scored at once, at its real cost
    return got


def test_spending_is_bounded_for_the_whole_server_and_shared_round_robin() -> None:
    clock = Clock()
    budget = ScoringBudget(cpu_share=0.05, burst_s=20.0, clock=clock)
    streams = [f"s{i}" for i in range(48)]
    seconds = 1200
    got = _run(budget, clock, streams, seconds)
    spent = budget.charged_s
    # 5 % of one core over 20 minutes (+ the burst it started with), whatever the number of streams
    assert spent <= 0.05 * seconds + budget.capacity + 1e-6, spent
    assert spent >= 0.05 * seconds * 0.9, spent  # and the budget is used
    assert set(got) == set(streams)
    assert max(got.values()) - min(got.values()) <= 1, got  # round robin: nobody waits twice as long
    assert abs(budget.clip_cost_s - 0.5) < 0.01  # the estimate follows the measured cost


def test_rollout_arms_first_and_unscored_windows_refunded() -> None:
    clock = Clock()
    budget = ScoringBudget(cpu_share=0.02, burst_s=10.0, clock=clock)
    for s in ("arm-a", "arm-b"):
        budget.set_priority(s, 1)
    got = _run(budget, clock, ["x", "y", "arm-a", "z", "arm-b"], 600)
    assert got["arm-a"] > 3 * max(got["x"], got["y"], got["z"], 1) and got["arm-b"] >= got["arm-a"] - 1, got
    # a rollout that wants samples sooner raises the share while it runs
    budget.set_boost(0.2)
    before = sum(got.values())
    got = _run(budget, clock, ["x", "y", "arm-a", "z", "arm-b"], 600)
    assert sum(got.values()) > 5 * before
    budget.set_boost(None)
    # a grant whose window is never scored (the stream left, its audio stayed unclean) comes back
    clock.t += 1000
    tokens = budget.stats()["tokens_s"]
    reserved = budget.request("x", 2)
    assert reserved is not None and budget.tokens < tokens
    budget.refund(reserved)
    assert abs(budget.tokens - tokens) < 1e-9 and budget.reserved_s == 0.0
