"""``enhancers eval --task aec``: echo cancellation quality on real and simulated echo.

Real recordings (default ``../shared/eval/aec``, the AEC-challenge clips):
far-end single talk -> ERLE from 2 s on; near-end single talk -> how much the
near-end speech changed (SI-SDR and PESQ of the output against the mic, and
the level change); double talk; AECMOS (echo and degradation ratings) for
every scenario, with the unprocessed mic, the linear filter alone and the
DTLN-aec anchor (``*_processed.wav``) in the same report.  Or give one
explicit pair with ``--reference`` / ``--mic``.

Simulated set: real speech echoed through measured room responses with a
50-400 ms bulk delay and a +/-6 dB echo level step halfway through: ERLE before
the step, in the second after it and once re-converged, for the full
canceller and the linear filter alone; plus a simulated double talk where the
clean near-end is known (SI-SDR against it).

Writes ``report.json`` and ``aec.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from enhancers.aec.offline import cancel_echo
from enhancers.aec.simulate import (
    EVAL_DIR,
    FAR_SPEECH,
    NEAR_SPEECH,
    RIRS,
    echo_scenario,
    room_response,
    speech,
)
from enhancers.audio_io import read_48k, resample
from enhancers.eval.metrics import align_lengths, erle_db, pesq_wb, si_sdr
from enhancers.stage import SAMPLE_RATE, Stage

SCENARIOS = {"farend_singletalk": "st", "nearend_singletalk": "nst", "doubletalk": "dt"}
ERLE_FROM_S = 2.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reference", type=Path, help="far-end reference (loopback) file of an explicit pair"
    )
    parser.add_argument("--mic", type=Path, help="microphone file of an explicit pair")
    parser.add_argument(
        "--scenario",
        choices=sorted(SCENARIOS.values()),
        default="st",
        help="talk type of the explicit pair, for AECMOS (st = far-end single talk)",
    )
    parser.add_argument(
        "--data", type=Path, default=EVAL_DIR, help="shared eval folder (has aec/, speech/, rir/)"
    )
    parser.add_argument("--out", type=Path, default=Path("eval_out/aec"), help="report folder")
    parser.add_argument(
        "--stage", default="aec", choices=["aec", "aec:webrtc"], help="echo canceller (aec: the batched one)"
    )
    parser.add_argument("--suppression", choices=["off", "moderate", "aggressive"], default="moderate")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (10 ms chunks: 1 is fastest)"
    )
    parser.add_argument("--no-sim", action="store_true", help="skip the simulated set")
    parser.add_argument("--quick", action="store_true", help="smaller simulated set")


# -- metrics ------------------------------------------------------------------
def aecmos(lpb: np.ndarray, mic: np.ndarray, enh: np.ndarray, talk_type: str) -> dict[str, float]:
    """AECMOS (speechmos, 16 kHz model with scenario marker): echo and degradation ratings, 1-5."""
    from speechmos import aecmos as model

    sig = [np.clip(resample(x, SAMPLE_RATE, 16_000), -1.0, 1.0).astype(np.float32) for x in (lpb, mic, enh)]
    lpb16, mic16, enh16 = align_lengths(*sig)
    out = model.run({"lpb": lpb16, "mic": mic16, "enh": enh16}, 16_000, talk_type=talk_type)
    return {"echo": round(float(out["echo_mos"]), 3), "deg": round(float(out["deg_mos"]), 3)}


def level_change_db(out: np.ndarray, ref: np.ndarray) -> float:
    out, ref = align_lengths(out, ref)
    return float(
        10
        * np.log10(
            (np.sum(np.square(out, dtype=np.float64)) + 1e-12)
            / (np.sum(np.square(ref, dtype=np.float64)) + 1e-12)
        )
    )


def erle_curve(mic: np.ndarray, out: np.ndarray, window_s: float = 0.25) -> list[float]:
    w = int(window_s * SAMPLE_RATE)
    return [
        round(erle_db(mic[i : i + w], out[i : i + w], SAMPLE_RATE), 2) for i in range(0, len(mic) - w + 1, w)
    ]


def segment_erle(mic: np.ndarray, out: np.ndarray, start_s: float, end_s: float) -> float:
    a, b = int(start_s * SAMPLE_RATE), int(end_s * SAMPLE_RATE)
    return round(erle_db(mic[a:b], out[a:b], SAMPLE_RATE), 2)


def has_linear_only(args: argparse.Namespace) -> bool:
    """Whether the canceller can run without its residual suppressor (the batched one can)."""
    return args.stage == "aec"


def make_stage(args: argparse.Namespace) -> Stage:
    from enhancers.registry import create_stage

    return create_stage(args.stage, device=args.device)


# -- real recordings ------------------------------------------------------------
def find_pairs(aec_dir: Path) -> dict[str, dict[str, Path]]:
    """``{scenario: {"lpb", "mic", ["anchor"]}}`` for the AEC-challenge clips in ``aec_dir``."""
    pairs: dict[str, dict[str, Path]] = {}
    for scenario in SCENARIOS:
        for mic in sorted(aec_dir.glob(f"*_{scenario}_mic.wav")):
            stem = str(mic)[: -len("_mic.wav")]
            entry = {"lpb": Path(stem + "_lpb.wav"), "mic": mic}
            if Path(stem + "_processed.wav").exists():
                entry["anchor"] = Path(stem + "_processed.wav")
            pairs[scenario] = entry
            break
    return pairs


def evaluate_real(
    pairs: dict[str, dict[str, Path]], talk_types: dict[str, str], args: argparse.Namespace
) -> dict[str, Any]:
    names = list(pairs)
    fars = [read_48k(pairs[n]["lpb"]) for n in names]
    mics = [read_48k(pairs[n]["mic"]) for n in names]
    runs = 2 if has_linear_only(args) else 1
    opts = ([{"suppression": args.suppression}] * len(names) + [{"suppression": "off"}] * len(names))[
        : runs * len(names)
    ]
    result = cancel_echo(fars * runs, mics * runs, opts, stage=make_stage(args))
    report: dict[str, Any] = {}
    for i, name in enumerate(names):
        far, mic = align_lengths(fars[i], mics[i])
        outs = {"unprocessed": mic, "aec": result.outputs[i][: len(mic)]}
        if runs == 2:
            outs["linear_only"] = result.outputs[i + len(names)][: len(mic)]
        if "anchor" in pairs[name]:
            outs["dtln_aec_anchor"] = np.pad(read_48k(pairs[name]["anchor"]), (0, len(mic)))[: len(mic)]
        tt = talk_types[name]
        entry: dict[str, Any] = {
            "files": {k: str(v) for k, v in pairs[name].items()},
            "talk_type": tt,
            "estimated_delay_ms": result.delays_ms[i],
        }
        entry["aecmos"] = {k: aecmos(far, mic, v, tt) for k, v in outs.items()}
        if tt == "st":
            entry["erle_db_after_2s"] = {
                k: round(erle_db(mic, v, SAMPLE_RATE, ERLE_FROM_S), 2) for k, v in outs.items()
            }
            entry["erle_curve_db"] = erle_curve(mic, outs["aec"])
        if tt == "nst":
            entry["vs_mic"] = {
                k: {
                    "si_sdr_db": round(min(si_sdr(v, mic), 100.0), 2),
                    "pesq_wb": round(pesq_wb(v, mic, SAMPLE_RATE), 3),
                    "level_change_db": round(level_change_db(v, mic), 3),
                }
                for k, v in outs.items()
                if k != "unprocessed"
            }
        report[name] = entry
    return report


# -- simulated set -----------------------------------------------------------------
def evaluate_simulated(args: argparse.Namespace) -> dict[str, Any]:
    seconds = 12.0 if args.quick else 16.0
    far = speech(FAR_SPEECH, seconds, args.data)
    delays = (50.0, 150.0, 300.0, 400.0)
    rirs = RIRS[:1] if args.quick else RIRS
    specs = [(rir, d, 6.0 if k % 2 else -6.0) for rir in rirs for k, d in enumerate(delays)]
    cases = [echo_scenario(far, room_response(rir, args.data), d, lc) for rir, d, lc in specs]
    near = np.zeros_like(far)
    talk = speech(NEAR_SPEECH, seconds / 2, args.data)
    near[len(far) // 2 :] = talk[: len(far) - len(far) // 2]
    dt = echo_scenario(far, room_response("rir_clap_44k.wav", args.data), 300.0, 0.0, near=near)
    all_cases = cases + [dt]
    n_all = len(all_cases)
    runs = 2 if has_linear_only(args) else 1
    opts = ([{"suppression": args.suppression}] * n_all + [{"suppression": "off"}] * n_all)[: runs * n_all]
    refs = [c.far for c in all_cases] * runs
    result = cancel_echo(refs, [c.mic for c in all_cases] * runs, opts, stage=make_stage(args))
    linear = (lambda i: result.outputs[i + n_all]) if runs == 2 else (lambda i: None)
    mid = seconds / 2
    rows: list[dict[str, Any]] = []
    for i, ((rir, d, lc), case) in enumerate(zip(specs, cases)):
        out, lin = result.outputs[i], linear(i)
        rows.append(
            {
                "rir": rir,
                "delay_ms": d,
                "level_change_db": lc,
                "true_delay_ms": round(case.true_delay_ms, 1),
                "estimated_delay_ms": result.delays_ms[i],
                "erle_db": {
                    "before_change": segment_erle(case.mic, out, 3.0, mid),
                    "first_second_after": segment_erle(case.mic, out, mid, mid + 1),
                    "reconverged": segment_erle(case.mic, out, mid + 3, seconds),
                },
                "linear_only_erle_db": None
                if lin is None
                else {
                    "before_change": segment_erle(case.mic, lin, 3.0, mid),
                    "first_second_after": segment_erle(case.mic, lin, mid, mid + 1),
                    "reconverged": segment_erle(case.mic, lin, mid + 3, seconds),
                },
                "erle_curve_db": erle_curve(case.mic, out),
            }
        )
    out_dt, lin_dt = result.outputs[n_all - 1], linear(n_all - 1)
    half = len(far) // 2
    doubletalk = {
        "rir": "rir_clap_44k.wav",
        "delay_ms": 300.0,
        "near_end_from_s": mid,
        "erle_db_far_only": segment_erle(dt.mic, out_dt, 3.0, mid),
        "near_si_sdr_db": {
            "mic": round(si_sdr(dt.mic[half:], near[half:]), 2),
            "aec": round(si_sdr(out_dt[half:], near[half:]), 2),
            "linear_only": None if lin_dt is None else round(si_sdr(lin_dt[half:], near[half:]), 2),
        },
        "near_pesq_wb": {
            "mic": round(pesq_wb(dt.mic[half:], near[half:], SAMPLE_RATE), 3),
            "aec": round(pesq_wb(out_dt[half:], near[half:], SAMPLE_RATE), 3),
        },
    }
    recon = [r["erle_db"]["reconverged"] for r in rows]
    return {
        "seconds": seconds,
        "cases": rows,
        "doubletalk": doubletalk,
        "summary": {
            "reconverged_erle_db_min": min(recon),
            "reconverged_erle_db_mean": round(float(np.mean(recon)), 2),
            "delay_errors_ms": [
                None
                if r["estimated_delay_ms"] is None
                else round(r["estimated_delay_ms"] - r["true_delay_ms"], 1)
                for r in rows
            ],
        },
    }


# -- report ---------------------------------------------------------------------------
def acceptance(real: dict[str, Any]) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    if "farend_singletalk" in real:
        e = real["farend_singletalk"]
        checks["farend_erle_after_2s_ge_25db"] = e["erle_db_after_2s"]["aec"] >= 25.0
        checks["farend_aecmos_echo_ge_4"] = e["aecmos"]["aec"]["echo"] >= 4.0
    if "nearend_singletalk" in real:
        v = real["nearend_singletalk"]["vs_mic"]["aec"]
        checks["nearend_level_change_le_0.5db"] = abs(v["level_change_db"]) <= 0.5
        checks["nearend_si_sdr_vs_mic_ge_30db"] = v["si_sdr_db"] >= 30.0
    if "doubletalk" in real:
        checks["doubletalk_aecmos_echo_ge_4"] = real["doubletalk"]["aecmos"]["aec"]["echo"] >= 4.0
    return checks


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    real = report.get("real", {})
    if "farend_singletalk" in real:
        curve = real["farend_singletalk"]["erle_curve_db"]
        axes[0].plot(np.arange(len(curve)) * 0.25, curve)
        axes[0].axvline(ERLE_FROM_S, color="gray", ls=":")
        axes[0].axhline(25, color="red", ls="--", lw=0.8)
    axes[0].set(title="Real far-end single talk: ERLE (0.25 s windows)", xlabel="s", ylabel="dB")
    labels, echo, deg = [], [], []
    for name, entry in real.items():
        for kind, mos in entry["aecmos"].items():
            labels.append(f"{SCENARIOS.get(name, name)}:{kind}")
            echo.append(mos["echo"])
            deg.append(mos["deg"])
    x = np.arange(len(labels))
    axes[1].bar(x - 0.2, echo, 0.4, label="echo")
    axes[1].bar(x + 0.2, deg, 0.4, label="deg")
    axes[1].set_xticks(x, labels, rotation=70, fontsize=7)
    axes[1].set(title="AECMOS", ylim=(1, 5))
    axes[1].legend()
    for row in report.get("simulated", {}).get("cases", []):
        curve = row["erle_curve_db"]
        axes[2].plot(
            np.arange(len(curve)) * 0.25,
            curve,
            lw=0.8,
            label=f"{row['rir'][:10]} {row['delay_ms']:.0f}ms {row['level_change_db']:+.0f}dB",
        )
    axes[2].set(title="Simulated: ERLE, echo level step at midpoint", xlabel="s", ylabel="dB")
    axes[2].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    if (args.reference is None) != (args.mic is None):
        raise SystemExit("--reference and --mic go together")
    if args.reference is not None:
        name = {v: k for k, v in SCENARIOS.items()}[args.scenario]
        pairs, talk = {name: {"lpb": args.reference, "mic": args.mic}}, {name: args.scenario}
    else:
        pairs = find_pairs(args.data / "aec")
        talk = {k: SCENARIOS[k] for k in pairs}
        if not pairs:
            raise SystemExit(f"no AEC recordings found in {args.data / 'aec'}")
    report: dict[str, Any] = {
        "task": "aec", "stage": args.stage, "suppression": args.suppression, "device": args.device
    }
    report["real"] = evaluate_real(pairs, talk, args)
    report["acceptance"] = acceptance(report["real"])
    if not args.no_sim and args.reference is None:
        report["simulated"] = evaluate_simulated(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / "aec.png")
    printable = json.loads(json.dumps(report))
    for entry in list(printable["real"].values()) + printable.get("simulated", {}).get("cases", []):
        entry.pop("erle_curve_db", None)
    print(json.dumps(printable, indent=2))
    return 0
