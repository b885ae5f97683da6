"""Loading the executor's shared stage instances off the event loop.

Constructing a stage can take a while (weights, JIT, model files), so it runs
on a dedicated loader thread while audio keeps flowing; streams asking for a
stage that is still loading run without it until it is ready.  Each spec is
loaded once and shared by every stream.  :class:`LoadClock` tells the
executor when a load is running: a worker starved by one is not stuck.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from enhancers.compute_threads import limit_compute_threads
from enhancers.registry import create_stage, load_stage_class
from enhancers.stage import Stage

log = logging.getLogger("enhancers.executor")


def resolve_device(name: str) -> torch.device:
    """``"auto"``: cuda when torch sees a GPU, else cpu; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def options_for(options: Mapping[str, Mapping[str, Any]] | None, spec: str) -> dict[str, Any]:
    """Options for ``spec``: keyed by the full spec, else by its kind (``denoise``)."""
    if not options:
        return {}
    return dict(options.get(spec, options.get(spec.split(":", 1)[0], {})))


class LoadClock:
    """When the stage load running now began and the last one ended (written by the one loader thread)."""

    def __init__(self) -> None:
        self.active = 0
        self.started = 0.0  # monotonic
        self.ended = 0.0

    def begin(self) -> None:
        self.started = time.monotonic()
        self.active += 1

    def end(self) -> None:
        self.ended = time.monotonic()
        self.active -= 1

    def loading(self, now: float, timeout_s: float) -> bool:
        """A load is running, for less than ``timeout_s`` so far."""
        return self.active > 0 and now - self.started < timeout_s


class StageLoader:
    """Owns the loader thread and one load future per spec; reports each result once.

    ``on_loaded(spec, stage)`` runs on the event loop when a load finishes
    (``stage`` is None when it failed; awaiting :meth:`wait` raises why).
    """

    def __init__(
        self,
        device: torch.device,
        stage_options: Mapping[str, Mapping[str, Any]],
        torch_threads: int,
        on_loaded: Callable[[str, Stage | None], None],
    ) -> None:
        self.device = device
        self.stage_options = stage_options
        self.torch_threads = torch_threads
        self.on_loaded = on_loaded
        self.loaded: dict[str, Stage] = {}
        self._loads: dict[str, asyncio.Future[Stage]] = {}
        self._declared: dict[str, int] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stage-loader")
        self.clock = LoadClock()

    def request(self, spec: str, loop: asyncio.AbstractEventLoop) -> None:
        """Start loading ``spec`` unless it is loading or loaded already."""
        if spec in self._loads:
            return
        kwargs = options_for(self.stage_options, spec)
        future = loop.run_in_executor(self._pool, self._construct, spec, kwargs)
        self._loads[spec] = future
        future.add_done_callback(functools.partial(self._done, spec))

    def reload(self, specs: list[str], loop: asyncio.AbstractEventLoop) -> None:
        """Construct ``specs`` again (on the current ``device``): the accelerator holding them failed."""
        for spec in specs:
            self.loaded.pop(spec, None)
            self._loads.pop(spec, None)
            self.request(spec, loop)

    async def wait(self, spec: str) -> Stage:
        """The loaded instance of a requested ``spec``; raises what its construction raised."""
        return await asyncio.shield(self._loads[spec])

    def declared_latency(self, spec: str) -> int:
        """The instance's ``latency_samples`` once loaded, the class attribute before."""
        stage = self.loaded.get(spec)
        if stage is not None:
            return int(stage.latency_samples)
        if spec not in self._declared:
            try:
                self._declared[spec] = int(load_stage_class(spec).latency_samples)
            except Exception:  # noqa: BLE001 - unloadable: the load itself will report why
                self._declared[spec] = 0
        return self._declared[spec]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _construct(self, spec: str, kwargs: dict[str, Any]) -> Stage:
        limit_compute_threads(self.torch_threads)
        self.clock.begin()
        try:
            return create_stage(spec, device=str(self.device), **kwargs)
        finally:
            self.clock.end()

    def _done(self, spec: str, future: asyncio.Future[Stage]) -> None:
        if future.cancelled() or self._loads.get(spec) is not future:
            return  # cancelled, or superseded by a reload
        exc = future.exception()
        if exc is not None:
            log.error("stage %r failed to load: %s: %s", spec, type(exc).__name__, exc)
            self.on_loaded(spec, None)
            return
        self.loaded[spec] = future.result()
        self.on_loaded(spec, self.loaded[spec])
