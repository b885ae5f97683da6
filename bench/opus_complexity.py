"""Opus encoder cost and quality per complexity, on real speech: what the server's load-driven complexity
(mediaserver/encoder_load.py) trades.

For each complexity: CPU per 20 ms frame of ``OpusEncoder.encode`` (the server's encoder: 48 kHz mono,
VoIP, in-band FEC, the configured bitrate), and what a subscriber gets after decoding, against the
original: PESQ wideband (0-8 kHz) and the log-spectral distance over the full band (0-20 kHz, dB), mean
over the recordings of ../shared/eval/speech.  Complexities run interleaved, ``--rounds`` times, the
minimum time kept (a shared machine), so read the ratios.

    taskset -c 1 .venv/bin/python bench/opus_complexity.py [--complexities 0,1,2,3,5,8,10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly, stft

from enhancers.eval.metrics import pesq_wb
from mediaserver.opus import FRAME_SAMPLES, OpusDecoder, OpusEncoder

RATE = 48_000
SPEECH = Path(__file__).resolve().parents[1].parent / "shared" / "eval" / "speech"


def load_speech() -> list[np.ndarray]:
    clips = []
    for path in sorted(SPEECH.glob("*.wav")):
        x, sr = sf.read(path, dtype="float32", always_2d=True)
        clips.append(resample_poly(x[:, 0], RATE, sr).astype(np.float32) if sr != RATE else x[:, 0])
    if not clips:
        raise SystemExit(f"no speech recordings under {SPEECH}")
    return clips


def coded(x: np.ndarray, complexity: int, bitrate: int) -> tuple[np.ndarray, float, int]:
    """The clip through the encoder and a decoder, aligned to the input; encode CPU seconds; frames."""
    enc, dec = OpusEncoder(bitrate=bitrate, complexity=complexity), OpusDecoder()
    n = len(x) // FRAME_SAMPLES * FRAME_SAMPLES
    out, cpu = [], 0.0
    for i in range(0, n, FRAME_SAMPLES):
        t = time.process_time()
        packet = enc.encode(x[i:i + FRAME_SAMPLES])
        cpu += time.process_time() - t
        out.append(dec.decode(packet).copy())
    enc.close()
    y = np.concatenate(out)
    lag = max(range(0, 720, 8), key=lambda d: float(np.dot(y[d:d + n - 960], x[:n - 960])))
    return y[lag:], cpu, n // FRAME_SAMPLES


def log_spectral_distance(y: np.ndarray, x: np.ndarray) -> float:
    """RMS over frames and bins (0-20 kHz) of the dB difference of the power spectra, voiced frames."""
    m = min(len(x), len(y))
    _, _, X = stft(x[:m], RATE, nperseg=1024)
    _, _, Y = stft(y[:m], RATE, nperseg=1024)
    band = slice(0, int(20_000 / (RATE / 2) * X.shape[0]))
    px, py = np.abs(X[band]) ** 2 + 1e-10, np.abs(Y[band]) ** 2 + 1e-10
    voiced = px.sum(axis=0) > 1e-3 * px.sum(axis=0).max()
    d = 10 * np.log10(py[:, voiced] / px[:, voiced])
    return float(np.sqrt(np.mean(d ** 2)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--complexities", default="0,1,2,3,5,8,10")
    ap.add_argument("--bitrate", type=int, default=32_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    levels = [int(c) for c in args.complexities.split(",")]
    clips = load_speech()
    cpu = {c: float("inf") for c in levels}
    quality: dict[int, dict[str, float]] = {}
    for r in range(args.rounds):
        for c in levels:
            total, frames, pesq, lsd = 0.0, 0, [], []
            for x in clips:
                y, seconds, n = coded(x, c, args.bitrate)
                total, frames = total + seconds, frames + n
                if r == 0:
                    m = min(len(x), len(y))
                    pesq.append(pesq_wb(resample_poly(y[:m], 1, 3), resample_poly(x[:m], 1, 3), 16_000))
                    lsd.append(log_spectral_distance(y, x))
            cpu[c] = min(cpu[c], total / frames)
            if r == 0:
                quality[c] = {"pesq_wb": round(float(np.mean(pesq)), 3), "lsd_db": round(float(np.mean(lsd)), 2)}
    base = max(levels)
    print(json.dumps({
        "bitrate": args.bitrate, "clips": len(clips), "rounds": args.rounds,
        "complexity": {str(c): {"encode_us_per_20ms": round(cpu[c] * 1e6, 1),
                                "cost_vs_highest": round(cpu[c] / cpu[base], 3), **quality[c]} for c in levels},
    }, indent=1))


if __name__ == "__main__":
    main()
