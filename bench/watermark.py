"""Benchmark of the provenance watermark (synth.watermark): detection after codecs, false positives, PESQ, cost.

Prints one JSON object:

* ``detection``: share of random 3-s excerpts of real eSpeak prompts (several texts) whose prompt id is
  decoded correctly after an Opus 32 kbit/s round trip (mediaserver.opus, 20 ms frames) and after G.711
  mu-law / A-law (48 kHz -> 8 kHz -> the project's G.711 tables -> 48 kHz).
* ``false_positive``: share of random 3-s excerpts of the real recordings in ../shared/eval (speech,
  noisy, aec, reverb; no mark) that the detector calls marked.
* ``pesq``: wideband PESQ (16 kHz) of the marked prompt against the clean one, and the drop from the
  clean-vs-clean score.
* ``cost``: embed and detect time per second of audio.

    .venv/bin/python bench/watermark.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mediaserver.opus import FRAME_SAMPLES, OpusDecoder, OpusEncoder  # noqa: E402
from signaling.sip.g711 import PCMA, PCMU, G711Codec  # noqa: E402

EVAL = Path(__file__).resolve().parents[2] / "shared" / "eval"
TEXTS = [
    "Welcome to the meeting. The recording has started and every participant is now being recorded.",
    "Please enter the number of the room you want to join, followed by the hash key. Press star to repeat.",
    "The host has muted all participants. Raise your hand if you would like to speak, and wait.",
    "This call is being transcribed. Say stop transcription at any time to end it for everyone.",
    "You are the first participant in this room. Please wait while the others are being connected.",
]


def opus_round_trip(audio48: np.ndarray, bitrate: int = 32_000) -> np.ndarray:
    """Encode and decode 48 kHz float audio with the server's Opus encoder (20 ms frames)."""
    enc, dec = OpusEncoder(bitrate), OpusDecoder()
    n = -(-len(audio48) // FRAME_SAMPLES) * FRAME_SAMPLES
    x = np.pad(audio48, (0, n - len(audio48))).astype(np.float32)
    return np.concatenate([dec.decode(enc.encode(x[i : i + FRAME_SAMPLES])) for i in range(0, n, FRAME_SAMPLES)])


def g711_round_trip(audio48: np.ndarray, codec: G711Codec) -> np.ndarray:
    """48 kHz -> 8 kHz -> G.711 bytes -> 8 kHz -> 48 kHz, as a phone leg of a room hears it."""
    x8 = np.clip(resample_poly(audio48, 1, 6), -1.0, 1.0)
    return np.asarray(resample_poly(codec.decode(codec.encode(x8)), 6, 1), dtype=np.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from pesq import pesq

    from synth.espeak import EspeakEngine
    from synth.service import resample_to
    from synth.watermark import WatermarkConfig, detect, embed

    per_channel = 20 if args.quick else 210
    n_null = 100 if args.quick else 1050
    rng = np.random.default_rng(7)
    engine = EspeakEngine()
    engine.watermark = WatermarkConfig(enabled=False)  # clean prompts; the bench embeds itself
    cfg = WatermarkConfig()
    prompts, pesq_marked, embed_s, audio_s = [], [], 0.0, 0.0
    for i, text in enumerate(TEXTS):
        clean = engine.synthesize(text)
        x = clean.audio.astype(np.float64)
        t0 = time.perf_counter()
        y = embed(x, clean.sample_rate, 1000 + i, cfg)
        embed_s += time.perf_counter() - t0
        audio_s += len(x) / clean.sample_rate
        c16, y16 = resample_to(x, clean.sample_rate, 16_000), resample_to(y, clean.sample_rate, 16_000)
        pesq_marked.append(float(pesq(16_000, c16, y16, "wb")))
        ref = float(pesq(16_000, c16, c16, "wb"))
        y48 = resample_to(y, clean.sample_rate, 48_000)
        prompts.append((1000 + i, y48 / np.max(np.abs(y48)) * 0.7))
    channels = {"opus32k": opus_round_trip, "g711_ulaw": lambda a: g711_round_trip(a, PCMU),
                "g711_alaw": lambda a: g711_round_trip(a, PCMA)}
    detection: dict[str, Any] = {}
    detect_s, detected_audio = 0.0, 0.0
    for name, channel in channels.items():
        heard = [(pid, channel(audio)) for pid, audio in prompts]
        ok, scores = 0, []
        for k in range(per_channel):
            pid, audio = heard[k % len(heard)]
            start = int(rng.integers(0, len(audio) - 3 * 48_000))
            t0 = time.perf_counter()
            found = detect(audio[start : start + 3 * 48_000], 48_000, cfg)
            detect_s += time.perf_counter() - t0
            detected_audio += 3.0
            ok += found.prompt_id == pid
            scores.append(found.score)
        detection[name] = {"excerpts": per_channel, "rate": ok / per_channel,
                           "min_score": round(min(scores), 2), "median_score": round(float(np.median(scores)), 2)}
    recordings = []
    for folder in ("speech", "noisy", "aec", "reverb"):
        for path in sorted((EVAL / folder).glob("*.wav")):
            audio, rate = sf.read(str(path), dtype="float64", always_2d=True)
            if len(audio) >= 3 * rate:
                recordings.append((audio.mean(axis=1), int(rate)))
    false_pos, null_scores = 0, []
    for k in range(n_null):
        audio, rate = recordings[k % len(recordings)]
        start = int(rng.integers(0, len(audio) - 3 * rate + 1))
        found = detect(audio[start : start + 3 * rate], rate, cfg)
        false_pos += found.watermarked
        null_scores.append(found.score)
    print(json.dumps({
        "config": {"strength_db": cfg.strength_db, "threshold": cfg.threshold, "key": "dev"},
        "detection": detection,
        "false_positive": {"excerpts": n_null, "recordings": len(recordings), "rate": false_pos / n_null,
                           "max_score": round(max(null_scores), 2)},
        "pesq": {"clean_vs_clean": round(ref, 3), "marked_mean": round(float(np.mean(pesq_marked)), 3),
                 "marked_min": round(min(pesq_marked), 3),
                 "max_drop": round(ref - min(pesq_marked), 3)},
        "cost": {"embed_ms_per_audio_s": round(1000 * embed_s / audio_s, 2),
                 "detect_ms_per_audio_s": round(1000 * detect_s / detected_audio, 2)},
    }, indent=1))


if __name__ == "__main__":
    main()
