"""Standard load scenario on this machine: a fresh server, real WebRTC bots, headline figures as JSON.

Starts ``.venv/bin/mediaserver serve --dev`` on a free loopback port with its
default stages, runs ``.venv/bin/loadtest run`` against it (6 bots in 2
rooms for 20 s of measurement; ``--quick``: 3 bots, 1 room, 8 s), stops the
server and prints the headline figures plus two ratios measured in the same
run: the server's share of the publisher-to-subscriber latency, and received
over sent DNSMOS OVRL.  The full report (JSON + HTML) is written to ``--out``.

    .venv/bin/python bench/load.py [--quick] [--out DIR] [--stages SPEC]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 180.0, *, ready: bool = True) -> None:
    """Until /healthz answers and (``ready``) says everything loaded once is loaded (TTS, quality model):
    a measurement started earlier would count those loads as the workload's CPU and memory."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mediaserver exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                health = json.load(r)
                if r.status == 200 and (not ready or all((health.get("ready") or {}).values())):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("mediaserver did not become healthy")


def stop_server(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    """SIGINT (the server drains), then SIGKILL if it has not exited within ``timeout_s``."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def served(stages: str | None,
           output: IO[bytes] | int = subprocess.DEVNULL) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A fresh ``mediaserver serve --dev`` on a free port, healthy; stopped with SIGINT (drain) at exit."""
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [str(BIN / "mediaserver"), "serve", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--dev",
           "--log-level", "WARNING"]
    if stages is not None:
        cmd += ["--stages", stages]
    server = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT if output != subprocess.DEVNULL
                              else subprocess.DEVNULL, cwd=ROOT)
    try:
        wait_healthy(url, server)
        yield url, server
    finally:
        stop_server(server)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 bots, 1 room, 8 s")
    parser.add_argument("--out", type=Path, help="report folder (default: a new temporary folder)")
    parser.add_argument("--stages", help="server default stages (default: the server's own default)")
    args = parser.parse_args()
    bots, rooms, duration = (3, 1, 8.0) if args.quick else (6, 2, 20.0)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-load-"))
    started = time.monotonic()
    with served(args.stages) as (url, _):
        run = subprocess.run([str(BIN / "loadtest"), "run", "--url", url, "--bots", str(bots), "--rooms", str(rooms),
                              "--duration", str(duration), "--out", str(out)],
                             stdout=subprocess.PIPE, cwd=ROOT, check=False)
    if run.returncode != 0:
        print(run.stdout.decode(), file=sys.stderr)
        return run.returncode
    headline = json.loads(run.stdout)
    report = json.loads((out / "report.json").read_text())
    s = report["summary"]
    server_p50 = s["server_e2e_latency_ms"]["p50"] or s["server_latency_ms"]["p50"]
    ratios = {
        "server_share_of_latency": round(server_p50 / headline["latency_ms_p50"], 3)
        if server_p50 and headline["latency_ms_p50"] else None,
        "dnsmos_received_over_sent": round(headline["dnsmos_ovrl"] / headline["sent_dnsmos_ovrl"], 3)
        if headline["dnsmos_ovrl"] and headline["sent_dnsmos_ovrl"] else None,
    }
    print(json.dumps({"bench": "load", "scenario": {"bots": bots, "rooms": rooms, "duration_s": duration,
                                                    "server_stages": args.stages or "server default",
                                                    "cpus": os.cpu_count()},
                      "headline": headline, "ratios": ratios,
                      "wall_s": round(time.monotonic() - started, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
