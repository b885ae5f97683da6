"""Misbehaving stages for fault tests: one raises on every call, one hangs."""

from __future__ import annotations

import threading
from typing import Sequence

import torch

from enhancers.stage import BatchContext, Stage, StageStream

RELEASE = threading.Event()


class RaisingStage(Stage):
    """Raises on every batch."""

    name = "limiter"

    def process(self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext) -> torch.Tensor:
        raise RuntimeError("this stage always fails")


class HangingStage(Stage):
    """Blocks the worker until RELEASE is set (or 20 s pass)."""

    name = "limiter"

    def process(self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext) -> torch.Tensor:
        RELEASE.wait(20.0)
        return audio
