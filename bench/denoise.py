"""Benchmark: microseconds per stream-chunk (10 ms of one stream) for the denoisers.

Batched torch DF3 and NSNet2 at B = 1, 16, 64, 256 streams per call, against
the per-stream baselines measured in the same run: DeepFilterNet's own libDF
runtime (one native state per stream, one call per frame) and RNNoise.  The
rounds are interleaved (every configuration measured once per round, median
over rounds) so that load from other processes hits all of them alike.

    .venv/bin/python bench/denoise.py [--quick] [--device cuda] [--threads N]

Prints JSON.  ``speedup_vs_libdf`` is libDF's time per stream-chunk over
batched DF3's: above 1 means the batched path serves more streams per core.
``realtime_streams`` is how many streams one device keeps up with in real time
(10 000 us per chunk / us per stream-chunk).

On CPU the times are process CPU time (``time.process_time``), so that other
load on a shared machine does not inflate them; run with ``--threads 1`` for
per-core figures.  On CUDA they are wall-clock times with synchronization.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from enhancers.audio_io import read_48k
from enhancers.compute_threads import limit_compute_threads
from enhancers.denoise.df3 import DeepFilterNet3Stage
from enhancers.denoise.libdf import LibDfStream
from enhancers.denoise.nsnet2 import NSNet2Stage
from enhancers.denoise.rnnoise import RNNoiseState
from enhancers.stage import CHUNK, BatchContext, Stage

EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "eval"


def test_signal(seconds: float) -> np.ndarray:
    """Real noisy speech (looped) so the networks see realistic activations."""
    path = EVAL / "noisy" / "pesq_speech_babble_0dB.wav"
    x = (
        read_48k(path)
        if path.exists()
        else np.random.default_rng(0).standard_normal(48_000).astype(np.float32) * 0.05
    )
    n = int(seconds * 48_000) // CHUNK * CHUNK
    return np.tile(x, -(-n // len(x)))[:n]


def time_batched(
    stage: Stage, batch: int, signal: np.ndarray, ticks: int, device: str
) -> Callable[[], float]:
    """A timer closure: runs `ticks` chunks for `batch` streams, returns us per stream-chunk."""
    streams = [stage.stream() for _ in range(batch)]
    chunks = signal.reshape(-1, CHUNK)
    rng = np.random.default_rng(batch)
    offsets = rng.integers(0, len(chunks), size=batch)
    frames = [
        torch.from_numpy(np.stack([chunks[(o + t) % len(chunks)] for o in offsets])).to(device)
        for t in range(ticks)
    ]
    ctx = BatchContext()

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for f in frames[:3]:  # warm-up
        stage.process(f, streams, ctx)

    clock = time.perf_counter if device.startswith("cuda") else time.process_time

    def run() -> float:
        sync()
        t0 = clock()
        for f in frames:
            stage.process(f, streams, ctx)
        sync()
        return (clock() - t0) / (ticks * batch) * 1e6

    return run


def time_per_stream(
    process: Callable[[np.ndarray], object], signal: np.ndarray, ticks: int
) -> Callable[[], float]:
    chunks = signal.reshape(-1, CHUNK)[:ticks]
    for c in chunks[:3]:
        process(c)

    def run() -> float:
        t0 = time.process_time()
        for c in chunks:
            process(c)
        return (time.process_time() - t0) / len(chunks) * 1e6

    return run


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer ticks and rounds, B up to 64")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--batches", default=None, help="comma list of batch sizes (default 1,16,64,256)")
    args = parser.parse_args()
    if args.threads > 0:
        limit_compute_threads(args.threads)
    batches = [int(b) for b in (args.batches or ("1,16,64" if args.quick else "1,16,64,256")).split(",")]
    rounds = 3 if args.quick else 5
    ticks = 10 if args.quick else 30
    signal = test_signal(4.0)

    timers: dict[str, Callable[[], float]] = {}
    for name, cls in (("df3_torch", DeepFilterNet3Stage), ("nsnet2_torch", NSNet2Stage)):
        for b in batches:
            extra = {"native_streams": 0} if cls is DeepFilterNet3Stage else {}  # the torch path alone
            stage = cls(device=args.device, **extra)  # a fresh pool per batch size
            timers[f"{name}/B={b}"] = time_batched(
                stage, b, signal, max(3, ticks * 16 // max(b, 16)), args.device
            )
    libdf = LibDfStream()
    timers["libdf_per_stream"] = time_per_stream(libdf.process_frame, signal, ticks * 4)
    rn = RNNoiseState()
    rn_out = np.zeros(CHUNK, dtype=np.float32)
    timers["rnnoise_per_stream"] = time_per_stream(lambda c: rn.process_frame(c, rn_out), signal, ticks * 4)

    samples: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(rounds):
        for key, run in timers.items():
            samples[key].append(run())
    med = {k: statistics.median(v) for k, v in samples.items()}

    def per_model(prefix: str) -> dict[str, float]:
        return {str(b): round(med[f"{prefix}/B={b}"], 1) for b in batches}

    libdf_us = med["libdf_per_stream"]
    report = {
        "bench": "denoise",
        "unit": "microseconds per stream-chunk (10 ms of audio for one stream)",
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "rounds": rounds,
        "df3_torch": per_model("df3_torch"),
        "nsnet2_torch": per_model("nsnet2_torch"),
        "libdf_per_stream": round(libdf_us, 1),
        "rnnoise_per_stream": round(med["rnnoise_per_stream"], 1),
        "speedup_vs_libdf": {str(b): round(libdf_us / med[f"df3_torch/B={b}"], 2) for b in batches},
        "realtime_streams": {
            "df3_torch": {str(b): int(10_000 / med[f"df3_torch/B={b}"]) for b in batches},
            "nsnet2_torch": {str(b): int(10_000 / med[f"nsnet2_torch/B={b}"]) for b in batches},
            "libdf_per_stream": int(10_000 / libdf_us),
            "rnnoise_per_stream": int(10_000 / med["rnnoise_per_stream"]),
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
