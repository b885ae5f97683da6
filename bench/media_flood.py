"""Hostile datagrams at a live call's media ports: audio gaps, frames lost and server CPU, as JSON.

Starts a fresh ``mediaserver serve --dev`` (``bench.load.served``, the server's default stages),
joins two real WebRTC bots (``loadtest.bot.Bot``, light media path): a talker sending
continuous noise (any silence is a gap) and a listener.  Then, one after the other, with a
quiet phase in between:

- ``baseline``: nothing, for the same time (the figures a busy machine gives anyway);
- ``fuzz``: the datagrams of ``tests/test_hostile_media.py`` (random and mutated
  STUN/DTLS/RTP/RTCP, 0-2100 bytes) from a stranger's socket at both participants'
  server-side media ports, about 10 k/s, plus the 1600-byte 0x80 datagram of issue 17 from
  the talker's own ICE socket and a few hundred fuzz datagrams from it, under its rate limit;
- ``flood-5k`` / ``flood-20k`` / ``flood-40k``: 160-byte RTP-looking datagrams from one
  source at the talker's server-side media port, at that rate for ``--seconds``.

Senders run in a child process (their own core where there is one), so the bots' event loop
is not what limits the rate.  Per phase, measured at the listener over the phase and 1 s
after it: the longest wait between two RTP packets of the talker's stream, holes in its RTP
timeline, the longest silence in the decoded audio, frames lost (and, to tell the bench's own
stalls from the server's, the talker's longest wait between two sends); at the server: the talker's
concealed chunks and lost packets (from ``/api/rooms``), the drop counters (``/metrics``) and
the server process's CPU (``/proc``, percent of one core).

    .venv/bin/python bench/media_flood.py [--seconds 2] [--rates 5000,20000,40000] [--stages SPEC] [--no-fuzz]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load import served  # noqa: E402
from loadtest.bot import Bot  # noqa: E402
from loadtest.streams import measure_stream, window_audio  # noqa: E402
from tests.audio_checks import longest_silence_ms  # noqa: E402
from tests.test_hostile_media import PACKET_TOO_LONG, client_socket, hostile_datagrams, publisher_ssrc  # noqa: E402

ROOM = "flood"
SETTLE_S = 2.0
TICKS = os.sysconf("SC_CLK_TCK")


# -- the sender child process -------------------------------------------------------------
def send_worker(mode: str, targets: list[tuple[str, int]], pps: float, seconds: float, ssrc: int) -> None:
    """Send at ``pps`` for ``seconds`` from one socket, round-robin over ``targets``; print what was sent."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    rng = random.Random(17)
    if mode == "fuzz":
        corpus = list(hostile_datagrams(rng, int(pps * seconds), ssrc))
    else:
        corpus = [bytes([0x80, 111]) + rng.randbytes(158) for _ in range(1024)]
    sent = errors = 0
    print("ready", flush=True)
    sys.stdin.readline()  # the parent starts its clocks, then says go
    t0 = time.monotonic()
    end = t0 + seconds
    while (now := time.monotonic()) < end:
        due = min(int((now - t0) * pps) + 1, len(corpus) if mode == "fuzz" else 1 << 62)
        while sent < due:
            try:
                sock.sendto(corpus[sent % len(corpus)], targets[sent % len(targets)])
            except OSError:  # ENOBUFS and the like: the datagram is lost, as on a real network
                errors += 1
            sent += 1
        if mode == "fuzz" and sent >= len(corpus):
            break
        time.sleep(0.0005)
    print(json.dumps({"sent": sent, "send_errors": errors, "seconds": round(time.monotonic() - t0, 3)}))


