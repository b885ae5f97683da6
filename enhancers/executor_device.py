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
executor loads a fresh instance of the stage on the CPU instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from enhancers.stage import Stage, StageStream

if TYPE_CHECKING:
    from enhancers.executor_worker import BatchRunner

log = logging.getLogger("enhancers.executor")

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

_CPU = torch.device("cpu")


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


def fall_back_to_cpu(runner: BatchRunner, exc: BaseException) -> None:
    """Worker thread, the accelerator failed: batches on the CPU from now on, every stage moved there.

    A stage that cannot be moved is disabled (its streams pass through) until
    the fresh CPU instance ``runner.reload`` asked for is loaded.
    """
    lost = runner.device
    runner.fell_back = True
    runner.use_device(_CPU)
    runner.counters["device_fallbacks"] += 1
    moved_specs, failed = [], []
    for spec, runtime in runner.stages.items():
        handles = [own[spec] for own in runner.handles.values() if spec in own]
        if move_to_cpu(runner, spec, runtime.stage, handles):
            moved_specs.append(spec)
        else:
            runtime.disabled = True
            failed.append(spec)
    log.error("executor: accelerator error on %s (%s: %s); falling back to cpu: moved %s, reloading %s",
              lost, type(exc).__name__, str(exc)[:200], moved_specs or "nothing", failed or "nothing")


def move_to_cpu(runner: BatchRunner, spec: str, stage: Stage, handles: list[StageStream]) -> bool:
    """Move one stage to the CPU in place; False, and a reload requested, when that fails."""
    try:
        move_stage(stage, handles, _CPU)
        return True
    except Exception as exc:  # noqa: BLE001 - a lost device cannot be read back: load it afresh
        runner.errors.error(f"move:{spec}", f"stage {spec!r} could not be moved to the cpu; reloading it", exc)
        if runner.reload is not None:
            runner.reload([spec])
        return False


def move_stage(stage: Stage, handles: Iterable[StageStream], device: torch.device = _CPU) -> None:
    """Move ``stage`` (weights, batched state) and its streams' native state to ``device``, in place.

    Raises whatever the copy raises (a lost device cannot be read back).
    """
    stage.to_device(device)
    packages = _packages(stage)
    for handle in handles:
        if handle.native is not None:
            handle.native = moved(handle.native, device, packages, set())


def move_tensors(obj: Any, device: torch.device) -> None:
    """Move every tensor and module held by ``obj`` (recursively, see :func:`moved`) to ``device``."""
    _move_attributes(obj, device, _packages(obj), set())


def _packages(obj: Any) -> frozenset[str]:
    """Top-level packages whose objects the walk enters: the project's and the object's own."""
    return frozenset({"enhancers", type(obj).__module__.split(".")[0]})


def moved(value: Any, device: torch.device, packages: frozenset[str], seen: set[int]) -> Any:
    """``value`` with its tensors on ``device``.

    Tensors are copied, modules moved in place (parameters, buffers and plain
    tensor attributes), dicts and lists updated in place, tuples rebuilt,
    ``torch.device`` values replaced; objects of the project's own classes
    (``packages``) are walked attribute by attribute.  Anything else (numpy
    arrays, native handles, library objects) is left as it is.
    """
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, torch.device):
        return device
    if isinstance(value, (str, bytes, int, float, bool, type(None))):
        return value
    if id(value) in seen:
        return value
    seen.add(id(value))
    if isinstance(value, torch.nn.Module):
        value.to(device)
        for module in value.modules():
            _move_attributes(module, device, packages, seen, plain_tensors_only=True)
        return value
    if isinstance(value, dict):
        for key, item in list(value.items()):
            new = moved(item, device, packages, seen)
            if new is not item:  # write back only what changed (another thread may own the rest)
                value[key] = new
        return value
    if isinstance(value, list):
        for i, item in enumerate(list(value)):
            new = moved(item, device, packages, seen)
            if new is not item:
                value[i] = new
        return value
    if isinstance(value, tuple):
        items = [moved(item, device, packages, seen) for item in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if type(value).__module__.split(".")[0] in packages and hasattr(value, "__dict__"):
        _move_attributes(value, device, packages, seen)
    return value


def _move_attributes(obj: Any, device: torch.device, packages: frozenset[str], seen: set[int],
                     plain_tensors_only: bool = False) -> None:
    seen.add(id(obj))
    for name, value in list(vars(obj).items()):
        if plain_tensors_only:
            if name.startswith("_") or not isinstance(value, torch.Tensor):
                continue  # a module's parameters and buffers were moved by Module.to
        new = moved(value, device, packages, seen)
        if new is not value:
            object.__setattr__(obj, name, new)
