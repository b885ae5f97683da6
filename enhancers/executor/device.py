"""Losing the accelerator mid-run: recognising it, and moving the stages to the CPU.

A GPU can disappear under a running server (driver reset, Xid error, the
card falling off the bus, another process taking all its memory).  torch
then raises from whatever call touches it: ``torch.OutOfMemoryError``,
``torch.AcceleratorError`` or a plain ``RuntimeError("CUDA error: ...")``,
and after a sticky error every later call on that device fails the same way.
:func:`is_device_error` recognises those; :func:`move_stage` moves one stage's
weights and every stream's state to another device in place (what
``Stage.to_device`` does by default), which works while the device still
answers (out of memory) and raises when it does not, in which case the
executor loads a fresh instance of the stage on the CPU instead
(:meth:`enhancers.executor.batch.BatchRunner.fall_back_to_cpu`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from enhancers.stage import Stage, StageStream
from enhancers.tensor_device import moved, packages_of

# Substrings of the messages torch (and the CUDA/ROCm libraries under it) raise for a failed or lost device
DEVICE_ERROR_MARKERS = (
    "CUDA error",
    "CUDA out of memory",
    "CUDA driver",
    "CUDA-capable device",
    "device-side assert",
    "CUBLAS_STATUS_",
    "CUDNN_STATUS_",
    "cuDNN error",
    "CUFFT_",
    "HIP error",
    "NCCL error",
)

CPU = torch.device("cpu")


def is_device_error(exc: BaseException | None) -> bool:
    """True when ``exc`` (or an exception it was raised from) says the accelerator failed."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        if accelerator_error is not None and isinstance(exc, accelerator_error):
            return True
        if isinstance(exc, RuntimeError) and any(m in str(exc) for m in DEVICE_ERROR_MARKERS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def move_stage(stage: Stage, handles: Iterable[StageStream], device: torch.device = CPU) -> None:
    """Move ``stage`` (weights, batched state) and its streams' native state to ``device``, in place.

    Raises whatever the copy raises (a lost device cannot be read back).
    """
    stage.to_device(device)
    packages = packages_of(stage)
    for handle in handles:
        if handle.native is not None:
            handle.native = moved(handle.native, device, packages, set())
