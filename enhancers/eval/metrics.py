"""Objective quality metrics shared by all evaluations.

SI-SDR, wideband PESQ, STOI, DNSMOS (P.835 SIG/BAK/OVRL from the models the
``speechmos`` wheel ships) and ERLE.  Inputs are float32 mono arrays; every
function resamples to the rate its metric needs.
"""

from __future__ import annotations

import functools

import numpy as np

from enhancers.audio_io import resample


def align_lengths(*xs: np.ndarray) -> list[np.ndarray]:
    n = min(len(x) for x in xs)
    return [x[:n] for x in xs]


def si_sdr(estimate: np.ndarray, reference: np.ndarray) -> float:
    """Scale-invariant SDR in dB of ``estimate`` against ``reference``."""
    est, ref = align_lengths(estimate.astype(np.float64), reference.astype(np.float64))
    est = est - est.mean()
    ref = ref - ref.mean()
    alpha = float(np.dot(est, ref) / (np.dot(ref, ref) + 1e-12))
    target = alpha * ref
    noise = est - target
    return float(10 * np.log10((np.dot(target, target) + 1e-12) / (np.dot(noise, noise) + 1e-12)))


def pesq_wb(estimate: np.ndarray, reference: np.ndarray, rate: int) -> float:
    """Wideband PESQ (ITU-T P.862.2) at 16 kHz."""
    from pesq import pesq

    est = resample(estimate, rate, 16_000)
    ref = resample(reference, rate, 16_000)
    est, ref = align_lengths(est, ref)
    return float(pesq(16_000, ref, est, "wb"))


def stoi(estimate: np.ndarray, reference: np.ndarray, rate: int) -> float:
    from pystoi import stoi as _stoi

    est = resample(estimate, rate, 16_000)
    ref = resample(reference, rate, 16_000)
    est, ref = align_lengths(est, ref)
    return float(_stoi(ref, est, 16_000, extended=False))


@functools.lru_cache(maxsize=1)
def _dnsmos_model():  # type: ignore[no-untyped-def]
    import os

    import onnxruntime as ort
    import speechmos.dnsmos as dm

    base = os.path.join(os.path.dirname(dm.__file__), "dnsmos_models")
    model = dm.DNSMOS(os.path.join(base, "sig_bak_ovr.onnx"), os.path.join(base, "model_v8.onnx"))
    # one thread each: evaluation runs beside the server and other work on small machines
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    model.onnx_sess = ort.InferenceSession(model.primary_model_path, opts)
    model.p808_onnx_sess = ort.InferenceSession(os.path.join(base, "model_v8.onnx"), opts)
    return model


def dnsmos(audio: np.ndarray, rate: int) -> dict[str, float]:
    """DNSMOS P.835: ``{"sig", "bak", "ovrl", "p808"}`` on 16 kHz audio."""
    x = resample(audio, rate, 16_000).astype(np.float32)
    peak = float(np.max(np.abs(x))) if len(x) else 0.0
    if peak > 1.0:
        x = x / peak
    out = _dnsmos_model()(x, 16_000, False)
    return {
        "sig": float(out["sig_mos"]),
        "bak": float(out["bak_mos"]),
        "ovrl": float(out["ovrl_mos"]),
        "p808": float(out["p808_mos"]),
    }


def erle_db(mic: np.ndarray, output: np.ndarray, rate: int, start_s: float = 0.0) -> float:
    """Echo return loss enhancement: mic energy over output energy, from ``start_s`` on."""
    mic, output = align_lengths(mic, output)
    i = int(start_s * rate)
    num = float(np.mean(mic[i:].astype(np.float64) ** 2)) + 1e-12
    den = float(np.mean(output[i:].astype(np.float64) ** 2)) + 1e-12
    return float(10 * np.log10(num / den))
