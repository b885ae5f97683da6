"""Canary rollout of a stage list with automatic rollback, through the real server and real aiortc peers.

Two rooms publish noisy speech (real recordings, real noise) with the baseline ``denoise:rnnoise``.  A
rollout puts room ``canary`` on a deliberately worse candidate (``tests.rollout_stages.NoisyDenoiser``,
a "denoiser" that adds noise); room ``control`` stays on the baseline.  The server scores both arms on
the live DNSMOS windows and rolls the candidate back by itself: within the stated time (120 s from the
start of the rollout on this busy 2-core machine; nearly all of it waiting for scored windows), with the
quality test's verdict as the reason, and the canary's streams return to the baseline live: what the
subscribers receive has no hole longer than 100 ms of media time across both switches.  Also: the
arms in ``stats`` (the page's quality column), /metrics per arm, the admin API's errors and the CLI.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any

import aiohttp
import numpy as np
import pytest

from enhancers import registry
from loadtest.bot import Bot
from mediaserver.config import AuthConfig, EnhanceConfig, QualityConfig, ServerConfig
from tests.conftest import ServerFactory, noise, speech
from tests.test_browser import browser  # noqa: F401  (fixture: headless Chromium with a fake microphone)
from tests.test_telemetry import scrape, wait_for

BASELINE, CANDIDATE = "denoise:rnnoise", "denoise:noisy"
STATED_ROLLBACK_S = 120.0
MAX_GAP_MS = 100.0


@pytest.fixture
def noisy_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.STAGES, CANDIDATE, "tests.rollout_stages:NoisyDenoiser")


def _noisy(name: str) -> np.ndarray:
    clean = np.concatenate([speech(name), speech("cmu_arctic_us_axb_a0005.wav")])
    n = np.resize(noise("running_tap.wav"), len(clean))
    gain = np.sqrt(np.mean(clean ** 2) / np.mean(n ** 2) / 10 ** (10 / 10))
    return (clean + gain * n).astype(np.float32)


def _config(**quality: Any) -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, auth=AuthConfig(dev_mode=True),
                        # a busy test machine must not make the executor bypass chunks (no window takes a block with
                        # one) nor refuse stages (admission): this test is about the rollout, not about load
                        enhance=replace(EnhanceConfig(), default_stages=(BASELINE,), device="cpu", deadline_ms=400.0,
                                        admission=False),
                        # the scorer at normal priority: on a shared machine a niced process gets next to nothing
                        quality=QualityConfig(window_s=2, period_s=2, first_window_s=1, cpu_share=1.0, nice=0, scorer_idle=False,
                                              **quality))


def _stats_of(bot: Bot, stream: str) -> dict[str, Any] | None:
    for ev in reversed(bot.events_of("stats")):
        for s in ev.get("streams", []):
            if s.get("stream") == stream:
                return s  # type: ignore[no-any-return]
    return None


def _media_holes_ms(bot: Bot, publisher: str, since: float, until: float) -> tuple[float, float, int, float]:
    """(longest hole in media time, longest wait between packets, packets, when that wait ended) of what
    ``bot`` received from ``publisher``'s stream between ``since`` and ``until`` (RTP timestamps at 48 kHz,
    arrival times)."""
    hole = wait = 0.0
    count = 0
    wait_at = 0.0
    for rec in bot.recordings.values():
        if rec.participant != publisher:
            continue
        rows = [(t, ts) for t, ts in zip(rec.rtp_arrivals, rec.rtp_ts) if since <= t <= until]
        if not rows:
            continue
        first = rows[0][1]
        rows.sort(key=lambda r: (r[1] - first) % 2 ** 32)  # media order (loopback rarely reorders)
        count += len(rows)
        for (t0, ts0), (t1, ts1) in zip(rows, rows[1:]):
            step = ((ts1 - ts0) % 2 ** 32) / 48.0 - 20.0  # media time missing beyond one 20 ms packet
            hole = max(hole, step)
            if abs(t1 - t0) * 1000.0 > wait:
                wait, wait_at = abs(t1 - t0) * 1000.0, max(t0, t1)
    return hole, wait, count, wait_at


async def _api(http: aiohttp.ClientSession, url: str, method: str, path: str,
               body: dict[str, Any] | None = None) -> tuple[int, Any]:
    async with http.request(method, url + path, json=body) as r:
        return r.status, await r.json()


@pytest.mark.timeout(300)
async def test_a_worse_candidate_is_rolled_back_by_itself_without_a_gap(start_server: ServerFactory,
                                                                       noisy_stage: None, spans: Any) -> None:
    rs = await start_server(_config())
    pubs = {"canary": [Bot(rs.url, "canary", f"c{i}", _noisy(n)) for i, n in
                       enumerate(("cmu_arctic_us_aew_a0001.wav", "cmu_arctic_us_axb_a0004.wav"))],
            "control": [Bot(rs.url, "control", f"b{i}", _noisy(n)) for i, n in
                        enumerate(("cmu_arctic_us_aew_a0003.wav", "cmu_arctic_a0010.wav"))]}
    bots = [b for room in pubs.values() for b in room]
    for b in bots:
        await b.join()
    a, b = pubs["canary"]
    async with aiohttp.ClientSession() as http:
        try:
            await wait_for(lambda: b.received_from(a.id).size > 48_000 and a.received_from(b.id).size > 48_000,
                           timeout=30)
            status, body = await _api(http, rs.url, "POST", "/api/rollouts",
                                      {"candidate": CANDIDATE, "baseline": BASELINE, "rooms": ["canary"],
                                       "min_windows": 3, "scoring_cpu_share": 1.0})
            assert status == 201, body
            started = time.monotonic()
            assert body["state"] == "running" and body["candidate"] == [CANDIDATE] and body["percent"] == 100
            status, again = await _api(http, rs.url, "POST", "/api/rollouts", {"candidate": "denoise:gtcrn"})
            assert status == 409 and again["error"] == "rollout-running", again

            # every canary stream runs the candidate and says so in stats (the page's quality column); control not
            await wait_for(lambda: all((_stats_of(b, f"{p.id}-mic") or {}).get("stages") == [CANDIDATE]
                                       for p in pubs["canary"]), timeout=10)
            arms = {p.name: ((_stats_of(pubs[room][0], f"{p.id}-mic") or {}).get("quality") or {}).get("arm")
                    for room in pubs for p in pubs[room]}
            assert arms == {"c0": "candidate", "c1": "candidate", "b0": "baseline", "b1": "baseline"}, arms

            # the server rolls the candidate back by itself, on the quality test
            rollout: dict[str, Any] = {}

            async def rolled_back() -> bool:
                nonlocal rollout
                _, rollout = await _api(http, rs.url, "GET", "/api/rollouts/current")
                return bool(rollout["state"] != "running")

            while not await rolled_back() and time.monotonic() - started < STATED_ROLLBACK_S + 60:
                await asyncio.sleep(0.5)
            took = time.monotonic() - started
            print(f"rolled back after {took:.1f} s:", json.dumps(rollout))
            assert rollout["state"] == "rolled_back" and rollout["reason"].startswith("quality"), rollout
            assert took <= STATED_ROLLBACK_S, f"rolled back after {took:.0f} s (stated: {STATED_ROLLBACK_S:.0f} s)"
            q = rollout["quality"]
            assert q["verdict"] == "worse" and q["upper"] < -rollout["max_ovrl_drop"], q
            cand, base = rollout["arms"]["candidate"], rollout["arms"]["baseline"]
            assert cand["windows"] >= 3 and base["windows"] >= 3, rollout["arms"]
            assert cand["ovrl_gain"] < base["ovrl_gain"] - 0.3, rollout["arms"]
            ended = time.monotonic()

            # the canary is back on the baseline, live, with no arm
            await wait_for(lambda: all((_stats_of(b, f"{p.id}-mic") or {}).get("stages") == [BASELINE]
                                       and ((_stats_of(b, f"{p.id}-mic") or {}).get("quality") or {}).get("arm")
                                       is None for p in pubs["canary"]), timeout=10)
            await asyncio.sleep(2.0)
            # no hole in what the subscribers received, across the switch to the candidate and back
            since, until = started - 2.0, time.monotonic()
            for sub, pub in ((b, a), (a, b)):
                hole, wait, packets, at = _media_holes_ms(sub, pub.id, since, until)  # type: ignore[arg-type]
                print(f"{sub.name} <- {pub.name}: longest media hole {hole:.0f} ms, longest wait {wait:.0f} ms "
                      f"(ending {at - started:.1f} s after the start, rollback at {ended - started:.1f} s), "
                      f"{packets} packets in {until - since:.1f} s")
                _, wait_back, _, _ = _media_holes_ms(sub, pub.id, ended - 1.0, ended + 1.0)  # type: ignore[arg-type]
                print(f"  longest wait within 1 s of the rollback: {wait_back:.0f} ms")
                assert hole <= MAX_GAP_MS, f"{hole:.0f} ms of media missing"
                assert packets >= 0.5 * (until - since) / 0.02, packets  # audio flowed all along
            assert ended - started < 200

            # per arm in /metrics; the rollback counted by reason
            samples, _ = await scrape(rs.url)
            got = {(n, dict(lab).get("arm") or dict(lab).get("reason")): v for (n, lab), v in samples.items()
                   if n.startswith("mediaserver_rollout")}
            assert got[("mediaserver_rollout_rollbacks_total", "quality")] == 1, got
            assert got[("mediaserver_rollout_windows_total", "candidate")] >= 3, got
            assert got[("mediaserver_rollout_ovrl_gain", "candidate")] < got[("mediaserver_rollout_ovrl_gain",
                                                                              "baseline")], got
            assert got[("mediaserver_rollout_active", None)] == 0, got
            status, none = await _api(http, rs.url, "POST", "/api/rollouts/current/rollback")
            assert status == 404 and none["error"] == "no-rollout", none

            # the rollout's span, from start to the rollback, with its events
            span = next(sp for sp in spans.get_finished_spans() if sp.name == "rollout"
                        and sp.attributes.get("mediaserver.rollout") == rollout["id"])
            events = [e.name for e in span.events]
            assert events.count("rollout.assigned") == 4 and "rollout.verdict" in events, events
            assert events[-1] == "rollout.rolled_back" and span.attributes["mediaserver.rollout.state"] == "rolled_back"
            assert span.events[-1].attributes["mediaserver.rollout.reason"].startswith("quality")
        finally:
            for bot in bots:
                await bot.leave()


def _cli(url: str, *args: str) -> tuple[int, Any]:
    proc = subprocess.run([sys.executable, "-m", "signaling.main", "rollout", *args, "--url", url],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})
    out = proc.stdout if proc.returncode == 0 else proc.stderr
    return proc.returncode, json.loads(out) if out.strip().startswith("{") else out


@pytest.mark.timeout(240)
async def test_cli_starts_promotes_and_rolls_back(start_server: ServerFactory) -> None:
    """``mediaserver rollout``: a room canary of ``vad:webrtc,limiter`` against ``limiter``, promoted (the
    room's stages become the candidate), then a second one rolled back by command; bad requests refused."""
    cfg = replace(_config(enabled=False), enhance=replace(_config().enhance, default_stages=("limiter",)))
    rs = await start_server(cfg)
    talker = Bot(rs.url, "cli", "talker", speech())
    other = Bot(rs.url, "elsewhere", "other", speech("cmu_arctic_us_axb_a0004.wav"))
    await talker.join()
    await other.join()
    loop = asyncio.get_running_loop()
    try:
        rc, out = await loop.run_in_executor(None, _cli, rs.url, "start", "--candidate", "limiter,vad:webrtc",
                                             "--room", "cli", "--no-auto-rollback")
        assert rc == 0 and out["state"] == "running" and out["candidate"] == ["vad:webrtc", "limiter"], out
        assert not out["auto_rollback"] and out["baseline"] == ["limiter"]
        room = rs.server.rooms.rooms
        await wait_for(lambda: room["cli"].participants[talker.id].published is not None  # type: ignore[index]
                       and room["cli"].participants[talker.id].published.pipeline.stages  # type: ignore[index,union-attr]
                       == ["vad:webrtc", "limiter"], timeout=10)
        assert room["elsewhere"].participants[other.id].published.pipeline.stages == ["limiter"]  # type: ignore[index,union-attr]
        rc, out = await loop.run_in_executor(None, _cli, rs.url, "status")
        assert rc == 0 and out["arms"]["candidate"]["streams"] == 1 and out["arms"]["baseline"]["streams"] == 1, out
        rc, out = await loop.run_in_executor(None, _cli, rs.url, "promote")
        assert rc == 0 and out["state"] == "promoted", out
        assert room["cli"].stages == ["vad:webrtc", "limiter"] and room["elsewhere"].stages == ["limiter"]
        assert room["cli"].participants[talker.id].published.pipeline.stages == ["vad:webrtc", "limiter"]  # type: ignore[index,union-attr]

        rc, out = await loop.run_in_executor(None, _cli, rs.url, "start", "--candidate", "denoise:rnnoise,limiter",
                                             "--baseline", "limiter", "--percent", "100")
        assert rc == 0 and out["rooms"] == [], out
        await wait_for(lambda: room["elsewhere"].participants[other.id].published.pipeline.stages  # type: ignore[index,union-attr]
                       == ["denoise:rnnoise", "limiter"], timeout=10)
        rc, out = await loop.run_in_executor(None, _cli, rs.url, "rollback")
        assert rc == 0 and out["state"] == "rolled_back" and out["reason"] == "command", out
        assert room["elsewhere"].participants[other.id].published.pipeline.stages == ["limiter"]  # type: ignore[index,union-attr]
        assert room["cli"].participants[talker.id].published.pipeline.stages == ["vad:webrtc", "limiter"]  # type: ignore[index,union-attr]
        rc, out = await loop.run_in_executor(None, _cli, rs.url, "start", "--candidate", "nonsense")
        assert rc == 1 and out["error"] == "bad-stages", out
        rc, out = await loop.run_in_executor(None, _cli, rs.url, "start", "--candidate", "limiter")
        assert rc == 1 and out["error"] == "bad-rollout", out
        rc, out = await loop.run_in_executor(None, _cli, "http://127.0.0.1:9", "status")
        assert rc == 2
        _, text = await scrape(rs.url)
        assert re.search(r'^mediaserver_rollout_rollbacks_total\{reason="command"\} 1(\.0)?$', text, re.M)
    finally:
        await talker.leave()
        await other.leave()


async def test_rollout_api_needs_an_admin_token_for_every_room(start_server: ServerFactory) -> None:
    from mediaserver.auth import create_token

    secret = "s" * 32
    rs = await start_server(ServerConfig(host="127.0.0.1", port=0, auth=AuthConfig(secret=secret),
                                         enhance=replace(EnhanceConfig(), default_stages=(), device="cpu")))
    room_admin = create_token(secret, room="lobby", identity="ops", permissions=("admin",), ttl_s=60)
    admin = create_token(secret, room="*", identity="ops", permissions=("admin",), ttl_s=60)
    async with aiohttp.ClientSession() as http:
        r = await http.post(f"{rs.url}/api/rollouts", json={"candidate": "limiter"})
        assert r.status == 401
        r = await http.post(f"{rs.url}/api/rollouts", json={"candidate": "limiter"},
                            headers={"Authorization": f"Bearer {room_admin}"})
        assert r.status == 403, await r.text()
        r = await http.get(f"{rs.url}/api/rollouts", headers={"Authorization": f"Bearer {admin}"})
        assert r.status == 200 and (await r.json()) == {"current": None, "history": []}
        r = await http.get(f"{rs.url}/api/rollouts/current", headers={"Authorization": f"Bearer {admin}"})
        assert r.status == 404 and (await r.json())["error"] == "no-rollout"


@pytest.mark.browser
async def test_browser_page_shows_each_streams_arm(start_server: ServerFactory, browser) -> None:  # type: ignore[no-untyped-def]  # noqa: F811,E501
    """The page's quality column names the rollout arm of every stream it shows."""
    from tests.test_browser import _join

    cfg = replace(_config(), enhance=replace(_config().enhance, default_stages=("limiter",)))
    rs = await start_server(cfg)
    bot = Bot(rs.url, "webarm", "bot", speech())
    await bot.join()
    tab = await (await browser.new_context()).new_page()
    try:
        await _join(tab, rs.url, "webarm", "tab")
        async with aiohttp.ClientSession() as http:
            status, body = await _api(http, rs.url, "POST", "/api/rollouts",
                                      {"candidate": "vad:webrtc,limiter", "rooms": ["webarm"]})
        assert status == 201, body
        # the bot's stream runs the room's stages, the baseline: it is in the candidate arm now.  The tab's
        # own microphone is not eligible: without browser echo cancellation it runs the server's aec as well
        await tab.wait_for_function(
            "[...document.querySelectorAll('#stats tbody tr')].some(r => /^bot/.test(r.textContent)"
            " && /arm candidate/.test(r.textContent))", timeout=30_000)
        rows = await tab.evaluate("[...document.querySelectorAll('#stats tbody tr')].map(r => r.textContent)")
        assert not any(r.startswith("my microphone") and "arm" in r for r in rows), rows
    finally:
        await bot.leave()
        await tab.context.close()
