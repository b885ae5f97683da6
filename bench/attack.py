"""The attack suite: every attack class of issue 17 against a live server while two real participants talk.

Starts ``mediaserver serve`` on free loopback ports, in production mode
(join tokens, SIP digest users, no dev grants) with the SIP bridge on and
the server's default stages, joins two real WebRTC bots with tokens in room
``call`` (light media path, continuous noise so that any silence is a gap),
and runs one attack per window, one after the other:

- media ports: the 1600-byte 0x80 datagram and fuzzed RTP/RTCP/STUN/DTLS
  datagrams (``tests/test_hostile_media.py``'s corpus) at both participants'
  server-side ports, a UDP flood from one source (``bench/media_flood.py``'s
  sender, 20 k packets/s);
- signaling: a pre-auth ping flood (32 sockets from one address), a join
  listing 8000 stages, stages of the wrong type over the WebSocket and HTTP,
  deeply nested JSON, slowloris, a connection flood from many addresses,
  one token joined many times, a join that never offers (``loadtest/attacks.py``);
- SIP: an anonymous caller trying to listen to the room, an INVITE flood,
  idle TCP connections against a newcomer (``loadtest/sip_attacks.py``);
- faults: the executor worker stopped for 5 s (SIGSTOP) and then continued;
- memory: long prompts (5000 characters each) spoken into the room.

Per attack it reports the legitimate call's largest audio gap and frames
lost (both directions; ``bench/signaling_flood.py``'s ``call_figures``),
the growth of the server process's RSS and open file descriptors (from
/proc; the whole tree's RSS beside it), whether a legitimate participant was evicted, the server
CPU, what the attacker saw, and a verdict against issue 17's acceptance:
gap <= 100 ms, no eviction, RSS growth <= 50 MiB. At the end: the server's
state after everything (participants, file descriptors, stages disabled).

    .venv/bin/python bench/attack.py [--quick] [--only NAME,...] [--seconds 4]

``tests/test_attacks.py`` runs the ``--quick`` counts and asserts what does
not depend on the machine's speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load import BIN, ROOT, free_port, stop_server, wait_healthy  # noqa: E402
from bench.media_flood import server_addresses, spawn_sender  # noqa: E402
from bench.signaling_flood import call_figures, flood_subprocess  # noqa: E402
from enhancers.process_name import EXECUTOR_WORKER  # noqa: E402
from loadtest import attacks, sip_attacks  # noqa: E402
from loadtest.bot import Bot  # noqa: E402
from loadtest.lightmedia import encode_opus  # noqa: E402
from mediaserver.auth import create_token  # noqa: E402
from tests.test_hostile_media import PACKET_TOO_LONG, client_socket, publisher_ssrc  # noqa: E402

SECRET = "bench-attack-secret-0123456789abcdef0123"
ROOM = "call"
SIP_USER = ("alice", "wonderland")
GAP_LIMIT_MS = 100.0
RSS_LIMIT_MIB = 50.0
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


# -- the server's process tree ------------------------------------------------------------------
def process_tree(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += [p for p, pp in parents.items() if pp == pid]
    return out


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def tree_usage(root: int, tree: bool = True) -> dict[str, float]:
    """RSS (MiB), open file descriptors and CPU seconds of ``root`` and (``tree``) its descendants."""
    rss = cpu = 0.0
    fds = 0
    for pid in process_tree(root) if tree else [root]:
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss += int(f.read().split()[1]) * PAGE / 2**20
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / TICKS
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return {"rss_mib": rss, "fds": fds, "cpu_s": cpu}


def children_rss(root: int) -> dict[str, float]:
    """RSS (MiB) of the server's child processes by name (``ms-executor``, ``ms-synth``, ...)."""
    out: dict[str, float] = {}
    for pid in process_tree(root):
        if pid == root:
            continue
        name = process_name(pid) or str(pid)
        out[name] = round(out.get(name, 0.0) + tree_usage(pid, tree=False)["rss_mib"], 1)
    return out


def get_json(url: str, token: str | None = None) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


