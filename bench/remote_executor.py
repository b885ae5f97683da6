"""What the executor-service hop costs, and what batching across media processes gains.

Each tick (10 ms) every stream of a client hands one chunk to its executor and waits for it; the
time from handing in to getting back is one round trip.  Measured in the same run:

- ``local``: the executor's own worker process (isolation ``process``, shared memory) - the baseline;
- ``remote``: the same streams through an ``enhancers serve-executor`` process on loopback;
- ``remote_two_clients``: two clients (two media nodes) with the streams split between them: the
  service's batches, rows and clients per batch (batching across nodes), and the round trip.

Prints JSON:  .venv/bin/python bench/remote_executor.py [--streams 16] [--ticks 500] [--stages limiter]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from enhancers.executor import Executor, ExecutorConfig  # noqa: E402

TOKEN = "bench-token"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_port(port: int) -> None:
    for _ in range(1200):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError("the executor service did not start")


async def _run(executors: list[Executor], streams_per: list[int], stages: str, ticks: int) -> dict[str, Any]:
    for ex in executors:
        await ex.start()
        await ex.preload(stages)
    groups = [[ex.open_stream(stages) for _ in range(n)] for ex, n in zip(executors, streams_per)]
    rng = np.random.default_rng(0)
    chunk = (0.1 * rng.standard_normal(480)).astype(np.float32)
    rtt: list[float] = []
    bypassed = 0
    loop = asyncio.get_running_loop()
    next_t = loop.time()
    for k in range(ticks + 50):
        next_t += 0.010
        started = time.perf_counter()
        results = await asyncio.gather(*(s.process(chunk) for g in groups for s in g))
        if k >= 50:  # warmed up
            rtt.append((time.perf_counter() - started) * 1e3)
            bypassed += sum(1 for r in results if r.bypassed)
        await asyncio.sleep(max(0.0, next_t - loop.time()))
    worker = executors[0].stats()["worker"]
    for ex in executors:
        await ex.close()
    a = np.asarray(rtt)
    return {"round_trip_ms": {"p50": round(float(np.percentile(a, 50)), 3),
                              "p99": round(float(np.percentile(a, 99)), 3), "max": round(float(a.max()), 3)},
            "bypassed": bypassed,
            "service": {k: v for k, v in (worker.get("service") or {}).items()
                        if k in ("clients", "batches", "avg_clients_per_batch", "avg_rows_per_batch")}}


def _remote(port: int, name: str) -> Executor:
    return Executor(ExecutorConfig(device="cpu", isolation="remote", remote_address=f"127.0.0.1:{port}",
                                   remote_token=TOKEN.encode(), remote_name=name))


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    local = await _run([Executor(ExecutorConfig(device="cpu", isolation="process"))], [args.streams],
                       args.stages, args.ticks)
    port = _free_port()
    proc = subprocess.Popen([str(BIN / "enhancers"), "serve-executor", "--listen", f"127.0.0.1:{port}",
                             "--device", "cpu", "--preload", args.stages],
                            env={**os.environ, "MEDIASERVER_EXECUTOR_TOKEN": TOKEN},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await _wait_port(port)
        remote = await _run([_remote(port, "one")], [args.streams], args.stages, args.ticks)
        half = args.streams // 2
        two = await _run([_remote(port, "a"), _remote(port, "b")], [half, args.streams - half], args.stages,
                         args.ticks)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    return {"bench": "remote_executor", "streams": args.streams, "stages": args.stages, "ticks": args.ticks,
            "local": local, "remote": remote, "remote_two_clients": two,
            "added_ms": {q: round(remote["round_trip_ms"][q] - local["round_trip_ms"][q], 3) for q in ("p50", "p99")}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--ticks", type=int, default=500)
    parser.add_argument("--stages", default="limiter")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(args)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
