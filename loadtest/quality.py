"""DNSMOS P.835 of received audio, from the ONNX model the ``speechmos`` wheel ships.

The load test scores what subscribers actually heard (after the server's
enhancement, Opus and the network) and, as a baseline, what the publisher
sent over the same span: SIG (speech), BAK (background noise) and OVRL
(overall) on the 1-5 MOS scale.

This follows ``speechmos.dnsmos`` (same ``sig_bak_ovr.onnx`` model, same
9.01 s input, same polynomial mapping) but runs the session on one thread:
onnxruntime's default spinning thread pool is very slow on a machine whose
cores are busy with the load test itself.  The P.808 figure (which needs a
librosa mel spectrogram and a second model) is left out.
"""

from __future__ import annotations

import os
from math import gcd
from typing import Any

import numpy as np
from scipy.signal import resample_poly

RATE = 48_000
DNSMOS_RATE = 16_000
INPUT_SECONDS = 9.01
MIN_SECONDS = 3.0  # shorter clips are not scored (DNSMOS would repeat them to 9 s)
MAX_SECONDS = 12.0  # longer clips: the last 12 s are scored
HOP_SECONDS = 3.0  # between the 9 s segments that are averaged

# speechmos' non-personalized P.835 mapping from the raw model outputs
_POLY = {"sig": np.poly1d([-0.08397278, 1.22083953, 0.0052439]),
         "bak": np.poly1d([-0.13166888, 1.60915514, -0.39604546]),
         "ovrl": np.poly1d([-0.06766283, 1.11546468, 0.04602535])}

_session: Any = None


def _model() -> Any:
    global _session
    if _session is None:
        import onnxruntime as ort
        import speechmos.dnsmos as dm

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        path = os.path.join(os.path.dirname(dm.__file__), "dnsmos_models", "sig_bak_ovr.onnx")
        _session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return _session


def dnsmos(audio: np.ndarray, rate: int = RATE) -> dict[str, float] | None:
    """``{"sig", "bak", "ovrl"}`` of ``audio``, or None when there is too little of it."""
    if len(audio) < MIN_SECONDS * rate:
        return None
    x = audio[-int(MAX_SECONDS * rate):].astype(np.float64)
    if rate != DNSMOS_RATE:
        g = gcd(rate, DNSMOS_RATE)
        x = resample_poly(x, DNSMOS_RATE // g, rate // g)
    x = np.clip(x, -1.0, 1.0).astype(np.float32)
    n = int(INPUT_SECONDS * DNSMOS_RATE)
    while len(x) < n:
        x = np.concatenate([x, x])
    hop = int(HOP_SECONDS * DNSMOS_RATE)
    segments = np.stack([x[i:i + n] for i in range(0, len(x) - n + 1, hop)])
    raw = _model().run(None, {"input_1": segments})[0]  # [segments, 3]: sig, bak, ovrl
    scores = {k: float(np.mean(_POLY[k](raw[:, i]))) for i, k in enumerate(("sig", "bak", "ovrl"))}
    return {k: round(v, 3) for k, v in scores.items()}
