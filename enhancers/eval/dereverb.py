"""``enhancers eval --task dereverb``: online WPE on reverberant speech, against offline WPE.

Sets (all 48 kHz, one stream per item, all items batched through the stage in
10 ms chunks, latency compensated):

* ``measured``: clean speech (``speech/``) convolved with the real measured
  room impulse responses (``rir/``);
* ``simulated``: the same speech in pyroomacoustics shoebox rooms with the
  requested RT60s (image source model, seeded geometry);
* ``recorded``: the real reverberant AMI array recordings (``reverb/``), no
  reference: DNSMOS only.

Each item's speech is the clean files concatenated in a seeded order up to
``--seconds`` (a call lasts longer than one sentence; the first seconds, while
the filter converges, are scored too).  Reference: the clean speech convolved
with the RIR's direct path and early part, i.e. the RIR up to 50 ms after its
peak (hard cut).  Scores: SI-SDR and wideband PESQ for the unprocessed input,
the stage (8 taps spaced by 2 frames), the stage with nara's usual 10
contiguous taps, nara_wpe's offline WPE with the stage's STFT and 10 taps,
delay 3 (the upper bound), offline WPE at nara's usual 16 kHz set-up and
nara's own ``OnlineWPE``.  Acceptance: on both reference sets, the stage's mean SI-SDR and
PESQ gains are positive and at least 80 % of offline WPE's.

``--chain`` adds the full chain (echo cancellation, dereverberation,
denoising) against denoising alone, and the order of dereverberation and
denoising, on the reverberant items plus more simulated rooms with real noise
added (``noise/``): see :mod:`enhancers.eval.chain`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.signal import fftconvolve

from enhancers.audio_io import read_48k
from enhancers.dereverb import reference
from enhancers.eval import chain, metrics
from enhancers.stage import SAMPLE_RATE, Stage

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "eval"
EARLY_SECONDS = 0.05
PEAK_LEVEL = 0.3
ACCEPT_FRACTION = 0.8
METHODS = ("unprocessed", "online", "online_contiguous", "offline", "offline_16k", "nara_online")
# nara_wpe's customary WPE set-up: the offline upper bound and the contiguous-taps variant use it.
STANDARD_TAPS, STANDARD_DELAY = 10, 3


@dataclass
class Item:
    """One reverberant signal and its direct-path + early reference (None for recordings)."""

    name: str
    kind: str  # "measured", "simulated" or "recorded"
    reverberant: np.ndarray
    target: np.ndarray | None
    rt60_s: float | None = None


def speech_signal(files: list[np.ndarray], seconds: float, seed: int) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(len(files))
    joined = np.concatenate([files[k] for k in order])
    while len(joined) < seconds * SAMPLE_RATE:
        joined = np.concatenate([joined, joined])
    return joined[: int(seconds * SAMPLE_RATE)]


def reverberate(name: str, kind: str, speech: np.ndarray, rir: np.ndarray, rt60: float | None) -> Item:
    rir = rir / np.abs(rir).max()
    early = rir[: int(np.abs(rir).argmax()) + int(EARLY_SECONDS * SAMPLE_RATE)]
    wet = fftconvolve(speech, rir)[: len(speech)]
    dry = fftconvolve(speech, early)[: len(speech)]
    scale = PEAK_LEVEL / np.abs(wet).max()
    return Item(name, kind, (wet * scale).astype(np.float32), (dry * scale).astype(np.float32), rt60)


def simulated_rir(rt60: float, seed: int) -> tuple[np.ndarray, float]:
    """A shoebox room of the given Sabine RT60; returns its RIR and its measured RT60."""
    import pyroomacoustics as pra

    rng = np.random.default_rng(seed)
    dims = [rng.uniform(5.0, 8.0), rng.uniform(4.0, 6.0), rng.uniform(2.7, 3.3)]
    absorption, max_order = pra.inverse_sabine(rt60, dims)
    room = pra.ShoeBox(dims, fs=SAMPLE_RATE, materials=pra.Material(absorption), max_order=max_order)
    room.add_source([rng.uniform(1.0, 2.0), rng.uniform(1.0, 2.0), 1.6])
    room.add_microphone([dims[0] - rng.uniform(1.0, 2.0), dims[1] - rng.uniform(1.0, 2.0), 1.2])
    room.compute_rir()
    rir = np.asarray(room.rir[0][0], dtype=np.float64)
    return rir.astype(np.float32), float(pra.experimental.measure_rt60(rir, fs=SAMPLE_RATE))


def build_items(data: Path, seconds: float, rt60s: list[float], first_seed: int = 100) -> list[Item]:
    files = [read_48k(p) for p in sorted((data / "speech").glob("*.wav"))]
    items = [
        reverberate(p.stem, "measured", speech_signal(files, seconds, k), read_48k(p), None)
        for k, p in enumerate(sorted((data / "rir").glob("*.wav")))
    ]
    for k, rt60 in enumerate(rt60s):
        rir, measured = simulated_rir(rt60, seed=first_seed + k)
        items.append(
            reverberate(
                f"room_rt60_{rt60:g}s", "simulated", speech_signal(files, seconds, first_seed - 50 + k), rir, measured
            )
        )
    for p in sorted((data / "reverb").glob("*.wav")):
        x = read_48k(p)
        items.append(Item(p.stem, "recorded", (x * PEAK_LEVEL / np.abs(x).max()).astype(np.float32), None))
    return items


def run_stage(stage: Stage, signals: list[np.ndarray]) -> list[np.ndarray]:
    from enhancers.denoise.streaming import run_streams

    return run_streams(stage, signals)


def score(estimate: np.ndarray, item: Item) -> dict[str, float]:
    if item.target is None:
        mos = metrics.dnsmos(estimate, SAMPLE_RATE)
        return {"dnsmos_sig": mos["sig"], "dnsmos_bak": mos["bak"], "dnsmos_ovrl": mos["ovrl"]}
    return {
        "si_sdr": metrics.si_sdr(estimate, item.target),
        "pesq": metrics.pesq_wb(estimate, item.target, SAMPLE_RATE),
    }


def mean_scores(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]} if rows else {}


def summarize(items: list[Item], scores: dict[str, list[dict[str, float]]], kind: str) -> dict[str, Any]:
    chosen = [k for k, it in enumerate(items) if it.kind == kind]
    means = {m: mean_scores([scores[m][k] for k in chosen]) for m in scores}
    gains = {
        m: {key: means[m][key] - means["unprocessed"][key] for key in means[m]}
        for m in scores
        if m != "unprocessed"
    }
    return {"items": len(chosen), "mean": means, "gain_over_unprocessed": gains}


def acceptance(summary: dict[str, Any]) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    for kind in ("measured", "simulated"):
        gains = summary[kind]["gain_over_unprocessed"]
        for key in ("si_sdr", "pesq"):
            online, offline = gains["online"][key], gains["offline"][key]
            fraction = online / offline if offline > 0 else float("nan")
            checks[f"{kind}_{key}_fraction_of_offline_gain"] = fraction
            checks[f"{kind}_{key}_pass"] = bool(online > 0 and offline > 0 and fraction >= ACCEPT_FRACTION)
    checks["all_pass"] = all(v for k, v in checks.items() if k.endswith("_pass"))
    return checks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("eval_out/dereverb"), help="report folder")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="evaluation audio (../shared/eval)")
    parser.add_argument("--seconds", type=float, default=15.0, help="speech per reverberant item")
    parser.add_argument("--rt60", default="0.3,0.45,0.6,0.8,1.0", help="simulated rooms' RT60s (s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda for the stage")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--quick", action="store_true", help="8 s items, three rooms, no nara online/16 kHz rows"
    )
    chain.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from enhancers.dereverb import DereverbStage

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.seconds, args.rt60 = min(args.seconds, 8.0), "0.3,0.6,1.0"
    rt60s = [float(v) for v in str(args.rt60).split(",") if v.strip()]
    items = build_items(Path(args.data), args.seconds, rt60s)
    if not items:
        raise SystemExit(f"no evaluation audio under {args.data}")

    stage = DereverbStage(device=args.device)
    contiguous = DereverbStage(device=args.device, taps=STANDARD_TAPS, delay=STANDARD_DELAY, tap_spacing=1)
    runners: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "offline": lambda x: reference.offline_wpe(x, taps=STANDARD_TAPS, delay=STANDARD_DELAY),
    }
    if not args.quick:
        runners["offline_16k"] = reference.offline_wpe_16k
        runners["nara_online"] = lambda x: reference.nara_online_wpe(x, alpha=stage.default_alpha)
    signals = [it.reverberant for it in items]
    outputs: dict[str, list[np.ndarray]] = {"unprocessed": signals}
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    outputs["online"] = run_stage(stage, signals)
    seconds["online"] = time.perf_counter() - start
    outputs["online_contiguous"] = run_stage(contiguous, signals)
    for name, runner in runners.items():
        start = time.perf_counter()
        outputs[name] = [runner(x) for x in signals]
        seconds[name] = time.perf_counter() - start

    scores = {m: [score(y, it) for y, it in zip(outputs[m], items)] for m in outputs}
    summary = {kind: summarize(items, scores, kind) for kind in ("measured", "simulated", "recorded")}
    audio_seconds = sum(len(x) for x in signals) / SAMPLE_RATE
    report: dict[str, Any] = {
        "task": "dereverb",
        "config": {
            "stage": {
                "taps": stage.wpe.max_taps,
                "tap_spacing": stage.wpe.tap_spacing,
                "update_stride": stage.wpe.update_stride,
                "delay": stage.default_delay,
                "alpha": stage.default_alpha,
                "power_floor": stage.wpe.power_floor,
                "regularization": stage.wpe.regularization,
                "processed_bins": stage.processed_bins,
                "stft_window": stage.stft.window_length,
                "stft_hop": stage.stft.hop,
                "latency_samples": stage.latency_samples,
            },
            "reference_signal": f"clean speech * RIR up to {EARLY_SECONDS * 1000:g} ms after its peak",
            "seconds_per_item": args.seconds,
            "rt60_nominal_s": rt60s,
            "device": args.device,
            "offline": f"nara_wpe.wpe.wpe on the stage's STFT, taps {STANDARD_TAPS}, delay {STANDARD_DELAY}, "
            "3 iterations",
            "online_contiguous": f"the stage with {STANDARD_TAPS} contiguous taps, delay {STANDARD_DELAY}",
        },
        "summary": summary,
        "acceptance": acceptance(summary),
        "real_time_factor": {m: s / audio_seconds for m, s in seconds.items()},
        "items": [
            {
                "name": it.name,
                "kind": it.kind,
                "rt60_measured_s": it.rt60_s,
                "scores": {m: scores[m][k] for m in scores},
            }
            for k, it in enumerate(items)
        ],
    }
    if args.chain:
        from enhancers.registry import create_stage

        extra = [float(v) for v in str(args.chain_rt60).split(",") if v.strip()]
        chain_items = [it for it in items if it.target is not None]
        chain_items += [it for it in build_items(Path(args.data), args.seconds, extra, first_seed=200)
                        if it.kind == "simulated"]
        try:
            report["chain"] = chain.evaluate(
                chain_items, args, lambda spec, sigs: run_stage(create_stage(spec, device=args.device), sigs)
            )
        except (ImportError, KeyError, ValueError, FileNotFoundError) as exc:
            report["chain"] = {"skipped": f"{type(exc).__name__}: {exc}"}
        else:
            report["acceptance"].update(report["chain"]["acceptance"])
            report["acceptance"]["all_pass"] = all(
                v for k, v in report["acceptance"].items() if k.endswith("_pass") or k.startswith("full_chain")
            )

    text = json.dumps(report, indent=2)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(text + "\n")
    plot(report, out / "report.png")
    return 0 if report["acceptance"]["all_pass"] else 1


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    methods = [m for m in METHODS[1:] if m in summary["measured"]["gain_over_unprocessed"]]
    panels = [("si_sdr", "SI-SDR gain (dB)"), ("pesq", "PESQ gain")]
    fig, axes = plt.subplots(
        1, 3 + ("chain" in report and "mean" in report["chain"]), figsize=(16, 4)
    )
    width = 0.8 / len(methods)
    for ax, (key, label) in zip(axes, panels):
        for j, m in enumerate(methods):
            values = [summary[kind]["gain_over_unprocessed"][m][key] for kind in ("measured", "simulated")]
            ax.bar(np.arange(2) + j * width, values, width, label=m)
        ax.set_xticks(np.arange(2) + width * (len(methods) - 1) / 2, ["measured RIR", "simulated"])
        ax.set_title(label)
        ax.axhline(0, color="black", linewidth=0.5)
    axes[0].legend(fontsize=8)
    recorded = summary["recorded"]["mean"]
    names = list(recorded)
    axes[2].bar(names, [recorded[m]["dnsmos_ovrl"] for m in names])
    axes[2].set_ylim(1, 4)
    axes[2].set_title("DNSMOS OVRL, real reverberant (AMI)")
    axes[2].tick_params(axis="x", rotation=30, labelsize=8)
    if len(axes) > 3:
        means = report["chain"]["mean"]
        axes[3].bar(list(means), [means[n]["dnsmos_ovrl"] for n in means])
        axes[3].set_ylim(1.0, max(means[n]["dnsmos_ovrl"] for n in means) + 0.2)
        axes[3].set_title(f"DNSMOS OVRL, reverb + noise ({report['chain']['denoiser']})")
        axes[3].tick_params(axis="x", rotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