def spawn_sender(mode: str, targets: list[tuple[str, int]], pps: float, seconds: float,
                 ssrc: int) -> subprocess.Popen[str]:
    spec = ",".join(f"{h}:{p}" for h, p in targets)
    return subprocess.Popen([sys.executable, __file__, "--send", mode, "--targets", spec, "--pps", str(pps),
                             "--seconds", str(seconds), "--ssrc", str(ssrc)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


# -- server figures ------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def talker_stats(url: str, talker: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/api/rooms/{ROOM}", timeout=5) as r:
        room = json.load(r)
    return next((s for s in room.get("stats", []) if s.get("participant") == talker), {})


def drop_counters(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^mediaserver_media_packets_dropped_total\{[^}]*reason="([^"]+)"[^}]*\} ([0-9.e+]+)', text, re.M)}


def server_addresses(bot: Bot) -> list[tuple[str, int]]:
    """The server's IPv4 ICE candidates in its answer to ``bot`` (where its media ports are)."""
    sdp = bot.pc.remoteDescription.sdp
    found = re.findall(r"a=candidate:\S+ \d+ udp \d+ (\d+\.\d+\.\d+\.\d+) (\d+) typ host", sdp)
    return sorted({(h, int(p)) for h, p in found})


# -- one phase -----------------------------------------------------------------------------
async def run_phase(name: str, url: str, pid: int, talker: Bot, listener: Bot, seconds: float,
                    sender: tuple[str, list[tuple[str, int]], float] | None) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    stats0, drops0 = talker_stats(url, talker.id or ""), await loop.run_in_executor(None, drop_counters, url)
    sent: dict[str, Any] = {}
    proc = None
    if sender is not None:
        mode, targets, pps = sender
        proc = spawn_sender(mode, targets, pps, seconds, publisher_ssrc(talker))
        assert proc.stdin is not None and proc.stdout is not None
        await loop.run_in_executor(None, proc.stdout.readline)  # "ready": the corpus is built
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    if proc is not None and sender is not None:
        proc.stdin.write("go\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        if sender[0] == "fuzz":  # the datagram, and fuzz, from the talker's own (known) socket
            own, server_addr = client_socket(talker)
            own.sendto(PACKET_TOO_LONG, server_addr)
            for i, data in enumerate(hostile_datagrams(random.Random(5), 400, publisher_ssrc(talker))):
                own.sendto(data, server_addr)
                if i % 20 == 19:
                    await asyncio.sleep(0.1)  # ~200/s: under the per-source limit, so it reaches DTLS/SRTP
        while proc.poll() is None:
            await asyncio.sleep(0.05)
        sent = json.loads(proc.stdout.read() if proc.stdout else "{}")
    else:
        await asyncio.sleep(seconds)
    t1 = time.monotonic()
    cpu1 = cpu_seconds(pid)
    await asyncio.sleep(1.0)  # what the attack delayed arrives (or not) after it
    until = time.monotonic()
    stats1, drops1 = talker_stats(url, talker.id or ""), await loop.run_in_executor(None, drop_counters, url)
    rec = next(r.snapshot() for r in listener.recordings.values()
               if (r.participant or listener.track_info.get(r.mid, {}).get("participant")) == talker.id)
    fig = measure_stream(rec, listener.id or "", talker.id or "", ROOM, t0, until, [], None)
    silence = longest_silence_ms(window_audio(rec, t0, until))
    gap = max(fig.longest_gap_ms, fig.max_interarrival_ms - 20.0, silence)
    sends = [t for t, _ in (talker.track.wire_log if talker.track is not None else []) if t0 <= t < until]
    send_gap = float(np.max(np.diff(sends))) * 1000.0 if len(sends) > 1 else 0.0
    return {
        "phase": name, "seconds": round(t1 - t0, 2), **sent,
        "largest_audio_gap_ms": round(gap, 1),
        "max_interarrival_ms": round(fig.max_interarrival_ms, 1), "timeline_longest_gap_ms": round(fig.longest_gap_ms, 1),
        "longest_silence_ms": round(silence, 1), "frames_expected": fig.frames_expected, "frames_lost": fig.dropped,
        "server_concealed_ms": 10 * (stats1.get("concealed_chunks", 0) - stats0.get("concealed_chunks", 0)),
        "server_lost_packets": stats1.get("lost", 0) - stats0.get("lost", 0),
        "server_cpu_percent": round(100.0 * (cpu1 - cpu0) / max(1e-6, t1 - t0), 1),
        # the bench's own stalls (the bots share one event loop): the talker's longest wait between sends
        "talker_send_gap_ms": round(send_gap, 1),
        "dropped": {k: int(v - drops0.get(k, 0.0)) for k, v in drops1.items() if v - drops0.get(k, 0.0) > 0},
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(3)
    noise = (rng.standard_normal(48_000 * 4) * 0.1).astype(np.float32)  # continuous: silence is a gap
    with served(args.stages) as (url, server):
        talker = Bot(url, ROOM, "talker", noise, light=True)
        listener = Bot(url, ROOM, "listener", None, light=True)
        await talker.join()
        await listener.join()
        try:
            deadline = time.monotonic() + 20
            while not any(len(r.rtp_arrivals) > 50 for r in listener.recordings.values()):
                if time.monotonic() > deadline:
                    raise RuntimeError("the listener never received the talker")
                await asyncio.sleep(0.1)
            await asyncio.sleep(SETTLE_S)
            talker_port = [client_socket(talker)[1]]
            everyone = sorted(set(server_addresses(talker) + server_addresses(listener)
                                  + talker_port + [client_socket(listener)[1]]))
            phases: list[tuple[str, Any]] = [("baseline", None)]
            if not args.no_fuzz:
                phases.append(("fuzz", ("fuzz", everyone, 10_000.0)))
            phases += [(f"flood-{int(r) // 1000}k", ("flood", talker_port, float(r))) for r in args.rates]
            results = []
            for name, sender in phases:
                results.append(await run_phase(name, url, server.pid, talker, listener, args.seconds, sender))
                await asyncio.sleep(SETTLE_S)
            evicted = [e for b in (talker, listener) for e in b.events_of("participant-left") + b.events_of("bye")]
            return {"server": "mediaserver serve --dev", "stages": args.stages or "default", "phases": results,
                    "connected": [talker.pc.connectionState, listener.pc.connectionState],
                    "evicted": len(evicted), "cores": os.cpu_count()}
        finally:
            await talker.leave()
            await listener.leave()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each attack phase")
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[5000, 20000, 40000])
    parser.add_argument("--stages", default=None, help="server stages (default: the server's own)")
    parser.add_argument("--no-fuzz", action="store_true", help="floods only")
    parser.add_argument("--send", choices=("fuzz", "flood"), help=argparse.SUPPRESS)  # the sender child
    parser.add_argument("--targets", help=argparse.SUPPRESS)
    parser.add_argument("--pps", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--ssrc", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.send:
        targets = [(h, int(p)) for h, p in (t.rsplit(":", 1) for t in args.targets.split(","))]
        send_worker(args.send, targets, args.pps, args.seconds, args.ssrc)
        return 0
    print(json.dumps(asyncio.run(bench(args)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
