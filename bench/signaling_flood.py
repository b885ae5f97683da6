"""Signaling attacks against a live server while two real participants talk; the call's figures as JSON.

Starts ``.venv/bin/mediaserver serve --dev`` on a free loopback port (its
default stages), joins two real WebRTC bots (``loadtest.bot.Bot``, light
media path) in one room, and then, one after the other:

- ``baseline``: nothing, for the same time;
- ``ping_flood``: 32 WebSockets from 127.0.0.2 (the per-address cap), no
  join, ``ping`` as fast as they can, reconnecting whenever the server
  closes them (``loadtest.attacks.ping_flood``, in a subprocess of its own
  so the attacker does not share the bots' event loop; niced, as an attacker's
  CPU is not the server's on a real network);
- ``stage_join``: one ``join`` whose ``stages`` lists 8000 items (56 KB),
  ``loadtest.attacks.stage_join``.

For each window it prints the legitimate call's largest audio gap (the
longer of the largest hole in the RTP timeline and the longest wait between
two packets, both directions), frames lost (expected minus received,
``loadtest.streams``), the server's CPU (user + system over the window,
percent of one core, from ``/proc``), the bots' own CPU, the server's view
(media clock ticks skipped, packets its jitter buffers counted lost or
late) and what the attacker saw.

    .venv/bin/python bench/signaling_flood.py [--seconds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load import BIN, ROOT, served  # noqa: E402
from loadtest.attacks import stage_join  # noqa: E402
from loadtest.bot import Bot  # noqa: E402
from loadtest.lightmedia import encode_opus  # noqa: E402
from loadtest.streams import measure_stream  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def call_figures(a: Bot, b: Bot, since: float, until: float) -> dict[str, Any]:
    """Largest gap and frames lost of the a<->b call over [since, until), both directions."""
    gap = timeline = wire = 0.0
    expected = dropped = 0
    for sub, pub in ((a, b), (b, a)):
        assert pub.id is not None and sub.id is not None
        for rec in sub.recordings.values():
            if (rec.participant or sub.track_info.get(rec.mid, {}).get("participant")) != pub.id:
                continue
            fig = measure_stream(rec, sub.id, pub.id, "call", since, until, [], None)
            timeline = max(timeline, fig.longest_gap_ms)
            wire = max(wire, fig.max_interarrival_ms)
            expected += fig.frames_expected
            dropped += fig.dropped
    gap = max(timeline, wire)
    return {"largest_gap_ms": round(gap, 1), "timeline_gap_ms": round(timeline, 1),
            "max_interarrival_ms": round(wire, 1), "frames_expected": expected, "frames_lost": dropped}


def server_side(url: str) -> dict[str, float]:
    """The server's own view: media clock ticks skipped, and what its jitter buffers counted lost/late."""
    health = json.loads(urllib_get(url + "/healthz"))
    room = json.loads(urllib_get(url + "/api/rooms/call"))
    return {"skipped_ticks": health["clock"]["skipped_ticks"],
            "inbound_lost": sum(s.get("lost", 0) for s in room["stats"]),
            "inbound_late": sum(s.get("late", 0) for s in room["stats"])}


async def window(name: str, url: str, pid: int, a: Bot, b: Bot, attack: Any, seconds: float) -> dict[str, Any]:
    await asyncio.sleep(0.5)
    s0 = server_side(url)
    t0, c0, m0 = time.monotonic(), cpu_seconds(pid), time.process_time()
    attacker = await attack()
    rest = seconds - (time.monotonic() - t0)
    if rest > 0:
        await asyncio.sleep(rest)
    await asyncio.sleep(0.5)  # packets of the window's end arrive
    t1, c1, m1 = time.monotonic(), cpu_seconds(pid), time.process_time()
    s1 = server_side(url)
    out = {"window": name, "seconds": round(t1 - t0, 2), **call_figures(a, b, t0, t1 - 0.3),
           "server_cpu_percent": round((c1 - c0) / (t1 - t0) * 100.0, 1),
           "bots_cpu_percent": round((m1 - m0) / (t1 - t0) * 100.0, 1),
           "server_view": {k: s1[k] - s0[k] for k in s0}}
    if attacker is not None:
        out["attacker"] = attacker
    return out


async def flood_subprocess(url: str, seconds: float) -> dict[str, Any]:
    # niced: on a real network the attacker's CPU is not the server's (here they share two cores)
    proc = await asyncio.create_subprocess_exec(
        "nice", "-n", "19", str(BIN / "python"), "-m", "loadtest.attacks", "ping-flood", "--url", url, "--sockets", "32",
        "--seconds", str(seconds), "--local-addr", "127.0.0.2", cwd=ROOT, stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    return json.loads(out) if out else {"error": f"attacker exited {proc.returncode}"}


async def run(url: str, pid: int, seconds: float) -> list[dict[str, Any]]:
    rng = np.random.default_rng(1)
    audio = (rng.standard_normal(48_000 * 4) * 0.1).astype(np.float32)
    packets = encode_opus(audio)
    a = Bot(url, "call", "a", audio, light=True, opus_packets=packets)
    b = Bot(url, "call", "b", audio, light=True, opus_packets=packets)
    await a.join(timeout=30.0)
    await b.join(timeout=30.0)
    results = []
    try:
        await asyncio.sleep(3.0)  # renegotiation and the first packets

        async def nothing() -> None:
            return None

        results.append(await window("baseline", url, pid, a, b, nothing, seconds))
        results.append(await window("ping_flood", url, pid, a, b, lambda: flood_subprocess(url, seconds), seconds))
        results.append(await window("stage_join", url, pid, a, b, lambda: stage_join(url, items=8000), seconds))
        participants = json.loads(urllib_get(url + "/healthz"))["participants"]
        results.append({"window": "after", "participants": participants, "errors_a": len(a.errors),
                        "errors_b": len(b.errors)})
    finally:
        await a.leave()
        await b.leave()
    return results


def urllib_get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return str(r.read().decode())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each window")
    parser.add_argument("--stages", help="server default stages (default: the server's own)")
    args = parser.parse_args()
    with served(args.stages) as (url, proc):
        results = asyncio.run(run(url, proc.pid, args.seconds))
    print(json.dumps({"bench": "signaling_flood", "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
