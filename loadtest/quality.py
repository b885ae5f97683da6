"""DNSMOS P.835 of received audio, from the ONNX models the ``speechmos`` wheel ships.

The load test scores what subscribers actually heard (after the server's
enhancement, Opus and the network) and, as a baseline, what the publisher
sent over the same span.  Scores are SIG (speech), BAK (background noise),
OVRL (overall) on the 1-5 MOS scale, plus the P.808 overall estimate.
"""

from __future__ import annotations

import os
from math import gcd
from typing import Any, Optional

import numpy as np
from scipy.signal import resample_poly

RATE = 48_000
DNSMOS_RATE = 16_000
MIN_SECONDS = 3.0  # shorter clips are not scored: DNSMOS tiles them to 9 s, which says little
MAX_SECONDS = 12.0  # longer clips are cut: the score is a mean over 9 s hops anyway

_model: Any = None


def _dnsmos() -> Any:
    global _model
    if _model is None:
        import speechmos.dnsmos as dm

        base = os.path.join(os.path.dirname(dm.__file__), "dnsmos_models")
        _model = dm.DNSMOS(os.path.join(base, "sig_bak_ovr.onnx"), os.path.join(base, "model_v8.onnx"))
    return _model


def dnsmos(audio: np.ndarray, rate: int = RATE) -> Optional[dict[str, float]]:
    """``{"sig", "bak", "ovrl", "p808"}`` of ``audio``, or None when there is too little of it."""
    if len(audio) < MIN_SECONDS * rate:
        return None
    x = audio[-int(MAX_SECONDS * rate):].astype(np.float64)
    if rate != DNSMOS_RATE:
        g = gcd(rate, DNSMOS_RATE)
        x = resample_poly(x, DNSMOS_RATE // g, rate // g)
    x = np.clip(x, -1.0, 1.0).astype(np.float32)
    out = _dnsmos()(x, DNSMOS_RATE, False)
    return {"sig": round(float(out["sig_mos"]), 3), "bak": round(float(out["bak_mos"]), 3),
            "ovrl": round(float(out["ovrl_mos"]), 3), "p808": round(float(out["p808_mos"]), 3)}
