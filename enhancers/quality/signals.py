"""Cheap continuous quality signals of one stream: speech level, SNR, clipping, VAD speech ratio.

Fed blocks of 10 ms chunks (48 kHz mono float32, ``[n, 480]``), before and after enhancement.
Per chunk: its mean power, its peak, and a voice-activity decision (WebRTC VAD, aggressiveness
2, on the *input* chunk, so both sides are gated by the same decisions).  Over a sliding window
of the last ``window_chunks`` chunks (default 500: 5 s):

- ``level_dbfs``: active speech level, the mean power of the speech chunks (dB re full scale,
  a full-scale sine is -3 dBFS);
- ``noise_dbfs``: the noise floor, the mean power of the non-speech chunks; when fewer than 10 %
  of the chunks are non-speech (continuous babble), the 10th percentile of all chunk powers;
- ``snr_db``: ``10 log10((speech - noise) / noise)`` (speech power includes the noise under it);
- ``clipping``: share of samples at or above 0.99 of full scale;
- ``speech_ratio``: share of chunks the VAD calls speech.

Everything is vectorised per block; one block of 100 chunks costs ~0.3 ms of CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNK = 480
SAMPLE_RATE = 48_000
_EPS = 1e-12
CLIP_LEVEL = 0.99


def _db(power: float) -> float:
    return float(10.0 * np.log10(max(power, _EPS)))


@dataclass(frozen=True)
class SideSignals:
    """The continuous signals of one side (before or after enhancement) over the window."""

    level_dbfs: float
    noise_dbfs: float
    snr_db: float
    clipping: float
    speech_ratio: float

    def as_dict(self) -> dict[str, float]:
        return {"level_dbfs": round(self.level_dbfs, 1), "noise_dbfs": round(self.noise_dbfs, 1),
                "snr_db": round(self.snr_db, 1), "clipping": round(self.clipping, 5),
                "speech_ratio": round(self.speech_ratio, 3)}


class _Window:
    """Per-chunk power, clipped-sample count and VAD flag of the last ``n`` chunks (a ring)."""

    def __init__(self, n: int) -> None:
        self.power = np.zeros(n)
        self.clipped = np.zeros(n)
        self.speech = np.zeros(n, dtype=bool)
        self.filled = 0
        self.pos = 0

    def push(self, power: np.ndarray, clipped: np.ndarray, speech: np.ndarray) -> None:
        n = len(self.power)
        for i in range(0, len(power), n):  # a block longer than the window keeps its tail
            p, c, s = power[i:i + n], clipped[i:i + n], speech[i:i + n]
            idx = (self.pos + np.arange(len(p))) % n
            self.power[idx], self.clipped[idx], self.speech[idx] = p, c, s
            self.pos = int((self.pos + len(p)) % n)
            self.filled = min(n, self.filled + len(p))

    def signals(self) -> SideSignals:
        k = self.filled
        power, speech, clipped = self.power[:k], self.speech[:k], self.clipped[:k]
        if k == 0:
            return SideSignals(-100.0, -100.0, 0.0, 0.0, 0.0)
        quiet = power[~speech]
        noise = float(quiet.mean()) if len(quiet) >= max(1, k // 10) else float(np.percentile(power, 10))
        loud = power[speech]
        speech_pow = float(loud.mean()) if len(loud) else noise
        snr = _db(max(speech_pow - noise, 1e-3 * max(noise, _EPS))) - _db(noise) if noise > _EPS else 60.0
        return SideSignals(level_dbfs=_db(speech_pow), noise_dbfs=_db(noise), snr_db=float(min(snr, 60.0)),
                           clipping=float(clipped.sum() / (k * CHUNK)), speech_ratio=float(speech.mean()))


class SignalTracker:
    """Owns one stream's continuous signals, before and after enhancement, and its VAD state."""

    def __init__(self, window_chunks: int = 500, aggressiveness: int = 2) -> None:
        import webrtcvad

        self._vad = webrtcvad.Vad(int(aggressiveness))
        self.before = _Window(window_chunks)
        self.after = _Window(window_chunks)

    def vad(self, chunks: np.ndarray) -> np.ndarray:
        """WebRTC VAD decision per 10 ms chunk of ``chunks`` ``[n, 480]``."""
        pcm = (np.clip(chunks, -1.0, 1.0) * 32767.0).astype(np.int16)
        return np.array([self._vad.is_speech(row.tobytes(), SAMPLE_RATE) for row in pcm], dtype=bool)

    def push(self, before: np.ndarray, after: np.ndarray | None = None) -> None:
        """One block of chunks ``[n, 480]``; ``after`` None: enhancement left the audio as it was."""
        speech = self.vad(before)
        for window, block in ((self.before, before), (self.after, before if after is None else after)):
            block = block.astype(np.float64, copy=False)
            window.push((block * block).mean(axis=1), (np.abs(block) >= CLIP_LEVEL).sum(axis=1), speech)

    def signals(self) -> tuple[SideSignals, SideSignals]:
        """(before, after) over the window."""
        return self.before.signals(), self.after.signals()
