"""``make soak`` in miniature: the soak bench runs end to end and reports plausible figures.

Twenty seconds, two bots in one room, one leave-and-rejoin: the JSON has
every field, no participant failed, the streams flowed, every participant
was gone from the server after the bots left, and the server's file
descriptors came back near where they started (a descriptor per call
leaking would show here already).  Growth rates over 20 s mean nothing and
are not checked; the figures of a real soak are in docs/SECURITY.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import eval_file

ROOT = Path(__file__).resolve().parents[1]


def test_short_soak_reports_plausible_figures() -> None:
    eval_file("speech")  # the bots talk real speech: skip where the recordings are missing
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--seconds", "20", "--bots", "2",
                          "--rooms", "1", "--window", "7", "--interval", "1"],
                         capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    for key in ("scenario", "duration_s", "samples", "server", "children", "total", "media", "participants",
                "after_all_left", "executor", "series", "ratios", "server_log"):
        assert key in report, key
    server = report["server"]
    for key in ("rss_mib_per_hour", "fds_per_hour"):
        assert key in server and key in report["total"]
    assert report["samples"] >= 5 and len(report["series"]) == report["samples"]
    assert 0 < server["rss_mib"]["start"] <= server["rss_mib"]["max"]
    assert "executor_worker" in report["children"]  # the server's stages run in their worker process
    assert report["participants"]["failed"] == 0, report["participants"]["failures"]
    assert report["participants"]["sessions"] >= 3  # two bots, at least one of them left and rejoined
    media = report["media"]
    assert media["windows"] >= 1 and media["frames_expected"] > 0 and media["streams_missing"] == 0
    assert media["drop_rate"] is not None and media["drop_rate"] < 0.5  # audio flowed (not a quality bar)
    assert report["after_all_left"] == {"participants": 0, "rooms": 0, "executor_live_streams": 0}
    fds = server["fds"]
    assert fds["max"] < 200
    assert fds["after_all_left"] <= fds["before_bots"] + 8, fds
    assert report["server_exit_code"] == 0 and report["server_log"]["tracebacks"] == 0
