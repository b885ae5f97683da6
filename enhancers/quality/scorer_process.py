"""DNSMOS in a process of its own, so that its memory and CPU stay out of the media server's process.

One inference of the P.835 model needs a few hundred MiB of activations (ONNX Runtime, one 9.01 s
segment) and ~0.4 s of one core.  Run in the server's process, that memory appeared in the middle
of a call (the first quality window), and its Python work competed with the event loop for the GIL.
Here one spawned, niced worker owns the model; the caller's scorer thread hands it the clips of
one batch and waits for the scores.  The worker loads the model and runs one warm-up inference
before it answers ``ready``, so every allocation happens at start-up, not during a call.  A worker
that dies (killed, out of memory) is replaced on the next batch; that batch's scores are lost.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from enhancers.process_name import QUALITY_SCORER, set_process_name
from enhancers.quality.dnsmos import MODEL_RATE, MosScore, shared_model

log = logging.getLogger("enhancers.quality")


@dataclass(frozen=True)
class ScorerSettings:
    """What the worker process is started with (picklable: it crosses the process boundary)."""

    threads: int = 1
    nice: int = 10
    max_segments: int = 1


def _worker_init(settings: ScorerSettings) -> None:
    set_process_name(QUALITY_SCORER)
    if settings.nice > 0 and hasattr(os, "nice"):
        try:
            os.nice(settings.nice)
        except OSError:
            pass
    model = shared_model(threads=settings.threads, max_segments=settings.max_segments)
    model.score([np.zeros(MODEL_RATE, dtype=np.float32)], rate=MODEL_RATE)  # allocate everything now


def _score(clips: list[np.ndarray], rate: int, settings: ScorerSettings) -> list[MosScore]:
    return shared_model(threads=settings.threads, max_segments=settings.max_segments).score(clips, rate)


def _ping() -> int:
    return os.getpid()


class ScorerProcess:
    """Owns the worker process that holds the DNSMOS model; ``score`` blocks (call it from a thread)."""

    def __init__(self, settings: ScorerSettings | None = None) -> None:
        self.settings = settings or ScorerSettings()
        self._pool: ProcessPoolExecutor | None = None
        self.restarts = 0
        self.pid: int | None = None

    def _ensure(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_init, initargs=(self.settings,))
        return self._pool

    def start(self, timeout_s: float = 120.0) -> None:
        """Start the worker and wait until its model is loaded and warmed up."""
        self.pid = self._ensure().submit(_ping).result(timeout=timeout_s)

    def score(self, clips: Sequence[np.ndarray], rate: int = 48_000, timeout_s: float = 120.0) -> list[MosScore]:
        """One score per clip (see ``DnsmosModel.score``), computed in the worker process."""
        if not clips:
            return []
        pool = self._ensure()
        try:
            future: Future[list[MosScore]] = pool.submit(_score, [np.asarray(c, dtype=np.float32) for c in clips],
                                                         rate, self.settings)
            return future.result(timeout=timeout_s)
        except BrokenProcessPool:
            log.error("the quality scorer process died; it is started again")
            self._replace()
            raise
        except TimeoutError:
            log.error("the quality scorer process did not answer in %.0f s; it is started again", timeout_s)
            self._replace(kill=True)
            raise

    def _replace(self, kill: bool = False) -> None:
        pool, self._pool = self._pool, None
        self.restarts += 1
        if pool is not None:
            if kill:
                for proc in list(getattr(pool, "_processes", {}).values()):
                    proc.kill()
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
