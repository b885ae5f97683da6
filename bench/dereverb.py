"""Benchmark: microseconds per stream-chunk (10 ms of one stream) for the dereverb stage.

Batched online WPE (``DereverbStage``) at B = 1, 16, 64, 256 streams per call,
against nara_wpe's ``OnlineWPE`` run per stream in the same process: one
``step_frame`` per stream per 10 ms, with the stage's taps and delay, both on
the stage's processed bins (the same work) and on 257 bins (nara's customary
16 kHz, 512-point set-up).  The nara figures are its WPE step alone, without
STFT; the stage's include its STFT, overlap-add and upper band.  Rounds are
interleaved (each configuration measured once per round, median over rounds)
so that load from other processes hits all of them alike.

    .venv/bin/python bench/dereverb.py [--quick] [--device cuda] [--threads N]

Prints JSON.  ``speedup_vs_nara`` is nara's time per stream-chunk (same bins)
over the stage's; ``realtime_streams`` is how many streams one device keeps
up with (10 000 us per chunk / us per stream-chunk).  On CPU the times are
process CPU time, so that other load on a shared machine does not inflate
them (run with ``--threads 1`` for per-core figures); on CUDA, wall-clock
time with synchronization.
"""

from __future__ import annotations

import argparse
import json
import os
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
from enhancers.dereverb import DereverbStage
from enhancers.dereverb.reference import NaraOnlineWpe, stft
from enhancers.stage import CHUNK, BatchContext, StageStream

EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "eval"


def test_signal(seconds: float) -> np.ndarray:
    """Real reverberant speech (AMI distant microphone), looped to ``seconds``."""
    path = EVAL / "reverb" / "AMI_WSJ20-Array1-1_T10c0201.wav"
    if path.exists():
        x = read_48k(path)
        x = 0.3 * x / np.abs(x).max()
    else:
        x = np.random.default_rng(0).standard_normal(48_000).astype(np.float32) * 0.05
    n = int(seconds * 48_000) // CHUNK * CHUNK
    return np.tile(x, -(-n // len(x)))[:n].astype(np.float32)


class BatchedRun:
    """B streams of one stage fed successive chunks of the signal (each stream at its own offset)."""

    def __init__(self, batch: int, signal: np.ndarray, device: str) -> None:
        self.stage = DereverbStage(device=device)
        self.streams: list[StageStream] = [self.stage.stream() for _ in range(batch)]
        chunks = torch.from_numpy(signal).view(-1, CHUNK)
        offsets = torch.arange(batch) * 37 % chunks.shape[0]
        self.chunks = chunks
        self.offsets = offsets
        self.tick = 0
        self.device = device

    def step(self) -> None:
        index = (self.offsets + self.tick) % self.chunks.shape[0]
        audio = self.chunks[index].to(self.device)
        self.stage.process(audio, self.streams, BatchContext())
        self.tick += 1


class NaraRun:
    """``streams`` independent nara OnlineWPE objects, one frame each per step."""

    def __init__(self, streams: int, bins: int, signal: np.ndarray) -> None:
        spec = stft(signal[: 48_000 * 4])
        self.frames = [spec[:bins, t].copy() for t in range(spec.shape[1])]
        if bins > spec.shape[0]:
            raise ValueError("bins above the STFT size")
        self.wpes = [NaraOnlineWpe(bins) for _ in range(streams)]
        self.tick = 0

    def step(self) -> None:
        for k, wpe in enumerate(self.wpes):
            wpe.step(self.frames[(self.tick + 37 * k) % len(self.frames)])
        self.tick += 1


def timed(step: Callable[[], None], ticks: int, cuda: bool) -> float:
    """Seconds per step (process CPU time; wall time with synchronization on CUDA)."""
    clock = time.perf_counter if cuda else time.process_time
    if cuda:
        torch.cuda.synchronize()
    start = clock()
    for _ in range(ticks):
        step()
    if cuda:
        torch.cuda.synchronize()
    return (clock() - start) / ticks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B = 1, 16, 64 and fewer rounds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (0: 3 quick, 7 full)")
    args = parser.parse_args()
    if args.threads > 0:
        limit_compute_threads(args.threads)
    cuda = args.device.startswith("cuda")
    batches = [1, 16, 64] if args.quick else [1, 16, 64, 256]
    rounds = args.rounds or (3 if args.quick else 7)
    signal = test_signal(8.0)

    runs = {f"stage_B{b}": (BatchedRun(b, signal, args.device), b) for b in batches}
    bins = runs[f"stage_B{batches[0]}"][0].stage.processed_bins
    nara = {"nara_same_bins": NaraRun(4, bins, signal), "nara_257_bins": NaraRun(4, 257, signal)}
    samples: dict[str, list[float]] = {name: [] for name in [*runs, *nara]}
    for name, (run, _) in runs.items():
        for _ in range(10):
            run.step()  # warm-up
    for _ in range(rounds):
        for name, (run, batch) in runs.items():
            ticks = max(3, 256 // batch)
            samples[name].append(timed(run.step, ticks, cuda) * 1e6 / batch)
        for name, nrun in nara.items():
            samples[name].append(timed(nrun.step, 10, False) * 1e6 / len(nrun.wpes))

    per_chunk = {name: statistics.median(values) for name, values in samples.items()}
    nara_us = per_chunk["nara_same_bins"]
    results = [
        {
            "batch": batch,
            "us_per_stream_chunk": per_chunk[name],
            "speedup_vs_nara": nara_us / per_chunk[name],
            "speedup_vs_nara_257_bins": per_chunk["nara_257_bins"] / per_chunk[name],
            "realtime_streams": 10_000.0 / per_chunk[name],
        }
        for name, (_, batch) in runs.items()
    ]
    stage = runs[f"stage_B{batches[0]}"][0].stage
    report = {
        "bench": "dereverb",
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "timing": "wall clock, synchronized" if cuda else "process CPU time",
        "rounds": rounds,
        "config": {
            "taps": stage.wpe.max_taps,
            "delay": stage.default_delay,
            "processed_bins": bins,
            "block_rows": stage.wpe.block_rows,
        },
        "nara_online_wpe_us_per_stream_chunk": {"same_bins": nara_us, "257_bins": per_chunk["nara_257_bins"]},
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
