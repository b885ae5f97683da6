"""Echo-cancel whole recordings at once: many streams through one stage, chunk by chunk.

Used by ``enhancers eval --task aec``, the tests and the benchmark; it runs
exactly the server path (one :meth:`Stage.process` call per 10 ms tick for all
rows) on the batched ``aec`` stage or on any other echo canceller stage
(``aec:webrtc``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from enhancers.aec.stage import EchoCancellerStage
from enhancers.stage import CHUNK, BatchContext, Stage


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
    stage: Stage | None = None,
) -> OfflineResult:
    """Run every (reference, mic) pair as one stream of a shared stage, batched per chunk.

    ``options`` are per-stream options (``suppression``, ``delay_hint_ms``).
    All signals are 48 kHz mono float32; each output is as long as its mic and aligned with it
    (the stage's declared latency taken out).
    """
    rows = len(mics)
    options = list(options) if options is not None else [{} for _ in range(rows)]
    stage = stage if stage is not None else EchoCancellerStage(device=device)
    streams = [stage.stream(**o) for o in options]
    delay = int(stage.latency_samples)  # outputs are shifted back by it: aligned with their mics
    length = -(-(max(len(m) for m in mics) + delay) // CHUNK) * CHUNK
    far = stack_padded(references, length).to(stage.device)
    mic = stack_padded(mics, length).to(stage.device)
    out = torch.empty_like(mic)
    with torch.no_grad():
        for start in range(0, length, CHUNK):
            ctx = BatchContext(reference=far[:, start : start + CHUNK])
            out[:, start : start + CHUNK] = stage.process(mic[:, start : start + CHUNK], streams, ctx)
    result = out.cpu().numpy()
    delay_of = getattr(stage, "estimated_delay_ms", None)
    delays = [None if delay_of is None else delay_of(s) for s in streams]
    for s in streams:
        s.close()
    return OfflineResult(outputs=[result[i, delay : delay + len(m)] for i, m in enumerate(mics)], delays_ms=delays)
