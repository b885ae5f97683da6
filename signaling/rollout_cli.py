"""``mediaserver rollout start|status|promote|rollback``: the rollout admin API from the command line.

It talks HTTP to a running server (``--url``, env ``MEDIASERVER_URL``, default
``http://127.0.0.1:8080``) with an admin token for every room (``--token``, env
``MEDIASERVER_ADMIN_TOKEN``; a development server needs none) and prints the server's JSON answer.
Exit status: 0 when the server accepted, 1 when it answered an error (its JSON on stderr), 2 when it
could not be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8080"


def add_parser(sub: Any) -> None:
    """The ``rollout`` subcommand on the ``mediaserver`` parser's subparsers."""
    rollout = sub.add_parser("rollout", help="canary / A/B rollout of a stage list (docs/ROLLOUT.md)")
    actions = rollout.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("MEDIASERVER_URL", DEFAULT_URL),
                        help=f"the server (env MEDIASERVER_URL, default {DEFAULT_URL})")
    common.add_argument("--token", default=os.environ.get("MEDIASERVER_ADMIN_TOKEN"),
                        help="admin token for every room (env MEDIASERVER_ADMIN_TOKEN; not needed with --dev)")
    start = actions.add_parser("start", parents=[common], help="start a rollout")
    start.add_argument("--candidate", required=True, help="the stage list to roll out, e.g. denoise:gtcrn")
    start.add_argument("--baseline", help="the stage list it replaces (default: the server's default stages)")
    start.add_argument("--room", action="append", dest="rooms", default=[],
                       help="a room in scope (repeat; default: every room)")
    start.add_argument("--percent", type=float,
                       help="share of eligible streams in scope given the candidate (default 50; 100 with --room)")
    start.add_argument("--max-ovrl-drop", type=float, help="MOS the candidate may lose against the baseline (0.1)")
    start.add_argument("--alpha", type=float, help="false-rollback rate of the quality test (0.05)")
    start.add_argument("--min-windows", type=int, help="scored windows per arm before a decision (5)")
    start.add_argument("--max-latency-increase-ms", type=float, help="latency guard (40)")
    start.add_argument("--max-bypassed", type=float, help="bypassed-chunk guard, share (0.02)")
    start.add_argument("--max-cpu-ratio", type=float, help="stage CPU guard, ratio; 0: off (4)")
    start.add_argument("--scoring-cpu-share", type=float, help="DNSMOS budget while it runs, share of a core (0.1)")
    start.add_argument("--no-auto-rollback", action="store_true", help="only report; roll back by command")
    for name, text in (("status", "the running (else the last) rollout"), ("promote", "promote the candidate"),
                       ("rollback", "roll the candidate back")):
        actions.add_parser(name, parents=[common], help=text)


def _request(url: str, token: str | None, method: str, path: str, body: dict[str, Any] | None = None) -> int:
    data = json.dumps(body).encode() if body is not None else (b"{}" if method == "POST" else None)
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            print(json.dumps(json.load(r), indent=1))
            return 0
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        print(text, file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mediaserver rollout: cannot reach {url}: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    if args.action == "start":
        body: dict[str, Any] = {"candidate": args.candidate}
        if args.baseline is not None:
            body["baseline"] = args.baseline
        if args.rooms:
            body["rooms"] = args.rooms
        for key in ("percent", "max_ovrl_drop", "alpha", "min_windows", "max_latency_increase_ms", "max_bypassed",
                    "max_cpu_ratio", "scoring_cpu_share"):
            if getattr(args, key) is not None:
                body[key] = getattr(args, key)
        if args.no_auto_rollback:
            body["auto_rollback"] = False
        return _request(args.url, args.token, "POST", "/api/rollouts", body)
    if args.action == "status":
        return _request(args.url, args.token, "GET", "/api/rollouts/current")
    return _request(args.url, args.token, "POST", f"/api/rollouts/current/{args.action}")