@contextmanager
def production_server(stages: str | None = None) -> Iterator[tuple[str, int, subprocess.Popen[bytes]]]:
    """``mediaserver serve`` without --dev: tokens, SIP digest users; (url, sip port, process)."""
    port, sip_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MEDIASERVER_AUTH_SECRET": SECRET,
           "MEDIASERVER_SIP_USERS": f"{SIP_USER[0]}:{SIP_USER[1]}:{ROOM}"}
    env.pop("MEDIASERVER_DEV", None)
    cmd = [str(BIN / "mediaserver"), "serve", "--host", "127.0.0.1", "--port", str(port), "--sip-port",
           str(sip_port), "--log-level", "WARNING"]
    if stages is not None:
        cmd += ["--stages", stages]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url, proc)
        yield url, sip_port, proc
    finally:
        stop_server(proc)


# -- the suite ----------------------------------------------------------------------------------------
@dataclass
class Suite:
    """The live server, the legitimate call and the figures of every attack window."""

    url: str
    sip_port: int
    pid: int
    quick: bool
    seconds: float
    a: Bot | None = None
    b: Bot | None = None
    results: list[dict[str, Any]] = field(default_factory=list)
    loop_lag_s: float = 0.0  # the longest this process's event loop (the bots') was late since the window began
    _beat: asyncio.Task[None] | None = None

    async def _heartbeat(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            self.loop_lag_s = max(self.loop_lag_s, now - last - 0.005)
            last = now

    def token(self, identity: str, room: str = ROOM, admin: bool = False) -> str:
        perms = ("publish", "subscribe", "admin") if admin else ("publish", "subscribe")
        return create_token(SECRET, room=room, identity=identity, permissions=perms, ttl_s=3600)

    async def start_call(self) -> None:
        rng = np.random.default_rng(1)
        audio = (rng.standard_normal(48_000 * 4) * 0.1).astype(np.float32)
        packets = encode_opus(audio)
        self.a, self.b = (Bot(self.url, ROOM, name, audio, light=True, opus_packets=packets,
                              token=self.token(f"legit-{name}")) for name in ("a", "b"))
        await self.a.join(timeout=30.0)
        await self.b.join(timeout=30.0)
        deadline = time.monotonic() + 30.0
        while not all(any(len(r.rtp_arrivals) > 50 for r in bot.recordings.values()) for bot in (self.a, self.b)):
            if time.monotonic() > deadline:
                raise RuntimeError("the legitimate call never started")
            await asyncio.sleep(0.2)
        await asyncio.sleep(2.0)
        self._beat = asyncio.ensure_future(self._heartbeat())

    async def stop_call(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
        for bot in (self.a, self.b):
            if bot is not None:
                await bot.leave()

    def evictions(self) -> int:
        assert self.a is not None and self.b is not None
        legit = {self.a.id, self.b.id}
        return sum(1 for bot in (self.a, self.b) for e in bot.events_of("bye") + bot.events_of("participant-left")
                   if e["type"] == "bye" or (e.get("participant") or {}).get("id") in legit)

    async def window(self, name: str, attack: Callable[[Suite], Awaitable[Any]]) -> dict[str, Any]:
        assert self.a is not None and self.b is not None
        await asyncio.sleep(0.5)
        u0, ev0, t0 = tree_usage(self.pid), self.evictions(), time.monotonic()
        own0 = tree_usage(self.pid, tree=False)
        skipped0, self.loop_lag_s = get_json(self.url + "/healthz")["clock"]["skipped_ticks"], 0.0
        try:
            attacker = await attack(self)
        except Exception as exc:  # the attack tool failing is a finding too, not the end of the suite
            attacker = {"attack_error": repr(exc)}
        if (rest := self.seconds - (time.monotonic() - t0)) > 0:
            await asyncio.sleep(rest)
        await asyncio.sleep(0.5)  # what the attack delayed arrives (or not) after it
        t1, u1, own1 = time.monotonic(), tree_usage(self.pid), tree_usage(self.pid, tree=False)
        # who was late: the server's media clock (ticks it skipped) or this process, where the bots receive
        late = {"server_skipped_ticks": get_json(self.url + "/healthz")["clock"]["skipped_ticks"] - skipped0,
                "bench_loop_lag_ms": round(self.loop_lag_s * 1000.0, 1)}
        call = call_figures(self.a, self.b, t0, t1 - 0.3)
        out = {"attack": name, "seconds": round(t1 - t0, 2), **call, **late,
               "evicted": self.evictions() - ev0,
               # the server process itself; the tree's figures also move when an executor worker is
               # replaced (a recovery that reloads the models), which is no growth an attack caused
               "rss_growth_mib": round(own1["rss_mib"] - own0["rss_mib"], 1), "fd_growth": own1["fds"] - own0["fds"],
               "tree_rss_growth_mib": round(u1["rss_mib"] - u0["rss_mib"], 1),
               "server_cpu_percent": round(100.0 * (u1["cpu_s"] - u0["cpu_s"]) / (t1 - t0), 1),
               # the named children at the window's end (ms-synth: the prompts' synthesis process)
               "children_rss_mib": children_rss(self.pid),
               "attacker": attacker}
        out["ok"] = {"gap": call["largest_gap_ms"] <= GAP_LIMIT_MS, "no_eviction": out["evicted"] == 0,
                     "rss": out["rss_growth_mib"] <= RSS_LIMIT_MIB}
        self.results.append(out)
        print(f"[attack] {name}: gap {call['largest_gap_ms']} ms, lost {call['frames_lost']}, "
              f"rss {out['rss_growth_mib']:+} MiB, fds {out['fd_growth']:+}, evicted {out['evicted']}, "
              f"server skipped {late['server_skipped_ticks']} ticks, bench loop late {late['bench_loop_lag_ms']} ms",
              file=sys.stderr, flush=True)
        for bot in (self.a, self.b):
            bot.trim(time.monotonic() - 5.0)
        return out


# -- the attacks (each returns what the attacker saw) ---------------------------------------------------------
async def nothing(s: Suite) -> None:
    return None


async def malformed_datagram(s: Suite) -> dict[str, Any]:
    assert s.a is not None
    own, server_addr = client_socket(s.a)
    own.sendto(PACKET_TOO_LONG, server_addr)  # from the participant's own, known address
    stranger = __import__("socket").socket(2, 2)  # AF_INET, SOCK_DGRAM
    for host, port in server_addresses(s.a):
        stranger.sendto(PACKET_TOO_LONG, (host, port))
    stranger.close()
    return {"sent": 1 + len(server_addresses(s.a))}


async def _sender(mode: str, targets: list[tuple[str, int]], pps: float, seconds: float, ssrc: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    proc = spawn_sender(mode, targets, pps, seconds, ssrc)
    assert proc.stdin is not None and proc.stdout is not None
    await loop.run_in_executor(None, proc.stdout.readline)  # "ready"
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out = await loop.run_in_executor(None, proc.stdout.read)
    proc.wait()
    return json.loads(out or "{}")


async def fuzz_datagrams(s: Suite) -> dict[str, Any]:
    assert s.a is not None and s.b is not None
    targets = sorted(set(server_addresses(s.a) + server_addresses(s.b)))
    count = 2_000 if s.quick else 12_000
    return await _sender("fuzz", targets, 10_000.0, count / 10_000.0, publisher_ssrc(s.a))


async def udp_flood(s: Suite) -> dict[str, Any]:
    assert s.a is not None
    _, server_addr = client_socket(s.a)
    return await _sender("flood", [server_addr], 20_000.0, 0.5 if s.quick else 2.0, publisher_ssrc(s.a))


async def ping_flood(s: Suite) -> dict[str, Any]:
    return await flood_subprocess(s.url, 1.5 if s.quick else s.seconds)


async def niced(*argv: str) -> dict[str, Any]:
    """``python -m argv...`` (an attack tool printing JSON) in a process of its own at nice 19: on a real
    network the attacker's CPU is not the server's, nor the legitimate participants' (here all share two
    cores, and an attack run in this process would delay the bots' receiving, which the call's figures
    would count against the server)."""
    proc = await asyncio.create_subprocess_exec("nice", "-n", "19", str(BIN / "python"), "-m", *argv, cwd=ROOT,
                                                stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    return json.loads(out) if out else {"error": f"attacker exited {proc.returncode}"}


async def niced_attack(name: str, url: str, **kwargs: Any) -> dict[str, Any]:
    """``loadtest.attacks`` ``name`` with ``kwargs``, niced in a process of its own."""
    return await niced("loadtest.attacks", name, "--url", url, "--kwargs", json.dumps(kwargs))


async def stage_join(s: Suite) -> dict[str, Any]:
    return await niced_attack("stage-join", s.url, items=8000, room=ROOM, token=s.token("mallory-stages"))


async def bad_stage_types(s: Suite) -> dict[str, Any]:
    ws = await attacks.stage_join(s.url, items=1, room=ROOM, token=s.token("mallory-types"), stages=["vad", 1])
    async with aiohttp.ClientSession() as http, http.put(
            f"{s.url}/api/rooms/{ROOM}/stages", json={"stages": ["vad", 1]},
            headers={"Authorization": f"Bearer {s.token('admin', admin=True)}"}) as r:
        return {"websocket": ws["reply"], "http_status": r.status, "http_error": (await r.json()).get("error")}


async def nested_json(s: Suite) -> dict[str, Any]:
    return await attacks.nested_json(s.url, depth=20_000, path=f"/api/rooms/{ROOM}/stages",  # 40 KB: under the limit
                                     token=s.token("admin", admin=True))


async def slowloris(s: Suite) -> dict[str, Any]:
    return await niced_attack("slowloris", s.url, connections=20 if s.quick else 200, seconds=8.0,
                              local_addr="127.0.0.3")


async def connection_flood(s: Suite) -> dict[str, Any]:
    addresses = [f"127.0.2.{n}" for n in range(1, 6 if s.quick else 61)]
    return await niced_attack("connection-flood", s.url, addresses=addresses, per_address=34, hold_s=1.0)


async def same_identity(s: Suite) -> dict[str, Any]:
    return await niced_attack("same-identity", s.url, token=s.token("mallory-twin", room="twins"), room="twins",
                              joins=6 if s.quick else 30, local_addr="127.0.0.4")  # under the 32 per address


async def sip_anonymous_listen(s: Suite) -> dict[str, Any]:
    probe = await sip_attacks.SipProbe(("127.0.0.1", s.sip_port), "127.0.0.50").open()
    try:
        statuses = await probe.invite(f"room-{ROOM}")
        await asyncio.sleep(2.0)  # the room is talking: would any of it reach the anonymous caller?
        return {"statuses": statuses, "rtp_received": probe.rtp_received()}
    finally:
        probe.close()


async def sip_invite_flood(s: Suite) -> dict[str, Any]:
    sources = ",".join(f"127.0.0.{n}" for n in range(60, 68))
    return await niced("loadtest.sip_attacks", "invite-flood", "--port", str(s.sip_port), "--user", f"room-{ROOM}",
                       "--count", "100" if s.quick else "400", "--sources", sources)


async def sip_tcp_lockout(s: Suite) -> dict[str, Any]:
    sources = ",".join(f"127.0.1.{n}" for n in range(1, 31))
    return await niced("loadtest.sip_attacks", "tcp-lockout", "--port", str(s.sip_port),
                       "--count", "60" if s.quick else "300", "--sources", sources)


async def worker_stop(s: Suite) -> dict[str, Any]:
    # by name: the server has other children (the synthesis process ms-synth, multiprocessing's resource tracker)
    children = [p for p in process_tree(s.pid) if p != s.pid and process_name(p) == EXECUTOR_WORKER]
    if not children:
        return {"skipped": "no executor worker process"}
    worker = children[0]
    os.kill(worker, signal.SIGSTOP)
    await asyncio.sleep(2.0 if s.quick else 5.0)
    try:
        os.kill(worker, signal.SIGCONT)
        replaced = False
    except ProcessLookupError:  # the server found it stuck, killed it and started another
        replaced = True
    deadline, stages = time.monotonic() + 30.0, {}
    while time.monotonic() < deadline:  # processing must come back without a restart
        stages = get_json(s.url + "/healthz")["executor"].get("stages", {})
        if stages and not any(v.get("disabled") for v in stages.values()):
            break
        await asyncio.sleep(0.5)
    return {"stopped_pid": worker, "replaced_while_stopped": replaced, "disabled_after": sorted(k for k, v in stages.items() if v.get("disabled")),
            "recovered_s": round(30.0 - (deadline - time.monotonic()), 1)}


async def long_prompts(s: Suite) -> dict[str, Any]:
    text = ("The quick brown fox jumps over the lazy dog near the river bank. " * 80)[:5000]
    statuses = []
    async with aiohttp.ClientSession() as http:
        for k in range(2 if s.quick else 10):
            async with http.post(f"{s.url}/api/rooms/{ROOM}/prompts",
                                 json={"text": f"{k} {text}"[:5000], "interrupt": True},
                                 headers={"Authorization": f"Bearer {s.token('admin', admin=True)}"},
                                 timeout=aiohttp.ClientTimeout(total=120)) as r:
                statuses.append(r.status)
    return {"prompts": len(statuses), "statuses": statuses}


async def join_without_offer(s: Suite) -> dict[str, Any]:
    return await attacks.join_without_offer(s.url, room=ROOM, wait_s=25.0, token=s.token("mallory-idle"))


ATTACKS: dict[str, Callable[[Suite], Awaitable[Any]]] = {
    "baseline": nothing, "udp-malformed": malformed_datagram, "udp-fuzz": fuzz_datagrams, "udp-flood-20k": udp_flood,
    "ws-ping-flood": ping_flood, "ws-stage-join": stage_join, "stage-types": bad_stage_types,
    "http-nested-json": nested_json, "http-slowloris": slowloris, "ws-connection-flood": connection_flood,
    "ws-same-identity": same_identity, "sip-anonymous-listen": sip_anonymous_listen,
    "sip-invite-flood": sip_invite_flood, "sip-tcp-lockout": sip_tcp_lockout, "prompt-memory": long_prompts,
    "worker-sigstop": worker_stop,  # last: the replaced worker's reload would count as the next attack's memory
}


async def run_suite(url: str, sip_port: int, pid: int, *, quick: bool, seconds: float,
                    only: list[str] | None = None) -> dict[str, Any]:
    suite = Suite(url, sip_port, pid, quick, seconds)
    await suite.start_call()
    start = tree_usage(pid, tree=False)
    idle = asyncio.ensure_future(join_without_offer(suite))  # runs alongside: it only waits for its timeout
    try:
        for name, attack in ATTACKS.items():
            if only is None or name in only or name == "baseline":
                await suite.window(name, attack)
        idle_result = await asyncio.wait_for(idle, 60.0)
        await asyncio.sleep(2.0)
        end = tree_usage(pid, tree=False)
        health = get_json(url + "/healthz")
        after = {"participants": health.get("participants"), "evicted": suite.evictions(),
                 "rss_growth_mib": round(end["rss_mib"] - start["rss_mib"], 1), "fd_growth": end["fds"] - start["fds"],
                 "stages_disabled": sorted(k for k, v in health["executor"].get("stages", {}).items()
                                           if v.get("disabled")),
                 "join_without_offer": idle_result}
    finally:
        idle.cancel()
        await suite.stop_call()
    return {"attacks": suite.results, "after": after}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the bounded counts of tests/test_attacks.py")
    parser.add_argument("--seconds", type=float, default=4.0, help="shortest window per attack")
    parser.add_argument("--only", help="comma-separated attack names (baseline always runs): " + ",".join(ATTACKS))
    args = parser.parse_args()
    random.seed(7)
    started = time.monotonic()
    with production_server() as (url, sip_port, proc):
        report = asyncio.run(run_suite(url, sip_port, proc.pid, quick=args.quick, seconds=args.seconds,
                                       only=args.only.split(",") if args.only else None))
    failed = [r["attack"] for r in report["attacks"] if not all(r["ok"].values())]
    print(json.dumps({"bench": "attack", "mode": "production", "quick": args.quick, **report,
                      "failed_acceptance": failed, "wall_s": round(time.monotonic() - started, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
