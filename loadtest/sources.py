"""What each bot says: real speech recordings mixed with real noise, built deterministically.

Every process of a load test can rebuild any bot's published signal from its
index alone, so the subscriber side can compare what it heard with what was
sent without shipping audio between processes.  The clean speech component
is kept next to the mix: it is the template the latency marker is matched
against (see ``loadtest/marker.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

RATE = 48_000
SPEECH_RMS = 0.06  # about -24 dBFS per utterance: a normal talker level
EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "eval"


def default_dir(kind: str) -> Path | None:
    """``../shared/eval/<kind>`` relative to the repository, when it exists."""
    path = EVAL / kind
    return path if path.is_dir() else None


def read_mono_48k(path: Path) -> np.ndarray:
    """Any WAV/FLAC file as 48 kHz mono float32."""
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    mono = data.mean(axis=1)
    if rate != RATE:
        g = gcd(int(rate), RATE)
        mono = resample_poly(mono, RATE // g, int(rate) // g)
    return np.asarray(mono, dtype=np.float32)


def _audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".wav", ".flac", ".ogg"))


@dataclass(frozen=True)
class SourceConfig:
    """Where the recordings are and how they are mixed (picklable: it travels to worker processes)."""

    speech_dir: str | None = None
    noise_dir: str | None = None
    snr_db: float | None = None  # None: no noise
    seconds: float = 40.0  # length of each bot's signal before it loops
    seed: int = 1234

    def resolved(self) -> SourceConfig:
        speech = self.speech_dir or (str(default_dir("speech")) if default_dir("speech") else None)
        noise = self.noise_dir
        if noise is None and self.snr_db is not None and default_dir("noise") is not None:
            noise = str(default_dir("noise"))
        return SourceConfig(speech, noise, self.snr_db, self.seconds, self.seed)


@dataclass(frozen=True)
class PublishedSignal:
    """One bot's published audio (``mix``) and its clean speech component, both 48 kHz float32."""

    mix: np.ndarray
    speech: np.ndarray


class SourceLibrary:
    """Owns the loaded speech and noise recordings; builds each bot's signal from its index."""

    def __init__(self, config: SourceConfig) -> None:
        self.config = config.resolved()
        if not self.config.speech_dir:
            raise FileNotFoundError("no speech recordings: pass --speech DIR (default ../shared/eval/speech)")
        files = _audio_files(Path(self.config.speech_dir))
        if not files:
            raise FileNotFoundError(f"no audio files in {self.config.speech_dir}")
        self.utterances = [self._level(read_mono_48k(p)) for p in files]
        self.noise_files: list[Path] = []
        self._noises: dict[Path, np.ndarray] = {}
        if self.config.snr_db is not None:
            if not self.config.noise_dir:
                raise FileNotFoundError("--snr given but no noise recordings: pass --noise DIR")
            self.noise_files = _audio_files(Path(self.config.noise_dir))
            if not self.noise_files:
                raise FileNotFoundError(f"no noise files in {self.config.noise_dir}")
        self._signals: dict[int, PublishedSignal] = {}

    @staticmethod
    def _level(x: np.ndarray) -> np.ndarray:
        frames = x[: len(x) // 480 * 480].reshape(-1, 480)
        energy = np.mean(frames * frames, axis=1)
        active = energy > 0.01 * float(np.max(energy)) if len(energy) else np.zeros(0, dtype=bool)
        rms = float(np.sqrt(np.mean(energy[active]))) if active.any() else float(np.std(x)) + 1e-9
        return (x * (SPEECH_RMS / (rms + 1e-9))).astype(np.float32)

    def noise(self, index: int) -> np.ndarray:
        """Noise recording ``index`` (looping over the folder), loaded on first use."""
        path = self.noise_files[index % len(self.noise_files)]
        if path not in self._noises:
            x = read_mono_48k(path)
            if len(x) < RATE // 10 or float(np.std(x)) < 1e-6:
                raise ValueError(f"noise recording {path} is too short or silent")
            self._noises[path] = x
        return self._noises[path]

    def signal(self, index: int) -> PublishedSignal:
        """Bot ``index``'s signal: utterances in a rotated order with pauses, plus noise at the SNR."""
        if index not in self._signals:
            self._signals[index] = self._build(index)
        return self._signals[index]

    def _build(self, index: int) -> PublishedSignal:
        rng = np.random.default_rng(self.config.seed + 7919 * index)
        n_total = int(self.config.seconds * RATE)
        parts: list[np.ndarray] = []
        length = 0
        k = index
        order = rng.permutation(len(self.utterances))
        while length < n_total:
            utt = self.utterances[int(order[k % len(order)])]
            pause = np.zeros(int(rng.uniform(0.2, 0.6) * RATE), dtype=np.float32)
            parts += [utt, pause]
            length += len(utt) + len(pause)
            k += 1
        speech = np.concatenate(parts)[:n_total]
        speech = speech[: len(speech) // 960 * 960]  # whole 20 ms frames: loops stay frame-aligned
        mix = speech.copy()
        if self.noise_files:
            noise = self.noise(index)
            start = int(rng.integers(0, len(noise)))
            reps = int(np.ceil((start + len(speech)) / len(noise)))
            bed = np.tile(noise, reps)[start:start + len(speech)]
            bed_rms = float(np.sqrt(np.mean(bed * bed))) + 1e-9
            gain = SPEECH_RMS / bed_rms * 10 ** (-float(self.config.snr_db or 0.0) / 20)
            mix = mix + gain * bed
        peak = float(np.max(np.abs(mix)))
        if peak > 0.95:
            scale = 0.95 / peak
            mix, speech = mix * scale, speech * scale
        return PublishedSignal(mix=mix.astype(np.float32), speech=speech.astype(np.float32))
