"""The ``loadtest`` command: ``loadtest run`` (fixed load) and ``loadtest ramp`` (grow until an SLO breaks).

Both drive a running server over the wire only (HTTP, WebSocket, WebRTC),
write ``report.json`` and ``report.html`` to ``--out``, show progress on
stderr and print the headline figures as JSON on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from loadtest.ramp import RampPlan, Slo, run_ramp
from loadtest.report import write_report
from loadtest.session import SessionConfig, run_load
from loadtest.sources import SourceConfig, default_dir


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, action="append",
                   help="server base URL, e.g. http://127.0.0.1:8080; repeated (a cluster's nodes): bots join "
                        "through them in turn, metrics are read from the first")
    p.add_argument("--speech", help="folder of speech recordings (default ../shared/eval/speech)")
    p.add_argument("--noise", help="folder of noise recordings (default ../shared/eval/noise)")
    p.add_argument("--snr", type=float, default=10.0, help="speech-to-noise ratio of the mix, dB (default 10)")
    p.add_argument("--no-noise", action="store_true", help="publish clean speech")
    p.add_argument("--stages", help="per-bot stages sent at join (e.g. 'denoise'; 'none' for none); "
                                    "default: the room's stages")
    p.add_argument("--processes", type=int, default=None,
                   help="worker processes for the bots (default: CPU count, at most one per bot; 0: in this process)")
    p.add_argument("--warmup", type=float, default=4.0, help="seconds between joining and measuring")
    p.add_argument("--token", default=os.environ.get("LOADTEST_TOKEN"),
                   help="join token sent by every bot (env LOADTEST_TOKEN); not needed with --dev servers")
    p.add_argument("--dnsmos-per-publisher", type=int, default=1,
                   help="subscribers whose copy of each stream is scored with DNSMOS (default 1)")
    p.add_argument("--no-sent-dnsmos", action="store_true", help="do not score what publishers sent")
    p.add_argument("--full-aiortc", action="store_true",
                   help="bots use aiortc's own encode/decode threads (heavier) instead of the light media path")
    p.add_argument("--no-fast-path", action="store_true",
                   help="light bots send and receive through aiortc's per-packet path instead of the shared "
                        "send timer and socket-level receive (loadtest.wire)")
    p.add_argument("--no-uvloop", action="store_true", help="worker processes run asyncio's own event loop")
    p.add_argument("--decode-share", type=float, default=1.0,
                   help="share of received streams each light bot decodes for marker latency (default 1: all); "
                        "the others are counted from RTP headers only (loss, gaps, jitter)")
    p.add_argument("--sequential-joins", action="store_true", help="join bots one at a time")
    p.add_argument("--no-spread-addresses", action="store_true",
                   help="do not spread bots over 127.0.0.x source addresses against a loopback server")
    p.add_argument("--out", type=Path, help="report folder (default loadtest-<kind>-<time>)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--verbose", action="store_true", help="log the analysis")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loadtest", description="Real WebRTC participants against a mediaserver")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="N bots in M rooms for a duration")
    _common(run)
    run.add_argument("--bots", type=int, default=6)
    run.add_argument("--rooms", type=int, default=2)
    run.add_argument("--duration", type=float, default=20.0, help="measured seconds (after the warm-up)")
    ramp = sub.add_parser("ramp", help="add participants until an SLO breaks")
    _common(ramp)
    ramp.add_argument("--start", type=int, default=2, help="participants of the first step")
    ramp.add_argument("--step", type=int, default=2, help="participants added per step")
    ramp.add_argument("--max", type=int, default=40, help="stop after this many participants")
    ramp.add_argument("--room-size", type=int, default=4, help="participants per room")
    ramp.add_argument("--hold", type=float, default=15.0, help="measured seconds per step")
    ramp.add_argument("--slo-p99-ms", type=float, default=400.0, help="p99 latency objective, ms")
    ramp.add_argument("--slo-drop-rate", type=float, default=0.01, help="missing-frame share objective")
    ramp.add_argument("--slo-dnsmos", type=float, default=2.0, help="DNSMOS OVRL floor")
    return parser


def session_config(args: argparse.Namespace, bots: int) -> SessionConfig:
    noise = None if args.no_noise else (args.noise or (str(default_dir("noise")) if default_dir("noise") else None))
    sources = SourceConfig(speech_dir=args.speech, noise_dir=noise, snr_db=None if noise is None else args.snr)
    processes = args.processes if args.processes is not None else min(os.cpu_count() or 1, bots)
    return SessionConfig(url=args.url[0], join_urls=args.url if len(args.url) > 1 else [], sources=sources,
                         stages=args.stages, processes=processes, token=args.token,
                         dnsmos_per_publisher=args.dnsmos_per_publisher, warmup_s=args.warmup,
                         progress=not args.quiet, score_sent=not args.no_sent_dnsmos, light=not args.full_aiortc,
                         fast=not args.no_fast_path, uvloop=not args.no_uvloop,
                         sequential_joins=args.sequential_joins, decode_share=args.decode_share,
                         spread_source_addresses=not args.no_spread_addresses)


def headline(report: dict[str, Any], report_dir: Path | None = None) -> dict[str, Any]:
    """The few figures worth printing: what a reader of the terminal wants to see."""
    s = report.get("summary", {})
    mvs = s.get("marker_vs_server", {})
    out = {
        "kind": report.get("kind"),
        "bots": s.get("bots"), "bots_failed": s.get("bots_failed"), "streams": s.get("streams"),
        "join_ms_p50": s.get("join_ms", {}).get("p50"),
        "latency_ms_p50": s.get("latency_ms", {}).get("p50"), "latency_ms_p99": s.get("latency_ms", {}).get("p99"),
        "server_e2e_latency_ms_p50": s.get("server_e2e_latency_ms", {}).get("p50"),
        "marker_minus_server_ms": mvs.get("difference_ms"),
        "jitter_ms_mean": s.get("jitter_ms", {}).get("mean"),
        "drop_rate": s.get("drop_rate"), "gaps": s.get("gaps"), "longest_gap_ms": s.get("longest_gap_ms"),
        "dnsmos_ovrl": s.get("dnsmos", {}).get("ovrl"), "sent_dnsmos_ovrl": s.get("sent_dnsmos", {}).get("ovrl"),
        "loadgen_loop_lag_ms_p50": s.get("loadgen_loop_lag_ms", {}).get("p50"),
        "loadgen_loop_lag_ms_p99": s.get("loadgen_loop_lag_ms", {}).get("p99"),
        "loadgen_cpu_cores": s.get("loadgen_cpu", {}).get("cores"),
        "loadgen_cpu_ms_per_bot_per_s": s.get("loadgen_cpu", {}).get("ms_per_bot_per_s"),
        "loadgen_packets_per_s": s.get("loadgen_cpu", {}).get("packets_per_s"),
        "loadgen_cpu_us_per_packet": s.get("loadgen_cpu", {}).get("us_per_packet"),
    }
    if report.get("kind") == "ramp":
        out["max_participants_held"] = report.get("max_participants_held")
        out["steps"] = [[st["participants"], st["held"]] for st in report.get("steps", [])]
    if report_dir is not None:
        out["report"] = str(report_dir / "report.html")
    return out


async def _main(args: argparse.Namespace) -> int:
    if args.command == "run":
        report = await run_load(session_config(args, args.bots), args.bots, args.rooms, args.duration)
    else:
        plan = RampPlan(start=args.start, step=args.step, max_participants=args.max, room_size=args.room_size,
                        hold_s=args.hold)
        slo = Slo(p99_latency_ms=args.slo_p99_ms, drop_rate=args.slo_drop_rate, dnsmos_ovrl=args.slo_dnsmos)
        report = await run_ramp(session_config(args, args.max), plan, slo)
    out = args.out or Path(f"loadtest-{args.command}-{time.strftime('%Y%m%d-%H%M%S')}")
    write_report(report, out)
    print(json.dumps(headline(report, out), indent=1))
    return 0 if report.get("summary", {}).get("streams") else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(_main(args))
    except (OSError, FileNotFoundError) as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
