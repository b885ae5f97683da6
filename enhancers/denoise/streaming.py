"""Running whole signals through a stage the way the server does: chunk by chunk.

Used by the denoise evaluation, the tests and the benchmark.  Each signal is
its own stream on the stage; all of them go through :meth:`Stage.process`
together, one 10 ms chunk per call, and the outputs are shifted back by the
stage's declared latency so they line up sample for sample with the inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from enhancers.stage import CHUNK, BatchContext, Stage


def run_streams(
    stage: Stage,
    signals: Sequence[np.ndarray],
    options: Sequence[dict[str, Any]] | None = None,
    compensate_latency: bool = True,
) -> list[np.ndarray]:
    """Process ``signals`` as concurrent streams of ``stage``; returns one output per input.

    With ``compensate_latency`` the outputs are aligned to the inputs (the
    first ``latency_samples`` of output are dropped and the input is padded
    with as many zeros at the end); otherwise the raw streaming output is
    returned, as long as the input.
    """
    if not signals:
        return []
    opts = list(options) if options is not None else [{} for _ in signals]
    streams = [stage.stream(**o) for o in opts]
    try:
        delay = stage.latency_samples if compensate_latency else 0
        lengths = [len(s) for s in signals]
        total = max(lengths) + delay
        n_chunks = -(-total // CHUNK)
        batch = np.zeros((len(signals), n_chunks * CHUNK), dtype=np.float32)
        for row, sig in enumerate(signals):
            batch[row, : len(sig)] = sig
        audio = torch.from_numpy(batch)
        out = np.zeros_like(batch)
        for i in range(n_chunks):
            sl = slice(i * CHUNK, (i + 1) * CHUNK)
            out[:, sl] = stage.process(audio[:, sl], streams, BatchContext()).cpu().numpy()
        return [out[row, delay : delay + n].copy() for row, n in enumerate(lengths)]
    finally:
        for s in streams:
            s.close()
