"""The optional intelligibility SLI of the live quality sampler: a word error rate per sampled window.

With ``QualityConfig.wer_every`` = k > 0, every k-th scored DNSMOS window of a stream whose stages
change its audio also becomes an intelligibility pair: the window's audio before and after the
stages, transcribed by Whisper tiny.en in the scorer process (``enhancers.quality.scorer_process``,
``enhancers.eval.asr.intelligibility_wer``), and the WER of the "after" transcript against the
"before" one.  Its CPU is reserved and charged in the scorer's budget with the window's
(``mediaserver.quality_budget``).  This module holds what the monitor needs for it: the aligned pair
(``aligned_pair``), the report kept per stream (``WerReport``) and the outcome counters
(``WerCounters``).  No transcript reaches the media process.

Alignment: the "after" of a chunk is what the stages returned for it; a stage with look-ahead
(DF3: 30 ms, declared as ``latency_samples``) returns the audio of an earlier input, so the
window's "after" lags its "before" by the pipeline's latency.  The pair drops that many samples from
the end of "before" and from the start of "after", so both hold the same speech, sample for sample.
(A misalignment of tens of ms would only move a word at the window's edges: Whisper is tolerant to
it, but a cut word at an edge is then cut differently on the two sides and counted as an error.)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    from enhancers.eval.asr import IntelligibilityConfig
    from mediaserver.config import QualityConfig
    from mediaserver.quality_tap import _Block

WER_RESULTS = ("scored", "few_words", "failed")
log = logging.getLogger("mediaserver.quality")


@dataclass(frozen=True)
class WerReport:
    """The last intelligibility pair of one stream: WER of its enhanced audio against its input."""

    wer: float  # word errors of the "after" transcript over the words of the "before" one (0: every word kept)
    words: int  # words the recogniser heard in the input excerpt
    stages: str  # the stage set that ran on the window
    pairs: int  # pairs scored so far on this stream
    at: float  # time.monotonic() when scored

    def as_dict(self, now: Optional[float] = None) -> dict[str, Any]:
        """The ``quality.wer`` object of ``stats`` (docs/PROTOCOL.md)."""
        now = time.monotonic() if now is None else now
        return {"wer": round(self.wer, 3), "words": self.words, "stages": self.stages, "pairs": self.pairs,
                "age_s": round(now - self.at, 1)}


@dataclass
class WerCounters:
    """Intelligibility pairs of the whole monitor by outcome, and the scorer CPU they cost."""

    results: dict[str, int] = field(default_factory=lambda: dict.fromkeys(WER_RESULTS, 0))
    cpu_s: float = 0.0
    last_error: str = ""

    def record(self, answer: Any, stages: str, pairs: int, now: float) -> Optional[WerReport]:
        """Count one answer of the scorer (``enhancers.quality.scorer_process.WerAnswer``) for a stream that had
        ``pairs`` pairs scored so far; the stream's new report when this one was scored."""
        self.cpu_s += answer.cpu_s
        if answer.error:
            self.results["failed"] += 1
            if answer.error != self.last_error:  # logged once per distinct error, not once per window
                log.error("intelligibility pair failed: %s", answer.error)
                self.last_error = answer.error
            return None
        if answer.wer is None:
            self.results["few_words"] += 1  # silence or non-speech: such pairs must not count
            return None
        self.results["scored"] += 1
        return WerReport(float(answer.wer), int(answer.words), stages, pairs + 1, now)

    def stats(self, every: int) -> dict[str, Any]:
        pairs = self.results["scored"] + self.results["few_words"] + self.results["failed"]
        return {"every": every, "pairs": dict(self.results), "cpu_s": round(self.cpu_s, 3),
                "cpu_per_pair_s": round(self.cpu_s / pairs, 3) if pairs else None,
                "last_error": self.last_error or None}


def intelligibility_config(config: "QualityConfig") -> Optional["IntelligibilityConfig"]:
    """What the scorer process transcribes with, or None when the SLI is off (``wer_every`` 0)."""
    if config.wer_every <= 0:
        return None
    from enhancers.eval.asr import IntelligibilityConfig

    # the whole window (intelligibility_wer cuts its excerpts to sample_seconds)
    return IntelligibilityConfig(enabled=True, sample_seconds=float(config.window_s) + 1.0,
                                 min_words=config.wer_min_words, threads=config.threads)


def wants_pair(blocks: Sequence["_Block"]) -> bool:
    """Whether a window can be an intelligibility pair at all: it ran stages, and they changed its audio."""
    return bool(blocks) and blocks[0].stages != "none" and any(b.after is not None for b in blocks)


def aligned_pair(blocks: Sequence["_Block"]) -> tuple[np.ndarray, np.ndarray]:
    """The window's audio before and after its stages, ``after`` shifted back by the stages' latency."""
    before = np.concatenate([b.before for b in blocks]).reshape(-1)
    after = np.concatenate([b.before if b.after is None else b.after for b in blocks]).reshape(-1)
    lag = min(max(b.latency for b in blocks), len(before) // 2)
    if lag > 0:
        before, after = before[:-lag], after[lag:]
    return before, after
