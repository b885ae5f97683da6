"""``enhancers eval --task denoise``: denoisers on real noisy speech, against clean references.

Items: the real babble recording (``noisy/pesq_speech_babble_0dB.wav`` with
its clean source) plus clean speech (``speech/``) mixed with real noise
recordings (``noise/``) at each requested SNR.  Every stage runs through the
streaming path (one stream per item, all items batched, 10 ms chunks,
latency compensated).  Reported per item and averaged: wideband PESQ, STOI,
SI-SDR and DNSMOS (SIG/BAK/OVRL), for the unprocessed input, each stage and
the RNNoise baseline, plus the acceptance checks (DF3's PESQ gain beats
RNNoise's by 0.3, DF3's DNSMOS OVRL above RNNoise's).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from enhancers.audio_io import read_48k
from enhancers.denoise.streaming import run_streams
from enhancers.eval import metrics
from enhancers.registry import create_stage
from enhancers.stage import SAMPLE_RATE

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "eval"
STAGE_SPECS = {
    "df3": "denoise:df3",
    "nsnet2": "denoise:nsnet2",
    "gtcrn": "denoise:gtcrn",
    "rnnoise": "denoise:rnnoise",
}
METRICS = ("pesq", "stoi", "si_sdr", "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl")


@dataclass
class Item:
    """One noisy/clean pair at 48 kHz."""

    name: str
    kind: str  # "recorded" or "mix"
    snr_db: float | None
    noisy: np.ndarray
    clean: np.ndarray


def mix_at_snr(
    clean: np.ndarray, noise: np.ndarray, snr_db: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``clean`` plus a random segment of ``noise`` (looped if short) at ``snr_db``.

    Returns (noisy, reference): both rescaled together if the mix would clip.
    """
    if len(noise) < len(clean):
        noise = np.tile(noise, -(-len(clean) // len(noise)))
    start = int(rng.integers(0, len(noise) - len(clean) + 1))
    seg = noise[start : start + len(clean)].astype(np.float64)
    p_clean = float(np.mean(clean.astype(np.float64) ** 2)) + 1e-12
    p_noise = float(np.mean(seg**2)) + 1e-12
    gain = np.sqrt(p_clean / (p_noise * 10 ** (snr_db / 10)))
    mixed = clean + gain * seg
    scale = min(1.0, 0.99 / max(float(np.max(np.abs(mixed))), 1e-9))
    return (mixed * scale).astype(np.float32), (clean * scale).astype(np.float32)


def build_items(
    data: Path, snrs: list[float], max_seconds: float, max_files: int, seed: int = 0
) -> list[Item]:
    limit = int(max_seconds * SAMPLE_RATE)
    items: list[Item] = []
    noisy_dir = data / "noisy"
    if (noisy_dir / "pesq_speech_babble_0dB.wav").exists():
        noisy = read_48k(noisy_dir / "pesq_speech_babble_0dB.wav")[:limit]
        clean = read_48k(noisy_dir / "pesq_speech_clean.wav")[:limit]
        n = min(len(noisy), len(clean))
        items.append(Item("babble_0dB (recorded)", "recorded", 0.0, noisy[:n], clean[:n]))
    speech = sorted((data / "speech").glob("*.wav"))
    if max_files > 0:
        speech = speech[:max_files]
    noises = sorted((data / "noise").glob("*.wav"))
    noise_audio = {p.name: read_48k(p) for p in noises}
    rng = np.random.default_rng(seed)
    for i, sp in enumerate(speech):
        clean = read_48k(sp)[:limit]
        clean = clean / max(float(np.max(np.abs(clean))), 1e-6) * 0.5
        for j, snr in enumerate(snrs):
            noise_name = noises[(i + j) % len(noises)].name
            noisy, ref = mix_at_snr(clean, noise_audio[noise_name], snr, rng)
            items.append(Item(f"{sp.stem} + {Path(noise_name).stem} @ {snr:g} dB", "mix", snr, noisy, ref))
    return items


def score(estimate: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    mos = metrics.dnsmos(estimate, SAMPLE_RATE)
    return {
        "pesq": metrics.pesq_wb(estimate, clean, SAMPLE_RATE),
        "stoi": metrics.stoi(estimate, clean, SAMPLE_RATE),
        "si_sdr": metrics.si_sdr(estimate, clean),
        "dnsmos_sig": mos["sig"],
        "dnsmos_bak": mos["bak"],
        "dnsmos_ovrl": mos["ovrl"],
    }


def mean_table(rows: list[dict[str, dict[str, float]]], conditions: list[str]) -> dict[str, dict[str, float]]:
    return {c: {m: float(np.mean([r[c][m] for r in rows])) for m in METRICS} for c in conditions if rows}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stages", default="df3,nsnet2,rnnoise", help="comma list of df3, nsnet2, gtcrn, rnnoise")
    parser.add_argument("--snr", default="0,5,10", help="comma list of SNRs (dB) for the speech+noise mixes")
    parser.add_argument("--out", default=None, help="directory for report.json and report.png")
    parser.add_argument("--max-seconds", type=float, default=6.0, help="truncate each clip to this length")
    parser.add_argument("--max-files", type=int, default=0, help="clean speech files to mix (0: all)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="evaluation audio (../shared/eval)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    names = [s.strip().lower() for s in args.stages.split(",") if s.strip()]
    unknown = [n for n in names if n not in STAGE_SPECS]
    if unknown:
        raise SystemExit(f"unknown denoise stage(s): {', '.join(unknown)}; known: {', '.join(STAGE_SPECS)}")
    if "rnnoise" not in names:
        names.append("rnnoise")  # the baseline is always in the report
    snrs = [float(s) for s in str(args.snr).split(",") if s.strip()]
    items = build_items(Path(args.data), snrs, args.max_seconds, args.max_files)
    if not items:
        raise SystemExit(f"no evaluation audio found under {args.data}")

    outputs: dict[str, list[np.ndarray]] = {"noisy": [it.noisy for it in items]}
    timing: dict[str, float] = {}
    for name in names:
        stage = create_stage(STAGE_SPECS[name], device=args.device)
        t0 = time.perf_counter()
        outputs[name] = run_streams(stage, [it.noisy for it in items])
        timing[name] = time.perf_counter() - t0

    conditions = ["noisy", *names]
    rows: list[dict[str, dict[str, float]]] = []
    report_items: list[dict[str, Any]] = []
    for k, it in enumerate(items):
        row = {c: score(outputs[c][k], it.clean) for c in conditions}
        rows.append(row)
        report_items.append({"name": it.name, "kind": it.kind, "snr_db": it.snr_db, "scores": row})

    summary = mean_table(rows, conditions)
    by_snr = {
        f"{snr:g}": mean_table(
            [r for r, it in zip(rows, items) if it.kind == "mix" and it.snr_db == snr], conditions
        )
        for snr in snrs
    }
    gains = {c: {m: summary[c][m] - summary["noisy"][m] for m in METRICS} for c in names}
    checks: dict[str, Any] = {}
    if "df3" in names:
        checks = {
            "df3_pesq_gain_minus_rnnoise": gains["df3"]["pesq"] - gains["rnnoise"]["pesq"],
            "df3_pesq_gain_beats_rnnoise_by_0.3": gains["df3"]["pesq"] - gains["rnnoise"]["pesq"] >= 0.3,
            "df3_dnsmos_ovrl_above_rnnoise": summary["df3"]["dnsmos_ovrl"]
            > summary["rnnoise"]["dnsmos_ovrl"],
        }
    audio_seconds = sum(len(it.noisy) for it in items) / SAMPLE_RATE
    report = {
        "task": "denoise",
        "config": {
            "stages": names,
            "snr_db": snrs,
            "max_seconds": args.max_seconds,
            "items": len(items),
            "audio_seconds": audio_seconds,
            "device": args.device,
            "data": str(args.data),
        },
        "summary": summary,
        "summary_by_snr": by_snr,
        "improvement_over_noisy": gains,
        "acceptance": checks,
        "real_time_factor": {n: timing[n] / audio_seconds for n in names},
        "items": report_items,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(text + "\n")
        plot_report(report, out / "report.png")
    return 0


def plot_report(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = list(report["summary"])
    groups = {"all": report["summary"], **{f"{k} dB": v for k, v in report["summary_by_snr"].items() if v}}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    width = 0.8 / len(conditions)
    for ax, (metric, label) in zip(
        axes.flat,
        (("pesq", "PESQ (wb)"), ("stoi", "STOI"), ("si_sdr", "SI-SDR (dB)"), ("dnsmos_ovrl", "DNSMOS OVRL")),
    ):
        for i, cond in enumerate(conditions):
            values = [g[cond][metric] for g in groups.values()]
            ax.bar(np.arange(len(groups)) + i * width, values, width, label=cond)
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2)
        ax.set_xticklabels(list(groups))
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Denoising on real recordings ({report['config']['items']} items)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
