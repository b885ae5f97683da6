"""The quality monitor's windows: per-stream state, a captured window, its report, and a batch of windows
as the scorer process takes it (DNSMOS clips and intelligibility pairs) and answers it.

A window is ``window_s`` clean 1 s blocks of one stage set (``mediaserver/quality_tap.py``).  In a batch
it is one DNSMOS clip (no stage changed its audio: its "after" is its "before") or two (before, after),
and, when it was picked for the intelligibility SLI (``mediaserver/quality_wer.py``), one pair.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from mediaserver.quality_tap import QualityTap, _Block
from mediaserver.quality_wer import WerReport, aligned_pair


@dataclass(frozen=True)
class QualityReport:
    """The last DNSMOS window of one stream, before and after enhancement."""

    stream: str
    room: str
    stages: str  # the stage set that ran on the window ("none": no stages)
    before: Any  # enhancers.quality.MosScore
    after: Any
    windows: int  # windows scored so far on this stream
    at: float  # time.monotonic() when scored
    wer: Optional[WerReport] = None  # the window's intelligibility pair, when it was one and had enough words


@dataclass
class _StreamState:
    tap: QualityTap
    tracker: Any  # enhancers.quality.SignalTracker
    room: str
    seen: int = 0  # blocks seen
    next_window: int = 0  # block index from which the stream is due its next window (period_s)
    capture: list[_Block] = field(default_factory=list)
    windows: int = 0
    reserved: Optional[float] = None  # a window granted by the budget (CPU seconds reserved), being captured
    granted_at: int = 0  # block index of the grant
    stage_windows: int = 0  # windows captured with stages that changed the audio (wer_every counts these)
    wer_pairs: int = 0  # intelligibility pairs scored


@dataclass
class _Window:
    state: _StreamState
    stream: str
    blocks: list[_Block]
    reserved: float
    wer: bool = False  # also an intelligibility pair

    @property
    def clips(self) -> int:
        """DNSMOS clips: 2 (before, after), or 1 when no stage changed the window's audio."""
        return 2 if any(b.after is not None for b in self.blocks) else 1


def batch_inputs(windows: list[_Window]) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """The DNSMOS clips of ``windows`` in order (before[, after] each) and their intelligibility pairs."""
    clips: list[np.ndarray] = []
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    for w in windows:
        clips.append(np.concatenate([b.before for b in w.blocks]).reshape(-1))
        if w.clips == 2:
            clips.append(np.concatenate([b.before if b.after is None else b.after for b in w.blocks]).reshape(-1))
        if w.wer:
            pairs.append(aligned_pair(w.blocks))
    return clips, pairs


def batch_answers(windows: list[_Window], scores: list[Any],
                  wers: list[Any]) -> Iterator[tuple[_Window, Any, Any, Any]]:
    """Per window of a batch: (window, before score, after score, its ``WerAnswer`` or None)."""
    i = j = 0
    for w in windows:
        two = w.clips == 2
        before, after = scores[i], scores[i + 1] if two else scores[i]
        i += w.clips
        answer = wers[j] if w.wer and j < len(wers) else None
        j += 1 if w.wer else 0
        yield w, before, after, answer
