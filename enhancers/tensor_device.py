"""Moving the tensors an object holds to another device, in place (``Stage.to_device``'s default).

Kept apart from the executor so the stage base class can use it without
importing the executor (which imports the stages).
"""

from __future__ import annotations

from typing import Any

import torch


def move_tensors(obj: Any, device: torch.device) -> None:
    """Move every tensor and module held by ``obj`` (recursively, see :func:`moved`) to ``device``."""
    _move_attributes(obj, device, packages_of(obj), set())


def packages_of(obj: Any) -> frozenset[str]:
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
