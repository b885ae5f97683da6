"""Misbehaving stages for fault tests: raising, hanging (always or once), crashing the worker, losing a GPU."""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import threading
import time
from pathlib import Path
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


class CrashingStage(Stage):
    """Kills the executor's worker process on every call (in the server's own process it raises instead)."""

    name = "denoise"

    def process(self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext) -> torch.Tensor:
        if multiprocessing.parent_process() is not None:
            os._exit(3)  # what a segfault in native code or an OOM kill look like to the parent
        raise RuntimeError("CrashingStage only crashes worker processes")


class HangOnceStage(Stage):
    """Hangs on its first call while the file named by $HANG_ONCE_FLAG does not exist (and creates it);
    from then on, in any process, it halves its input: a processed chunk differs from the input."""

    name = "denoise"

    def process(self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext) -> torch.Tensor:
        flag = Path(os.environ["HANG_ONCE_FLAG"])
        if not flag.exists():
            flag.write_text("hung")
            time.sleep(10.0)
        return audio * 0.5



# The simulated accelerator's state lives in a file named by $FLAKY_GPU_FLAG, so that it reaches the
# stage wherever the executor runs it (a thread of this process, or its worker process).
FAULTS = {
    "cuda-error": lambda: RuntimeError("CUDA error: unspecified launch failure\nCUDA kernel errors might be "
                                       "reported asynchronously at some other API call"),
    "out-of-memory": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "accelerator-error": lambda: torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
}
TONE_HZ = 1000.0


def _flag() -> Path:
    return Path(os.environ.get("FLAKY_GPU_FLAG") or Path(tempfile.gettempdir()) / f"flaky-gpu-{os.getpid()}")


def lose_gpu(fault: str = "cuda-error", unreachable: bool = False) -> None:
    """From now on the simulated GPU fails with ``fault``; ``unreachable``: its memory cannot be read back."""
    _flag().write_text(f"{fault} {'unreachable' if unreachable else 'readable'}")


def reset_gpu() -> None:
    _flag().unlink(missing_ok=True)


def _gpu_state() -> tuple[str, bool] | None:
    try:
        fault, access = _flag().read_text().split()
    except (OSError, ValueError):
        return None
    return fault, access == "unreachable"


class FlakyGpuStage(Stage):
    """Pretends to run on a GPU that disappears: the real part (a CUDA device) cannot run in CI.

    Its output is a 1 kHz tone, phase-continuous per stream (the per-stream
    state), so a listener can tell processed audio from passed-through input.
    An instance made before :func:`lose_gpu` is "on the GPU": afterwards each
    of its calls raises what torch raises once a CUDA device is lost.
    ``to_device("cpu")`` (the executor's fallback) brings it back, or raises
    too when the GPU is unreachable, so the executor has to load a new
    instance, which is made on the CPU.
    """

    name = "limiter"

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__(device)
        self.on_gpu = _gpu_state() is None

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {"phase": torch.zeros((), dtype=torch.float64)}

    def to_device(self, device: str | torch.device) -> None:
        state = _gpu_state()
        if self.on_gpu and state is not None and state[1]:
            raise FAULTS["accelerator-error"]()
        super().to_device(device)
        self.on_gpu = torch.device(device).type != "cpu"

    def process(self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext) -> torch.Tensor:
        if self.on_gpu:
            state = _gpu_state()
            if state is not None:
                raise FAULTS[state[0]]()
        slots = self.slots(streams)
        phase = self.state["phase"].index_select(0, slots)
        t = phase[:, None] + torch.arange(audio.shape[1], dtype=torch.float64)
        period = 48_000.0 / TONE_HZ
        self.state["phase"].index_copy_(0, slots, torch.remainder(phase + audio.shape[1], period))
        return (0.3 * torch.sin(2 * torch.pi * t / period)).to(audio.dtype)


class HalvingStage(Stage):
    """Halves its input: cheap to run whatever cost the admission tests declare for it
    (``ExecutorConfig.stage_costs``), and a processed chunk differs from the input."""

    name = "denoise"

    def process(self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext) -> torch.Tensor:
        return audio * 0.5
