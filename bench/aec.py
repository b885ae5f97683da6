"""Benchmark the echo canceller stage: batched across streams vs one stream at a time.

Prints JSON: microseconds per stream-chunk (one 10 ms chunk of one stream)
for the batched path at B = 1, 16, 64, 256 and for the per-stream path (the
same streams, one ``process`` call each) measured in the same run, their
ratio, and how many streams one device keeps real time with (10 ms budget
per tick).  The input is real speech echoed through a measured room with a
different delay per stream, so the filter, delay estimator and suppressor
all do real work.  speexdsp is timed too when its Python binding imports.

    .venv/bin/python bench/aec.py [--quick] [--device cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import numpy as np
import torch

from enhancers.aec.simulate import FAR_SPEECH, echo_scenario, room_response, speech
from enhancers.aec.stage import EchoCancellerStage
from enhancers.compute_threads import limit_compute_threads
from enhancers.stage import CHUNK, BatchContext


def make_inputs(streams: int, ticks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[streams, ticks*CHUNK]`` far and mic: echo of real speech, 50-400 ms delays."""
    seconds = ticks * CHUNK / 48_000 + 0.5
    far = speech(FAR_SPEECH, seconds)
    rir = room_response("impulse_response_0.wav")
    base = [echo_scenario(far, rir, d) for d in (50.0, 150.0, 300.0, 400.0)]
    n = ticks * CHUNK
    refs = np.stack([np.roll(base[i % 4].far, 4_800 * (i // 4))[:n] for i in range(streams)])
    mics = np.stack([np.roll(base[i % 4].mic, 4_800 * (i // 4))[:n] for i in range(streams)])
    return torch.from_numpy(refs), torch.from_numpy(mics)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_batched(
    far: torch.Tensor, mic: torch.Tensor, ticks: int, warmup: int, device: torch.device
) -> float:
    """Seconds per tick with all streams in one ``process`` call."""
    stage = EchoCancellerStage(device=device)
    streams = [stage.stream() for _ in range(far.shape[0])]
    far, mic = far.to(device), mic.to(device)
    with torch.no_grad():
        for t in range(warmup + ticks):
            if t == warmup:
                sync(device)
                start = time.perf_counter()
            sl = slice(t * CHUNK, (t + 1) * CHUNK)
            stage.process(mic[:, sl], streams, BatchContext(reference=far[:, sl]))
        sync(device)
    return (time.perf_counter() - start) / ticks


def time_per_stream(
    far: torch.Tensor, mic: torch.Tensor, ticks: int, warmup: int, device: torch.device
) -> float:
    """Seconds per tick with one ``process`` call per stream (the unbatched path)."""
    stage = EchoCancellerStage(device=device)
    streams = [stage.stream() for _ in range(far.shape[0])]
    far, mic = far.to(device), mic.to(device)
    with torch.no_grad():
        for t in range(warmup + ticks):
            if t == warmup:
                sync(device)
                start = time.perf_counter()
            sl = slice(t * CHUNK, (t + 1) * CHUNK)
            for i, s in enumerate(streams):
                stage.process(mic[i : i + 1, sl], [s], BatchContext(reference=far[i : i + 1, sl]))
        sync(device)
    return (time.perf_counter() - start) / ticks


def time_speexdsp(far: torch.Tensor, mic: torch.Tensor, ticks: int) -> dict[str, Any]:
    """speexdsp's MDF echo canceller (C), one stream, if its Python binding is installed."""
    try:
        from speexdsp import EchoCanceller  # type: ignore[import-not-found]
    except ImportError:
        return {"available": False, "note": "no speexdsp wheel installs here (source-only package)"}
    ec = EchoCanceller.create(CHUNK, 9600, 48_000)
    f = (far[0].numpy() * 32767).astype(np.int16)
    m = (mic[0].numpy() * 32767).astype(np.int16)
    start = time.perf_counter()
    for t in range(ticks):
        sl = slice(t * CHUNK, (t + 1) * CHUNK)
        ec.process(m[sl].tobytes(), f[sl].tobytes())
    return {"available": True, "us_per_stream_chunk": (time.perf_counter() - start) / ticks * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer ticks")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument("--batches", default="1,16,64,256")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        limit_compute_threads(args.threads)
    ticks, warmup = (20, 10) if args.quick else (100, 50)
    batches = [int(b) for b in args.batches.split(",")]
    far, mic = make_inputs(max(batches), warmup + ticks)
    # The per-stream cost does not depend on how many streams there are; it is
    # measured on up to 16 of them to keep the run short.
    per_stream_streams = min(16, max(batches))
    per_stream_s = time_per_stream(far[:per_stream_streams], mic[:per_stream_streams], ticks, warmup, device)
    per_stream_us = per_stream_s / per_stream_streams * 1e6
    rows = []
    for b in batches:
        tick_s = time_batched(far[:b], mic[:b], ticks, warmup, device)
        us = tick_s / b * 1e6
        rows.append(
            {
                "streams": b,
                "batched_ms_per_tick": round(tick_s * 1e3, 3),
                "batched_us_per_stream_chunk": round(us, 1),
                "per_stream_us_per_stream_chunk": round(per_stream_us, 1),
                "speedup_vs_per_stream": round(per_stream_us / us, 2),
                "realtime_streams_at_this_batch": int(b * 0.010 / tick_s),
            }
        )
    stage = EchoCancellerStage()
    report = {
        "bench": "aec",
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "ticks_timed": ticks,
        "filter": {
            "partitions": stage.mdf.partitions,
            "tail_ms": stage.mdf.partitions * 10,
            "linear_bins": stage.mdf.bins,
            "max_delay_ms": stage.delay_cfg.max_delay_chunks * 10,
        },
        "per_stream_path": {
            "streams_measured": per_stream_streams,
            "us_per_stream_chunk": round(per_stream_us, 1),
        },
        "batched": rows,
        "speexdsp": time_speexdsp(far, mic, ticks),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
