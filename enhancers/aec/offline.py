"""Echo-cancel whole recordings at once: many streams through one stage, chunk by chunk.

Used by ``enhancers eval --task aec``, the tests and the benchmark; it runs
exactly the server path (one batched :meth:`EchoCancellerStage.process` per
10 ms tick for all rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from enhancers.aec.stage import EchoCancellerStage
from enhancers.stage import CHUNK, BatchContext


@dataclass
class OfflineResult:
    """Outputs (each as long as its mic input) and each row's locked bulk delay."""

    outputs: list[np.ndarray]
    delays_ms: list[float | None]


def stack_padded(signals: Sequence[np.ndarray], length: int) -> torch.Tensor:
    """``[len(signals), length]`` float32, each signal zero-padded or cut to ``length``."""
    out = torch.zeros(len(signals), length)
    for i, x in enumerate(signals):
        n = min(len(x), length)
        out[i, :n] = torch.from_numpy(np.asarray(x[:n], dtype=np.float32))
    return out


def cancel_echo(
    references: Sequence[np.ndarray],
    mics: Sequence[np.ndarray],
    options: Sequence[dict[str, Any]] | None = None,
    device: str = "cpu",
    stage: EchoCancellerStage | None = None,
) -> OfflineResult:
    """Run every (reference, mic) pair as one stream of a shared stage, batched per chunk.

    ``options`` are per-stream options (``suppression``, ``delay_hint_ms``).
    All signals are 48 kHz mono float32.
    """
    rows = len(mics)
    options = list(options) if options is not None else [{} for _ in range(rows)]
    stage = stage if stage is not None else EchoCancellerStage(device=device)
    streams = [stage.stream(**o) for o in options]
    length = -(-max(len(m) for m in mics) // CHUNK) * CHUNK
    far = stack_padded(references, length).to(stage.device)
    mic = stack_padded(mics, length).to(stage.device)
    out = torch.empty_like(mic)
    with torch.no_grad():
        for start in range(0, length, CHUNK):
            ctx = BatchContext(reference=far[:, start : start + CHUNK])
            out[:, start : start + CHUNK] = stage.process(mic[:, start : start + CHUNK], streams, ctx)
    result = out.cpu().numpy()
    delays = [stage.estimated_delay_ms(s) for s in streams]
    for s in streams:
        s.close()
    return OfflineResult(outputs=[result[i, : len(m)] for i, m in enumerate(mics)], delays_ms=delays)
