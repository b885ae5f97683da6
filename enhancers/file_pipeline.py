"""Run a stage chain over a whole file through the very same streaming executor path.

The file is resampled to 48 kHz, cut into 480-sample chunks (the echo
reference, when given, into aligned chunks) and fed through one
:class:`~enhancers.executor.ExecutorStream`.  The declared latency of the
chain is compensated (the input is padded at the end and the head of the output
dropped) so the result lines up with the input sample for sample; it is then
resampled back to the input's rate and length.  Offline, the deadline is set
far out so no chunk is bypassed for being slow.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from enhancers.audio_io import read_mono, resample, write_wav
from enhancers.executor import Executor, ExecutorConfig, ProcessedChunk
from enhancers.stage import CHUNK, SAMPLE_RATE

OFFLINE_DEADLINE_MS = 600_000.0
PIPELINE_DEPTH = 8  # chunks in flight at once: the executor runs them as rounds of one job


@dataclass
class StreamRun:
    """What a file run produced: the output at 48 kHz and how the executor fared."""

    audio: np.ndarray
    latency_samples: int
    chunks: int
    bypassed_chunks: int
    side: dict[str, np.ndarray] = field(default_factory=dict)  # per-chunk side info, e.g. "vad"
    stats: dict[str, Any] = field(default_factory=dict)


def _chunks(x: np.ndarray, count: int) -> np.ndarray:
    padded = np.zeros(count * CHUNK, dtype=np.float32)
    n = min(len(x), len(padded))
    padded[:n] = x[:n]
    return padded.reshape(count, CHUNK)


async def process_array_async(
    audio: np.ndarray,
    stages: Sequence[str] | str,
    reference: np.ndarray | None = None,
    *,
    device: str = "auto",
    stage_options: Mapping[str, Mapping[str, Any]] | None = None,
    stream_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> StreamRun:
    """Stream 48 kHz mono ``audio`` through ``stages``; output aligned with the input."""
    config = ExecutorConfig(
        device=device,
        deadline_ms=OFFLINE_DEADLINE_MS,
        stuck_after_ms=OFFLINE_DEADLINE_MS,
        stage_options=dict(stage_options or {}),
    )
    executor = Executor(config)
    await executor.start()
    try:
        stream = executor.open_stream(stages, stream_options, label="file")
        await stream.wait_ready()
        latency = stream.latency_samples
        count = -(-(len(audio) + latency) // CHUNK)
        chunks = _chunks(audio, count)
        refs = _chunks(reference, count) if reference is not None else None
        in_flight: collections.deque[asyncio.Future[ProcessedChunk]] = collections.deque()
        results: list[ProcessedChunk] = []
        for k in range(count):
            ref = refs[k] if refs is not None else None
            in_flight.append(asyncio.ensure_future(stream.process(chunks[k], ref)))
            if len(in_flight) >= PIPELINE_DEPTH:
                results.append(await in_flight.popleft())
        while in_flight:
            results.append(await in_flight.popleft())
        stream.close()
        stats = executor.stats()
    finally:
        await executor.close()
    out = np.concatenate([r.audio for r in results])[latency : latency + len(audio)]
    keys = sorted({key for r in results for key in r.side})
    side = {key: np.array([r.side.get(key, np.nan) for r in results], dtype=np.float32) for key in keys}
    return StreamRun(
        audio=out.astype(np.float32, copy=False),
        latency_samples=latency,
        chunks=count,
        bypassed_chunks=sum(r.bypassed for r in results),
        side=side,
        stats=stats,
    )


def process_array(
    audio: np.ndarray,
    stages: Sequence[str] | str,
    reference: np.ndarray | None = None,
    *,
    device: str = "auto",
    stage_options: Mapping[str, Mapping[str, Any]] | None = None,
    stream_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> StreamRun:
    """Synchronous :func:`process_array_async` (runs its own event loop)."""
    return asyncio.run(
        process_array_async(
            audio,
            stages,
            reference,
            device=device,
            stage_options=stage_options,
            stream_options=stream_options,
        )
    )


@dataclass
class FileResult:
    """Summary of one processed file."""

    in_rate: int
    seconds: float
    run: StreamRun


def process_file(
    in_path: str | Path,
    out_path: str | Path,
    stages: Sequence[str] | str,
    reference_path: str | Path | None = None,
    *,
    device: str = "auto",
    stage_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> FileResult:
    """Process ``in_path`` into ``out_path`` (same sample rate and length as the input)."""
    x, rate = read_mono(in_path)
    x48 = resample(x, rate, SAMPLE_RATE)
    ref48 = None
    if reference_path is not None:
        ref, ref_rate = read_mono(reference_path)
        ref48 = resample(ref, ref_rate, SAMPLE_RATE)
    run = process_array(x48, stages, ref48, device=device, stage_options=stage_options)
    y = resample(run.audio, SAMPLE_RATE, rate)
    if len(y) < len(x):
        y = np.pad(y, (0, len(x) - len(y)))
    write_wav(out_path, y[: len(x)], rate)
    return FileResult(in_rate=rate, seconds=len(x) / rate, run=run)
