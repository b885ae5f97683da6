"""Benchmark: GTCRN's cost per stream against DF3 and NSNet2, measured in the same run.

Milliseconds of CPU per 10 ms chunk of one stream, at B = 1, 8, 32 streams per
stage call, for ``denoise:gtcrn`` (one ONNX Runtime session, single-threaded,
looping over the streams: the graph's batch is fixed at 1), ``denoise:df3``
as the server runs it (libDF for the first 2 streams, batched torch for the
rest), DF3's batched torch path alone and ``denoise:nsnet2`` (batched torch).
Rounds interleave the configurations and the median is kept, so load from
other processes hits all of them alike (``bench/denoise.py``'s timers).

    .venv/bin/python bench/denoise_gtcrn.py [--quick] [--threads N] [--batches 1,8,32]

Prints JSON.  Times are process CPU time; ``--threads 1`` (the default) gives
per-core figures, and ``streams_per_core`` is 10 ms over the cost per chunk.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.denoise import test_signal, time_batched  # noqa: E402
from enhancers.compute_threads import limit_compute_threads
from enhancers.denoise.df3 import DeepFilterNet3Stage  # noqa: E402
from enhancers.denoise.gtcrn import GTCRNStage  # noqa: E402
from enhancers.denoise.nsnet2 import NSNet2Stage  # noqa: E402
from enhancers.stage import Stage  # noqa: E402

MODELS: dict[str, Callable[[], Stage]] = {
    "gtcrn": GTCRNStage,
    "df3": DeepFilterNet3Stage,
    "df3_torch": lambda: DeepFilterNet3Stage(native_streams=0),
    "nsnet2": NSNet2Stage,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer ticks and rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--batches", default="1,8,32", help="comma list of streams per call")
    args = parser.parse_args()
    if args.threads > 0:
        limit_compute_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    rounds = 3 if args.quick else 5
    ticks = 10 if args.quick else 30
    signal = test_signal(4.0)

    timers: dict[str, Callable[[], float]] = {}
    for name, make in MODELS.items():
        for b in batches:  # a fresh stage per batch size; at least 16 ticks so GTCRN's 16 ms hop evens out
            timers[f"{name}/B={b}"] = time_batched(make(), b, signal, max(16, ticks * 8 // max(b, 8)), "cpu")
    samples: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(rounds):
        for key, run in timers.items():
            samples[key].append(run())
    ms = {k: statistics.median(v) / 1000 for k, v in samples.items()}  # us -> ms per stream-chunk

    report = {
        "bench": "denoise_gtcrn",
        "unit": "ms of CPU per 10 ms chunk per stream",
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "rounds": rounds,
        "ms_per_chunk_per_stream": {
            name: {str(b): round(ms[f"{name}/B={b}"], 3) for b in batches} for name in MODELS
        },
        "streams_per_core": {name: {str(b): int(10 / ms[f"{name}/B={b}"]) for b in batches} for name in MODELS},
        "gtcrn_cost_vs": {
            name: {str(b): round(ms[f"gtcrn/B={b}"] / ms[f"{name}/B={b}"], 2) for b in batches}
            for name in MODELS
            if name != "gtcrn"
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
