"""Benchmark: CPU cost of each stage per stream per 10 ms chunk, at several batch sizes.

For every stage spec, B streams are opened on one stage instance and fed
B x 480 samples of speech-like noise (plus a far-end reference for ``aec``)
per call, as the executor does every tick.  The figure is CPU time
(``time.process_time``) of one ``process`` call divided by B: milliseconds
per stream per chunk, on one thread (``--threads 1``, the worker's setting).
Timing blocks of all (spec, B) pairs are interleaved over ``--rounds`` rounds,
so load from other processes hits all of them alike; the report keeps the
median and the minimum over rounds (the minimum is the least disturbed).

A spec may carry constructor options after ``@``: ``denoise:df3@precision=fp32``
or ``denoise:df3@native_streams=0,precision=int8`` (values parsed as JSON,
else kept as strings), so an old path kept switchable runs next to the new one.

    taskset -c 1 .venv/bin/python bench/stage_cost.py \
        --stages "aec,dereverb,denoise:df3,denoise:df3@precision=fp32" --batches 1,16,64

Prints JSON: ``ms_per_stream[spec][B]`` (median), ``ms_per_stream_min``, and
``streams_per_core`` (10 ms over the median).
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
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from enhancers.compute_threads import limit_compute_threads
from enhancers.registry import create_stage  # noqa: E402
from enhancers.stage import CHUNK, BatchContext, Stage  # noqa: E402

DEFAULT_STAGES = "aec,dereverb,denoise:df3,denoise:nsnet2,denoise:gtcrn,denoise:rnnoise,vad,limiter"


def parse_spec(text: str) -> tuple[str, dict[str, Any]]:
    """``name[@key=value,...]`` -> (registry spec, constructor options)."""
    spec, _, opts = text.partition("@")
    options: dict[str, Any] = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value.strip()
    return spec.strip(), options


def test_audio(rows: int, chunks: int, seed: int) -> np.ndarray:
    """``[rows, chunks * CHUNK]`` float32: noise with a syllable-rate envelope (speech-like levels)."""
    rng = np.random.default_rng(seed)
    n = chunks * CHUNK
    t = np.arange(n) / 48_000.0
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * t[None, :] + rng.uniform(0, 6.3, (rows, 1)))
    x = rng.standard_normal((rows, n)) * (0.01 + 0.09 * env)
    return x.astype(np.float32)


def make_timer(stage: Stage, batch: int, ticks: int, seed: int, warmup: int) -> Callable[[], float]:
    """A function timing ``ticks`` calls at batch ``batch``: returns ms of CPU per stream per chunk."""
    streams = [stage.stream() for _ in range(batch)]
    chunks = 64
    mic = torch.from_numpy(test_audio(batch, chunks, seed))
    far = torch.from_numpy(test_audio(batch, chunks, seed + 1))
    position = [0]

    def step() -> None:
        i = position[0] % chunks
        position[0] += 1
        sl = slice(i * CHUNK, (i + 1) * CHUNK)
        stage.process(mic[:, sl], streams, BatchContext(reference=far[:, sl]))

    for _ in range(warmup):  # warm-up: stateful stages settle (DF3 moves libDF streams to torch)
        step()

    def run() -> float:
        start = time.process_time()
        for _ in range(ticks):
            step()
        return (time.process_time() - start) * 1000.0 / ticks / batch

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=DEFAULT_STAGES, help="comma list of specs (';' also separates)")
    parser.add_argument("--batches", default="1,16,64", help="comma list of streams per call")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--ticks", type=int, default=0, help="calls per timing block (0: about 1 s of CPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--warmup", type=int, default=310, help="calls before timing (DF3 hands libDF streams to torch after 300)"
    )
    parser.add_argument("--quick", action="store_true", help="3 rounds, shorter blocks")
    args = parser.parse_args()
    if args.threads > 0:
        limit_compute_threads(args.threads)
    rounds = 3 if args.quick else args.rounds
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    # specs with options contain commas: split the list on ';' when given, else on commas outside '@...'
    raw = args.stages.split(";") if ";" in args.stages else _split_specs(args.stages)
    specs = [s.strip() for s in raw if s.strip()]

    timers: dict[tuple[str, int], Callable[[], float]] = {}
    for spec_text in specs:
        spec, options = parse_spec(spec_text)
        for b in batches:
            stage = create_stage(spec, device="cpu", **options)  # a fresh instance per batch size
            ticks = args.ticks or max(8, (20 if args.quick else 50) * 16 // max(b, 16))
            timers[(spec_text, b)] = make_timer(stage, b, ticks, seed=b, warmup=args.warmup)
    samples: dict[tuple[str, int], list[float]] = {k: [] for k in timers}
    for _ in range(rounds):
        for key, run in timers.items():
            samples[key].append(run())

    def table(pick: Callable[[list[float]], float]) -> dict[str, dict[str, float]]:
        return {s: {str(b): round(pick(samples[(s, b)]), 4) for b in batches} for s in specs}

    median = table(statistics.median)
    report = {
        "bench": "stage_cost",
        "unit": "ms of CPU per 10 ms chunk per stream (process_time / B)",
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "rounds": rounds,
        "ms_per_stream": median,
        "ms_per_stream_min": table(min),
        "streams_per_core": {s: {b: int(10.0 / max(v, 1e-6)) for b, v in row.items()} for s, row in median.items()},
    }
    print(json.dumps(report, indent=2))
    return 0


def _split_specs(text: str) -> list[str]:
    """Split on commas, except those inside a spec's ``@key=value,key=value`` options."""
    out: list[str] = []
    for part in text.split(","):
        if out and "@" in out[-1] and "=" in part and "@" not in part and ":" not in part.split("=")[0]:
            out[-1] += "," + part
        else:
            out.append(part)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
