"""The full enhancement chain on reverberant noisy speech, against denoising alone.

Part of ``enhancers eval --task dereverb --chain``.  Each reverberant item
(measured RIRs plus simulated rooms) gets real noise from ``noise/`` at
``--chain-snr`` (the noise files taken in turn, a seeded excerpt of each) and
is run, as one batch of concurrent streams, through:

* ``unprocessed``;
* ``denoise_only``: the denoiser alone (``--chain-denoise``);
* ``dereverb_then_denoise`` and ``denoise_then_dereverb``: the order question;
* ``full_chain``: echo cancellation (with a silent far end, as for a
  participant nobody talks to: it must pass speech through untouched, which
  ``aec_passthrough_si_sdr_db`` checks), then dereverberation, then denoising:
  the server's order.

Scores per item: DNSMOS P.835 OVRL/SIG/BAK (no reference) and SI-SDR / PESQ
against the direct-path + early reference.  The acceptance compares
``full_chain`` with ``denoise_only`` on DNSMOS OVRL item by item: the mean
difference, how many items improve, a bootstrap 95 % interval of the mean
difference and a two-sided sign test; it passes when the interval lies above 0.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from enhancers.audio_io import read_48k
from enhancers.eval import metrics
from enhancers.stage import SAMPLE_RATE

DEFAULT_NOISES = "doing_the_dishes.wav,exercise_bike.wav,running_tap.wav,freesound_573577_48k.wav"
# Extra simulated rooms for the chain only, so the paired comparison has enough items.
DEFAULT_EXTRA_RT60 = "0.35,0.4,0.5,0.55,0.65,0.7,0.75,0.9,0.95"
BOOTSTRAP_DRAWS = 10_000


class ReverberantItem(Protocol):
    name: str
    reverberant: np.ndarray
    target: np.ndarray | None


Runner = Callable[[str, list[np.ndarray]], list[np.ndarray]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chain", action="store_true",
                        help="also run the full chain (aec, dereverb, denoise) against denoising alone")
    parser.add_argument("--chain-denoise", default="denoise:df3", help="denoise stage spec for --chain")
    parser.add_argument("--chain-snr", type=float, default=10.0, help="SNR (dB) of the added noise")
    parser.add_argument("--chain-items", type=int, default=0,
                        help="reverberant items used for --chain (0: all with a reference)")
    parser.add_argument("--chain-noise", default=DEFAULT_NOISES, help="files in noise/ to add, in turn")
    parser.add_argument("--chain-rt60", default=DEFAULT_EXTRA_RT60,
                        help="extra simulated rooms' RT60s (s) for --chain only ('' for none)")


def add_noise(items: Sequence[ReverberantItem], noises: list[np.ndarray], snr_db: float) -> list[np.ndarray]:
    """Each item's reverberant speech plus a seeded excerpt of the next noise at ``snr_db``."""
    rng = np.random.default_rng(7)
    noisy = []
    for k, it in enumerate(items):
        noise = noises[k % len(noises)]
        while len(noise) <= len(it.reverberant):
            noise = np.concatenate([noise, noise])
        start = int(rng.integers(0, len(noise) - len(it.reverberant)))
        seg = noise[start : start + len(it.reverberant)]
        gain = np.sqrt(np.mean(it.reverberant**2) / (np.mean(seg**2) * 10 ** (snr_db / 10)))
        noisy.append((it.reverberant + gain * seg).astype(np.float32))
    return noisy


def paired(better: list[float], baseline: list[float], seed: int = 0) -> dict[str, Any]:
    """Item-by-item comparison: mean difference, wins, bootstrap 95 % CI, sign-test p."""
    from scipy.stats import binomtest

    d = np.asarray(better) - np.asarray(baseline)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(BOOTSTRAP_DRAWS, len(d)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    p = binomtest(wins, wins + losses).pvalue if wins + losses else 1.0
    return {
        "mean_difference": float(d.mean()),
        "items": len(d),
        "improved": wins,
        "worse": losses,
        "bootstrap_95ci": [float(low), float(high)],
        "sign_test_p": float(p),
        "per_item": [round(float(v), 4) for v in d],
    }


def scores(estimate: np.ndarray, target: np.ndarray) -> dict[str, float]:
    mos = metrics.dnsmos(estimate, SAMPLE_RATE)
    return {
        "dnsmos_ovrl": mos["ovrl"],
        "dnsmos_sig": mos["sig"],
        "dnsmos_bak": mos["bak"],
        "si_sdr": metrics.si_sdr(estimate, target),
        "pesq": metrics.pesq_wb(estimate, target, SAMPLE_RATE),
    }


def evaluate(items: Sequence[ReverberantItem], args: argparse.Namespace, run: Runner) -> dict[str, Any]:
    """The chain report; ``run(spec, signals)`` runs one stage over the signals as concurrent streams."""
    chosen = [it for it in items if it.target is not None]
    if args.chain_items > 0:
        chosen = chosen[: args.chain_items]
    names = [n.strip() for n in str(args.chain_noise).split(",") if n.strip()]
    noises = [read_48k(Path(args.data) / "noise" / n) for n in names]
    noisy = add_noise(chosen, noises, args.chain_snr)

    denoised = run(args.chain_denoise, noisy)
    dereverbed = run("dereverb", noisy)
    echo_cancelled = run("aec", noisy)
    outputs = {
        "unprocessed": noisy,
        "denoise_only": denoised,
        "dereverb_then_denoise": run(args.chain_denoise, dereverbed),
        "denoise_then_dereverb": run("dereverb", denoised),
        "full_chain": run(args.chain_denoise, run("dereverb", echo_cancelled)),
    }
    rows = {m: [scores(y, it.target) for y, it in zip(sigs, chosen) if it.target is not None]
            for m, sigs in outputs.items()}
    means = {m: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for m, rs in rows.items()}
    ovrl = {m: [r["dnsmos_ovrl"] for r in rs] for m, rs in rows.items()}
    full_vs_denoise = paired(ovrl["full_chain"], ovrl["denoise_only"])
    passthrough = [metrics.si_sdr(y, x) for y, x in zip(echo_cancelled, noisy)]
    a, b = means["dereverb_then_denoise"], means["denoise_then_dereverb"]
    order_margin = (a["pesq"] - b["pesq"]) + (a["si_sdr"] - b["si_sdr"]) / 10 + (a["dnsmos_ovrl"] - b["dnsmos_ovrl"])
    return {
        "denoiser": args.chain_denoise,
        "snr_db": args.chain_snr,
        "noises": names,
        "items": [it.name for it in chosen],
        "mean": means,
        "better_order": "dereverb_then_denoise" if order_margin >= 0 else "denoise_then_dereverb",
        "aec_passthrough_si_sdr_db": {"min": float(np.min(passthrough)), "mean": float(np.mean(passthrough))},
        "full_chain_vs_denoise_only_ovrl": full_vs_denoise,
        "acceptance": {
            "full_chain_beats_denoise_only_ovrl": bool(full_vs_denoise["bootstrap_95ci"][0] > 0),
        },
    }
