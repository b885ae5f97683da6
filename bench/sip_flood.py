"""SIP attacks against a live production-mode server while two real WebRTC participants talk; JSON figures.

Starts ``.venv/bin/mediaserver serve`` in production mode (join tokens; SIP
digest users; ``127.0.0.16/28`` a trusted trunk network) with the SIP bridge
on, joins two real WebRTC bots (light media path) in room ``call``, and then,
one window after the other:

- ``baseline``: nothing;
- ``invite_flood_anonymous``: 400 INVITEs into room ``call`` from 8
  untrusted loopback addresses without credentials (all 401 or 503);
- ``invite_flood_trusted``: 400 INVITEs into room ``call`` from 8 trusted
  addresses (a runaway trunk), answered ones acknowledged so they join the
  room (paced), then hung up after 5 s: per-source rate, per-room phone cap;
- ``tcp_lockout``: 300 idle SIP/TCP connections from 30 addresses, then one
  new caller's OPTIONS over TCP.

Each attack runs in a niced subprocess (``python -m loadtest.sip_attacks``)
so the attacker does not share the bots' event loop.  For each window:
the call's largest audio gap and frames lost (both directions, as in
``bench/signaling_flood.py``), the server's CPU, and what the attacker saw.

    .venv/bin/python bench/sip_flood.py [--seconds 6]
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

from bench.load import BIN, ROOT, free_port, stop_server, wait_healthy  # noqa: E402
from bench.signaling_flood import call_figures, cpu_seconds, urllib_get  # noqa: E402
from loadtest.bot import Bot  # noqa: E402
from loadtest.lightmedia import encode_opus  # noqa: E402
from mediaserver.auth import create_token  # noqa: E402

SECRET = "bench-sip-flood-secret-0123456789abcdef"
UNTRUSTED = ",".join(f"127.0.0.{n}" for n in range(40, 48))
TRUSTED = ",".join(f"127.0.0.{n}" for n in range(16, 24))
TCP_SOURCES = ",".join(f"127.0.1.{n}" for n in range(1, 31))


async def attack(sip_port: int, *args: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        "nice", "-n", "19", str(BIN / "python"), "-m", "loadtest.sip_attacks", *args, "--port", str(sip_port),
        cwd=ROOT, stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    return json.loads(out) if out else {"error": f"attacker exited {proc.returncode}"}


async def window(name: str, pid: int, a: Bot, b: Bot, run_attack: Any, seconds: float) -> dict[str, Any]:
    await asyncio.sleep(0.5)
    t0, c0 = time.monotonic(), cpu_seconds(pid)
    attacker = await run_attack()
    rest = seconds - (time.monotonic() - t0)
    if rest > 0:
        await asyncio.sleep(rest)
    await asyncio.sleep(0.5)
    t1, c1 = time.monotonic(), cpu_seconds(pid)
    out = {"window": name, "seconds": round(t1 - t0, 2), **call_figures(a, b, t0, t1 - 0.3),
           "server_cpu_percent": round((c1 - c0) / (t1 - t0) * 100.0, 1)}
    if attacker is not None:
        out["attacker"] = attacker
    return out


async def run(url: str, sip_port: int, pid: int, seconds: float) -> list[dict[str, Any]]:
    rng = np.random.default_rng(1)
    audio = (rng.standard_normal(48_000 * 4) * 0.1).astype(np.float32)
    packets = encode_opus(audio)
    bots = [Bot(url, "call", name, audio, light=True, opus_packets=packets,
                token=create_token(SECRET, room="call", identity=name, ttl_s=3600)) for name in ("a", "b")]
    a, b = bots
    for bot in bots:
        await bot.join(timeout=30.0)
    results = []
    try:
        await asyncio.sleep(3.0)

        async def nothing() -> None:
            return None

        results.append(await window("baseline", pid, a, b, nothing, seconds))
        results.append(await window("invite_flood_anonymous", pid, a, b, lambda: attack(
            sip_port, "invite-flood", "--user", "room-call", "--count", "400", "--sources", UNTRUSTED), seconds))
        results.append(await window("invite_flood_trusted", pid, a, b, lambda: attack(
            sip_port, "invite-flood", "--user", "room-call", "--count", "400", "--sources", TRUSTED, "--ack", "--hangup", "--listen", "5"), seconds))
        results.append(await window("tcp_lockout", pid, a, b, lambda: attack(
            sip_port, "tcp-lockout", "--count", "300", "--sources", TCP_SOURCES), seconds))
        health = json.loads(urllib_get(url + "/healthz"))
        results.append({"window": "after", "participants": health.get("participants"),
                        "errors_a": len(a.errors), "errors_b": len(b.errors)})
    finally:
        for bot in bots:
            await bot.leave()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each window")
    args = parser.parse_args()
    port, sip_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MEDIASERVER_AUTH_SECRET": SECRET, "MEDIASERVER_SIP_USERS": "alice:wonderland:call",
           "MEDIASERVER_SIP_TRUSTED": "127.0.0.16/28"}
    env.pop("MEDIASERVER_DEV", None)
    server = subprocess.Popen([str(BIN / "mediaserver"), "serve", "--host", "127.0.0.1", "--port", str(port),
                               "--sip-port", str(sip_port), "--log-level", "WARNING"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url, server)
        results = asyncio.run(run(url, sip_port, server.pid, args.seconds))
    finally:
        stop_server(server)
    print(json.dumps({"bench": "sip_flood", "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
