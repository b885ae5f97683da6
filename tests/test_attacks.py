"""The attack suite, bounded: every attack class against a live production-mode server during a real call.

``bench/attack.py --quick`` in-process: a fresh ``mediaserver serve`` (tokens, SIP digest users), two
real WebRTC participants talking, then each attack in its own window.  Asserted is what does not
depend on the machine's speed: nobody legitimate is evicted, the call keeps carrying audio, the
server reacts as documented (refusals, closes, timeouts), anonymous SIP callers hear nothing, the
executor comes back after its worker was stopped, and memory and file descriptors stay bounded.
The gap figures against issue 17's 100 ms are the benchmark's (``make attack``).
"""

from __future__ import annotations

from typing import Any

from bench.attack import RSS_LIMIT_MIB, production_server, run_suite


async def test_every_attack_leaves_the_call_and_the_server_standing() -> None:
    with production_server() as (url, sip_port, proc):
        report = await run_suite(url, sip_port, proc.pid, quick=True, seconds=2.0)
    by: dict[str, dict[str, Any]] = {r["attack"]: r for r in report["attacks"]}
    for name, r in by.items():
        assert "attack_error" not in (r["attacker"] or {}), (name, r["attacker"])
        assert r["evicted"] == 0, (name, r)
        assert r["frames_expected"] > 0 and r["frames_lost"] < 0.5 * r["frames_expected"], (name, r)
        assert r["rss_growth_mib"] <= RSS_LIMIT_MIB, (name, r)
    assert by["ws-stage-join"]["attacker"]["reply"] == "bad-stages"
    assert by["stage-types"]["attacker"] == {"websocket": "bad-stages", "http_status": 400,
                                             "http_error": "bad-stages"}
    assert by["http-nested-json"]["attacker"]["status"] == 400
    assert by["http-slowloris"]["attacker"]["still_open"] == 0
    assert by["ws-same-identity"]["attacker"].get("bye_replaced") == 5
    assert by["sip-anonymous-listen"]["attacker"] == {"statuses": [401], "rtp_received": 0}
    assert set(by["sip-invite-flood"]["attacker"]["statuses"]) <= {"401", "503", "486", 401, 503, 486}
    assert by["sip-tcp-lockout"]["attacker"]["newcomer_status"] == 200
    assert by["worker-sigstop"]["attacker"].get("disabled_after", []) == []
    after = report["after"]
    assert after["participants"] == 2 and after["evicted"] == 0 and after["stages_disabled"] == []
    assert "offer-timeout" in after["join_without_offer"]["seen"]
    assert after["fd_growth"] <= 8, after
