"""DNSMOS P.835 (SIG, BAK, OVRL) on short windows of live audio, batched over streams.

The model is the ``sig_bak_ovr.onnx`` the installed ``speechmos`` wheel ships (Microsoft's
DNSMOS P.835, non-personalized), run with ONNX Runtime directly so that windows of many streams
go through one call.  The scoring follows ``speechmos.dnsmos`` exactly where it matters: 16 kHz
input, a clip shorter than the model's 9.01 s input is repeated (``np.append(x, x)``) until it
is long enough, and the raw outputs go through the same third-order polynomials.  One thing
differs: ``speechmos`` averages over every 9.01 s segment at 1 s hops, which on a repeated 4 s
clip is seven nearly identical segments; here ``max_segments`` of them are scored (default 1,
a seventh of the cost: one segment costs ~0.4 s of one core).  The P.808 model that
``speechmos`` also runs is not used.

Inputs are 48 kHz (the server's internal rate) and decimated to 16 kHz with the same
polyphase filter as ``enhancers.audio_io.resample``.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np

MODEL_RATE = 16_000
INPUT_LENGTH_S = 9.01
INPUT_SAMPLES = int(INPUT_LENGTH_S * MODEL_RATE)  # 144160
MAX_BATCH = 1  # segments per model call: on CPU a batch costs the same per segment, and 4 at once need
# ~720 MiB of activations against ~450 MiB for one (measured, ONNX Runtime 1.x, CPU arena on)

# speechmos.dnsmos.DNSMOS.get_polyfit_val, non-personalized
_P_SIG = np.poly1d([-0.08397278, 1.22083953, 0.0052439])
_P_BAK = np.poly1d([-0.13166888, 1.60915514, -0.39604546])
_P_OVR = np.poly1d([-0.06766283, 1.11546468, 0.04602535])


@dataclass(frozen=True)
class MosScore:
    """DNSMOS P.835 of one window: signal, background and overall, 1 (bad) to 5 (excellent)."""

    sig: float
    bak: float
    ovrl: float

    def as_dict(self) -> dict[str, float]:
        return {"sig": round(self.sig, 3), "bak": round(self.bak, 3), "ovrl": round(self.ovrl, 3)}


def model_path() -> str:
    """The P.835 model file inside the installed ``speechmos`` wheel."""
    import speechmos

    return os.path.join(os.path.dirname(speechmos.__file__), "dnsmos_models", "sig_bak_ovr.onnx")


def to_model_rate(audio: np.ndarray, rate: int) -> np.ndarray:
    """``audio`` at 16 kHz float32 (polyphase FIR, as ``enhancers.audio_io.resample``)."""
    from enhancers.audio_io import resample

    return resample(np.asarray(audio, dtype=np.float32), rate, MODEL_RATE)


def segments(x16: np.ndarray, max_segments: int = 1) -> list[np.ndarray]:
    """The model inputs ``speechmos`` would score for ``x16`` (16 kHz), at most ``max_segments``."""
    x = np.asarray(x16, dtype=np.float32)
    if len(x) == 0:
        x = np.zeros(MODEL_RATE, dtype=np.float32)
    while len(x) < INPUT_SAMPLES:
        x = np.append(x, x)
    hops = int(np.floor(len(x) / MODEL_RATE) - INPUT_LENGTH_S) + 1
    out = []
    for idx in range(hops):
        seg = x[idx * MODEL_RATE: idx * MODEL_RATE + INPUT_SAMPLES]
        if len(seg) == INPUT_SAMPLES:
            out.append(seg)
        if len(out) >= max_segments:
            break
    return out


class DnsmosModel:
    """Owns one ONNX Runtime session of the P.835 model, shared by every stream (thread-safe).

    ``threads`` bounds ONNX Runtime's intra-op threads (1: the scorer never takes more than one
    core from the media path).
    """

    def __init__(self, path: str | None = None, threads: int = 1, max_segments: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(path or model_path(), opts, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self.max_segments = max(1, int(max_segments))
        self._lock = threading.Lock()

    def score(self, clips: Sequence[np.ndarray], rate: int = 48_000) -> list[MosScore]:
        """One score per clip (any length; 48 kHz by default), all clips in one model call."""
        if not clips:
            return []
        segs: list[np.ndarray] = []
        owner: list[int] = []
        for i, clip in enumerate(clips):
            x16 = to_model_rate(clip, rate) if rate != MODEL_RATE else np.asarray(clip, dtype=np.float32)
            peak = float(np.max(np.abs(x16))) if len(x16) else 0.0
            if peak > 1.0:  # speechmos refuses samples outside [-1, 1]; offline evaluation normalises
                x16 = x16 / peak
            for seg in segments(x16, self.max_segments):
                segs.append(seg)
                owner.append(i)
        parts = []
        with self._lock:  # batches of MAX_BATCH: past that a call costs the same per segment on CPU
            for i in range(0, len(segs), MAX_BATCH):
                parts.append(self._session.run(None, {self._input: np.stack(segs[i:i + MAX_BATCH])})[0])
        raw = np.concatenate(parts)
        sums = np.zeros((len(clips), 3))
        counts = np.zeros(len(clips))
        for row, i in zip(raw, owner):
            sums[i] += (_P_SIG(row[0]), _P_BAK(row[1]), _P_OVR(row[2]))
            counts[i] += 1
        means = sums / np.maximum(counts, 1)[:, None]
        return [MosScore(float(m[0]), float(m[1]), float(m[2])) for m in means]


_shared: DnsmosModel | None = None
_shared_lock = threading.Lock()


def shared_model(threads: int = 1, max_segments: int = 1) -> DnsmosModel:
    """The process's one DNSMOS model (loaded on first use, ~1 MB of weights)."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared.max_segments != max(1, int(max_segments)):
            _shared = DnsmosModel(threads=threads, max_segments=max_segments)
        return _shared
