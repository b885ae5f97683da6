"""``enhancers eval --task wer`` (or ``enhancers eval wer``): intelligibility after enhancement.

Items (48 kHz, one stream per item, all items of a condition batched through
the stage in 10 ms chunks, latency compensated): the real babble recording
with its clean source, clean speech (``speech/``) mixed with real noise
(``noise/``) at each ``--snr`` (the same items as ``--task denoise``), and
the clean speech convolved with the measured room impulse responses
(``rir/``).  Each is transcribed by Whisper tiny.en (:mod:`enhancers.eval.asr`)
before and after each stage list of ``--stages`` (``+`` chains stages, e.g.
``dereverb+denoise:df3``).

Reported per item and overall: ``wer_vs_clean_asr``, the WER of the
transcript against the transcript of the clean speech, and, where the corpus
publishes the sentence (CMU ARCTIC prompts, the VCTK rainbow passage, the
Harvard sentence of the PESQ sample), ``wer_vs_transcript`` against that.
Overall figures are pooled (errors summed over reference words summed).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.signal import fftconvolve

from enhancers.audio_io import read_48k
from enhancers.denoise.streaming import run_streams
from enhancers.eval import asr
from enhancers.eval.denoise import DEFAULT_DATA, build_items
from enhancers.registry import create_stage, parse_spec

# Published sentences of the clean recordings in shared/eval (CMU ARCTIC prompt list
# cmuarctic.data; VCTK's speaker-independent "rainbow passage" line 011; Harvard list 1, 2).
TRANSCRIPTS = {
    "cmu_arctic_us_aew_a0001": "Author of the danger trail, Philip Steels, etc.",
    "cmu_arctic_us_aew_a0002": "Not at this particular case, Tom, apologized Whittemore.",
    "cmu_arctic_us_aew_a0003": "For the twentieth time that evening the two men shook hands.",
    "cmu_arctic_us_axb_a0004": "Lord, but I'm glad to see you again, Phil.",
    "cmu_arctic_us_axb_a0005": "Will we ever forget it.",
    "cmu_arctic_us_axb_a0006": "God bless 'em, I hope I'll go on seeing them forever.",
    "cmu_arctic_a0010": "I'm playing a single hand in what looks like a losing game.",
    "vctk_p286_011_48k": "When a man looks for something beyond his reach, his friends say he is looking "
    "for the pot of gold at the end of the rainbow.",
    "pesq_speech_clean": "The birch canoe slid on the smooth planks.",
}
DEFAULT_STAGES = "denoise:df3,denoise:gtcrn,denoise:rnnoise"


@dataclass
class WerItem:
    """One degraded/clean pair and the published sentence where there is one."""

    name: str
    kind: str  # "recorded", "mix" or "reverb"
    degraded: np.ndarray
    clean: np.ndarray
    transcript: str | None


def transcript_for(name: str) -> str | None:
    if name.startswith("babble_0dB"):
        return TRANSCRIPTS["pesq_speech_clean"]
    return TRANSCRIPTS.get(name.split(" ", 1)[0])


def build_wer_items(data: Path, snrs: list[float], max_seconds: float, rir: bool) -> list[WerItem]:
    items = [
        WerItem(it.name, it.kind, it.noisy, it.clean, transcript_for(it.name))
        for it in build_items(data, snrs, max_seconds, 0)
    ]
    if rir:
        limit = int(max_seconds * 48_000)
        for rp in sorted((data / "rir").glob("*.wav")):
            h = read_48k(rp)
            h = h / max(float(np.abs(h).max()), 1e-9)
            for sp in sorted((data / "speech").glob("*.wav")):
                clean = read_48k(sp)[:limit]
                clean = clean / max(float(np.max(np.abs(clean))), 1e-6) * 0.5
                wet = fftconvolve(clean, h)[: len(clean)]
                wet = (wet * 0.5 / max(float(np.abs(wet).max()), 1e-9)).astype(np.float32)
                items.append(WerItem(f"{sp.stem} * {rp.stem}", "reverb", wet, clean, TRANSCRIPTS.get(sp.stem)))
    return items


def run_condition(condition: str, signals: list[np.ndarray], device: str) -> list[np.ndarray]:
    """``signals`` through each stage of ``condition`` (``a+b``) in turn."""
    out = signals
    for spec in condition.split("+"):
        out = run_streams(create_stage(spec.strip(), device=device), out)
    return out


def pooled(rows: list[tuple[str, str]]) -> dict[str, Any]:
    """Pooled WER over (hypothesis, reference) pairs: errors summed over reference words."""
    errors = sum(asr.edit_distance(asr.normalize(h), asr.normalize(r)) for h, r in rows)
    words = sum(len(asr.normalize(r)) for _, r in rows)
    return {"wer": errors / words if words else 0.0, "errors": errors, "words": words, "items": len(rows)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stages", default=DEFAULT_STAGES,
                        help="comma list of stage specs; '+' chains stages, e.g. dereverb+denoise:df3")
    parser.add_argument("--snr", default="0,5", help="comma list of SNRs (dB) for the speech+noise mixes")
    parser.add_argument("--no-rir", action="store_true", help="leave out the speech * measured RIR items")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N items (0: all)")
    parser.add_argument("--max-seconds", type=float, default=8.0, help="truncate each clip to this length")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="evaluation audio (../shared/eval)")
    parser.add_argument("--device", default="cpu", help="device of the stages: cpu or cuda")
    parser.add_argument("--out", default=None, help="write report.json into this directory")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the ASR model")


def run(args: argparse.Namespace) -> int:
    conditions = [c.strip().lower() for c in str(args.stages).split(",") if c.strip()]
    for c in conditions:
        for spec in c.split("+"):
            try:
                parse_spec(spec.strip())
            except ValueError as exc:
                raise SystemExit(f"--stages: {exc}") from None
    snrs = [float(s) for s in str(args.snr).split(",") if s.strip()]
    items = build_wer_items(Path(args.data), snrs, args.max_seconds, not args.no_rir)
    if args.limit > 0:
        items = items[: args.limit]
    if not items:
        raise SystemExit(f"no evaluation audio found under {args.data}")
    model = asr.shared_model(args.threads)
    t0 = time.perf_counter()
    clean_text = [model.transcribe(it.clean) for it in items]
    texts: dict[str, list[str]] = {"input": [model.transcribe(it.degraded) for it in items]}
    for c in conditions:
        texts[c] = [model.transcribe(y) for y in run_condition(c, [it.degraded for it in items], args.device)]
    names = ["input", *conditions]
    report_items = []
    for k, it in enumerate(items):
        entry: dict[str, Any] = {"name": it.name, "kind": it.kind, "clean_asr": clean_text[k],
                                 "transcript": it.transcript, "asr": {c: texts[c][k] for c in names}}
        entry["wer_vs_clean_asr"] = {c: round(asr.word_error_rate(texts[c][k], clean_text[k]), 4) for c in names}
        if it.transcript:
            entry["wer_vs_transcript"] = {
                "clean": round(asr.word_error_rate(clean_text[k], it.transcript), 4),
                **{c: round(asr.word_error_rate(texts[c][k], it.transcript), 4) for c in names},
            }
        report_items.append(entry)

    def overall(select: list[int]) -> dict[str, Any]:
        with_text = [k for k in select if items[k].transcript]
        vs_text = {"clean": pooled([(clean_text[k], str(items[k].transcript)) for k in with_text])}
        vs_text.update({c: pooled([(texts[c][k], str(items[k].transcript)) for k in with_text]) for c in names})
        return {
            "wer_vs_clean_asr": {c: pooled([(texts[c][k], clean_text[k]) for k in select]) for c in names},
            "wer_vs_transcript": vs_text,
        }

    kinds = sorted({it.kind for it in items})
    report = {
        "task": "wer",
        "config": {"stages": conditions, "snr_db": snrs, "items": len(items), "max_seconds": args.max_seconds,
                   "asr": f"whisper tiny.en (ctranslate2 int8) from {model.path}", "data": str(args.data)},
        "overall": overall(list(range(len(items)))),
        "by_kind": {kind: overall([k for k, it in enumerate(items) if it.kind == kind]) for kind in kinds},
        "seconds": round(time.perf_counter() - t0, 1),
        "items": report_items,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(text + "\n")
    return 0
