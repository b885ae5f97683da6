"""Benchmark: what one intelligibility pair of the live quality SLIs costs, in the real scorer process.

The scorer process (``enhancers.quality.scorer_process.ScorerProcess``, as the server starts it but
unniced) is started twice, without and with ``ScorerSettings.wer`` (Whisper tiny.en); its RSS after
start-up is read from /proc (what Whisper adds to the ``ms-quality`` process).  Then ``--windows``
4 s windows of real speech (../shared/eval, lightly noisy: running tap at 20 dB SNR) are submitted
one batch each, as the monitor does: two DNSMOS clips (before, after DF3, ``denoise``) and one pair
(before, after, aligned).  The worker measures its own CPU per part (``time.process_time``, what the
server's budget is charged); the answer's WER and word count are reported too.

    .venv/bin/python bench/quality_wer_cost.py [--windows 8] [--quick]

Prints JSON: start-up seconds and RSS of the scorer with and without Whisper, per window the DNSMOS
CPU of its two clips and the CPU of its pair, their means and the pair's share of a window.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from enhancers.audio_io import read_48k  # noqa: E402
from enhancers.eval.asr import IntelligibilityConfig  # noqa: E402
from enhancers.quality.scorer_process import ScorerProcess, ScorerSettings  # noqa: E402

EVAL = ROOT.parent / "shared" / "eval"
NAMES = ["cmu_arctic_us_aew_a0001", "cmu_arctic_us_aew_a0002", "cmu_arctic_us_aew_a0003", "cmu_arctic_a0010",
         "cmu_arctic_us_axb_a0006", "vctk_p286_011_48k"]
WINDOW = 4 * 48_000


def _speech() -> np.ndarray:
    parts = []
    for n in NAMES:
        x = read_48k(EVAL / "speech" / f"{n}.wav")
        parts.append(x / (np.max(np.abs(x)) + 1e-9) * 0.5)
    clean = np.concatenate(parts)
    noise = np.resize(read_48k(EVAL / "noise" / "running_tap.wav"), len(clean))
    gain = np.sqrt(np.mean(clean ** 2) / (np.mean(noise ** 2) + 1e-12) / 100.0)
    return (clean + gain * noise).astype(np.float32)


def _rss_mib(pid: int | None) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return None


def _start(settings: ScorerSettings) -> tuple[ScorerProcess, float]:
    proc = ScorerProcess(settings)
    t = time.monotonic()
    proc.start()
    return proc, time.monotonic() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="3 windows")
    args = ap.parse_args()
    windows = 3 if args.quick else args.windows

    from enhancers.denoise.streaming import run_streams
    from enhancers.registry import create_stage

    noisy = _speech()
    (enhanced,) = run_streams(create_stage("denoise"), [noisy])  # DF3, aligned to the input (look-ahead removed)

    plain, plain_start = _start(ScorerSettings(nice=0))
    plain_rss = _rss_mib(plain.pid)
    plain.close()
    cfg = IntelligibilityConfig(enabled=True, sample_seconds=5.0, min_words=3, threads=1)
    proc, wer_start = _start(ScorerSettings(nice=0, wer=cfg))
    wer_rss = _rss_mib(proc.pid)
    rows: list[dict[str, object]] = []
    pair: list[float] = []
    dnsmos: list[float] = []
    try:
        for k in range(windows):
            i = (k * WINDOW) % (len(noisy) - WINDOW)
            before, after = noisy[i:i + WINDOW], enhanced[i:i + WINDOW]
            batch = proc.submit([before, after], pairs=[(before, after)]).result(timeout=300)
            (answer,) = batch.wers
            pair.append(answer.cpu_s)
            dnsmos.append(batch.cpu_s)
            rows.append({"at_s": round(i / 48_000, 1), "dnsmos_cpu_s": round(batch.cpu_s, 3),
                         "pair_cpu_s": round(answer.cpu_s, 3), "wer": answer.wer, "words": answer.words,
                         "error": answer.error or None})
    finally:
        proc.close()
    print(json.dumps({
        "scorer_start_s": {"dnsmos": round(plain_start, 2), "dnsmos_and_whisper": round(wer_start, 2)},
        "scorer_rss_mib": {"dnsmos": plain_rss, "dnsmos_and_whisper": wer_rss},
        "windows": rows,
        "mean_dnsmos_cpu_s_per_window": round(statistics.mean(dnsmos), 3),
        "mean_pair_cpu_s": round(statistics.mean(pair), 3),
        "max_pair_cpu_s": round(max(pair), 3),
        "pair_share_of_window": round(statistics.mean(pair) / (statistics.mean(pair) + statistics.mean(dnsmos)),
                                      3),
    }, indent=1))


if __name__ == "__main__":
    main()
