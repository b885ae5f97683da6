"""Ramp mode: add participants step by step until a service-level objective breaks.

Bots are never restarted: each step adds ``step`` more (filling rooms of
``room_size`` in order), waits ``warm-up`` seconds for the renegotiations
and jitter buffers to settle, then measures a ``hold`` window with every bot
still running.  A step holds when all of these do:

- p99 of the marker latency (publisher send -> subscriber RTP arrival) is at
  most ``p99_latency_ms``;
- the share of 20 ms frames missing at the subscribers is at most ``drop_rate``;
- the mean DNSMOS OVRL of the scored streams is at least ``dnsmos_ovrl``;
- every bot of the step joined, and every bot received every other bot of
  its room (no missing subscription, no silent stream).

The report names the largest number of participants that held.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from loadtest.session import LoadSession, SessionConfig


@dataclass(frozen=True)
class Slo:
    """The objectives a load step must meet (each None to ignore it)."""

    p99_latency_ms: float | None = 400.0
    drop_rate: float | None = 0.01
    dnsmos_ovrl: float | None = 2.0

    def breaches(self, summary: dict[str, Any], joins_failed: int) -> list[str]:
        out = []
        p99 = summary["latency_ms"]["p99"]
        if self.p99_latency_ms is not None and p99 is not None and p99 > self.p99_latency_ms:
            out.append(f"p99 latency {p99} ms > {self.p99_latency_ms} ms")
        drops = summary["drop_rate"]
        if self.drop_rate is not None and drops is not None and drops > self.drop_rate:
            out.append(f"drop rate {drops} > {self.drop_rate}")
        ovrl = summary["dnsmos"]["ovrl"]
        if self.dnsmos_ovrl is not None and ovrl is not None and ovrl < self.dnsmos_ovrl:
            out.append(f"DNSMOS OVRL {ovrl} < {self.dnsmos_ovrl}")
        if joins_failed:
            out.append(f"{joins_failed} bots failed to join")
        if summary["streams_silent"]:
            out.append(f"{summary['streams_silent']} streams carried no audio")
        if summary.get("streams_missing"):
            out.append(f"{summary['streams_missing']} subscriptions never arrived")
        return out


@dataclass(frozen=True)
class RampPlan:
    """How the load grows."""

    start: int = 2
    step: int = 2
    max_participants: int = 40
    room_size: int = 4
    hold_s: float = 15.0


async def run_ramp(config: SessionConfig, plan: RampPlan, slo: Slo) -> dict[str, Any]:
    """Grow the load until ``slo`` breaks or ``plan.max_participants`` is reached."""
    if plan.start < 1 or plan.step < 1 or plan.room_size < 2:
        raise ValueError("start and step must be >= 1, room size >= 2")
    session = LoadSession(config)
    await session.start()
    steps: list[dict[str, Any]] = []
    held: int | None = None
    try:
        if config.light:
            await session.prepare(plan.max_participants)
        count = plan.start
        while True:
            new = count - len(session.specs)
            joins = await session.add_bots([session.room_name(i // plan.room_size)
                                            for i in range(len(session.specs), count)])
            failed = sum(1 for j in joins if not j["ok"])
            await session.hold(config.warmup_s, f"step {len(steps) + 1}: {count} participants, warm-up")
            window = await session.measure(plan.hold_s, f"step {len(steps) + 1}: {count} participants")
            breaches = slo.breaches(window["summary"], failed)
            steps.append({"participants": count, "added": new, "held": not breaches, "breaches": breaches,
                          "summary": window["summary"], "window": window})
            print(f"[loadtest] step {len(steps)}: {count} participants -> "
                  f"{'held' if not breaches else 'BROKE: ' + '; '.join(breaches)}", flush=True)
            if breaches:
                break
            held = count
            if count >= plan.max_participants:
                break
            count = min(plan.max_participants, count + plan.step)
            await session.trim(window["until_s"])
    finally:
        await session.close()
    last_window = steps[-1].get("window", {}) if steps else {}
    for s in steps:
        s.pop("window")  # the report keeps the full window of the last step only, at the top level
    return {"kind": "ramp", "scenario": {**session.scenario(), **asdict(plan)}, "slo": asdict(slo),
            "max_participants_held": held, "steps": steps, "summary": steps[-1]["summary"] if steps else {},
            "window": last_window, "server": session.server_section()}
