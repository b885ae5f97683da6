"""The optional intelligibility SLI of the live quality sampler: a WER per sampled window.

Fast checks first: the configuration (off by default, ``MEDIASERVER_QUALITY_WER``), the pair a window
becomes (the "after" audio shifted back by the stages' declared latency, through the real tap), which
windows are pairs (every ``wer_every``-th with stages that change the audio, none when off), and the
budget (a pair's cost reserved, charged and estimated; the bucket always holds one window with a
pair).  Then a live call: a real aiortc bot publishes real speech (../shared/eval) to a server with
``denoise`` and the SLI on; Whisper tiny.en runs in the scorer process, and ``stats`` shows a WER
over at least 3 words, below 0.5; ``/metrics`` has the per room/stage-set histogram and the pair
counter, the stream's ``track`` span the ``mediaserver.quality.wer*`` attributes; the browser page
shows it in the stream's quality text.  The disabled
default shows none (and ``tests/test_quality_sli.py``'s live call, which runs the default, checks
``stats`` has ``wer: null``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.bot import Bot
from mediaserver.config import AuthConfig, EnhanceConfig, QualityConfig, ServerConfig, load_config
from mediaserver.pipeline import PipelineResult
from mediaserver.quality import BLOCK_CHUNKS, CHUNK, QualityMonitor, QualityTap, _Block
from mediaserver.quality_budget import ScoringBudget
from mediaserver.quality_wer import aligned_pair, wants_pair
from tests.conftest import ServerFactory, noise, speech
from tests.test_browser import browser  # noqa: F401  (fixture: headless Chromium with a fake microphone)

LATENCY = 1440  # DF3's declared look-ahead at 48 kHz (30 ms)


class _Pipeline:
    def __init__(self, stages: list[str], latency: int = 0) -> None:
        self.stages = stages
        self.latency_samples = latency


class _Stream:
    def __init__(self, stages: list[str], latency: int = 0) -> None:
        self.pipeline = _Pipeline(stages, latency)


def _blocks(monitor: QualityMonitor, stages: list[str], seconds: int,
            latency: int = 0) -> tuple[list[_Block], np.ndarray]:
    """``seconds`` of noise through a real tap, the "after" side delayed by ``latency`` samples (and halved)."""
    blocks: list[_Block] = []
    monitor.submit = blocks.append  # type: ignore[method-assign,assignment]
    tap = QualityTap(monitor, "s", "r")
    stream = _Stream(stages, latency)
    x = (0.1 * np.random.default_rng(1).standard_normal(seconds * BLOCK_CHUNKS * CHUNK)).astype(np.float32)
    delayed = np.concatenate([np.zeros(latency, dtype=np.float32), x])[: len(x)] * 0.5
    for i in range(0, len(x), CHUNK):
        chunk = x[i:i + CHUNK]
        after = delayed[i:i + CHUNK] if stages else chunk
        tap.on_chunk(stream, chunk, PipelineResult(audio=after))
    return blocks, x


def test_off_by_default_and_from_the_environment() -> None:
    assert QualityConfig().wer_every == 0
    assert load_config({"MEDIASERVER_DEV": "1"}).quality.wer_every == 0
    for text, every in (("1", 1), ("on", 1), ("true", 1), ("4", 4), ("0", 0), ("off", 0)):
        assert load_config({"MEDIASERVER_DEV": "1", "MEDIASERVER_QUALITY_WER": text}).quality.wer_every == every
    with pytest.raises(ValueError):
        load_config({"MEDIASERVER_DEV": "1", "MEDIASERVER_QUALITY_WER": "-1"})
    monitor = QualityMonitor()
    assert monitor.stats()["wer"] is None and monitor.budget.max_wer_pairs == 0
    assert monitor.stream_stats("nobody")["wer"] is None


def test_a_pair_is_the_window_before_and_after_aligned_on_the_stages_latency() -> None:
    monitor = QualityMonitor(QualityConfig(wer_every=1))
    blocks, x = _blocks(monitor, ["denoise"], 4, LATENCY)
    assert [b.latency for b in blocks] == [LATENCY] * 4 and wants_pair(blocks)
    before, after = aligned_pair(blocks)
    assert len(before) == len(after) == len(x) - LATENCY
    np.testing.assert_array_equal(after, before * 0.5)  # sample for sample the same speech
    # no stages, or stages that left the audio as it was: nothing to compare
    plain, _ = _blocks(monitor, [], 4)
    assert all(b.after is None for b in plain) and not wants_pair(plain)


def _windows(monitor: QualityMonitor, stages: list[str], seconds: int) -> list[bool]:
    blocks, _ = _blocks(monitor, stages, seconds)
    for b in blocks:
        monitor._on_block(b)  # the scorer thread's step, without the thread (no scorer process: nothing pumps)
    return [w.wer for w in monitor._pending]


def test_every_kth_window_with_stages_is_a_pair_and_none_when_off() -> None:
    cfg = QualityConfig(period_s=2, window_s=2, first_window_s=0, settle_s=0, cpu_share=1.0, max_pending=64)
    assert _windows(QualityMonitor(replace(cfg, wer_every=2)), ["denoise"], 16) == [True, False] * 4
    assert _windows(QualityMonitor(replace(cfg, wer_every=1)), ["denoise"], 8) == [True] * 4
    assert _windows(QualityMonitor(replace(cfg, wer_every=1)), [], 8) == [False] * 4  # no stages: no pair
    assert _windows(QualityMonitor(cfg), ["denoise"], 8) == [False] * 4  # off (the default)


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_budget_reserves_charges_and_learns_the_cost_of_pairs() -> None:
    clock = _Clock()
    budget = ScoringBudget(cpu_share=0.02, burst_s=60.0, clock=clock)  # 1.2 s: less than a window with a pair
    budget.max_wer_pairs = 1
    assert budget.capacity >= 2 * budget.clip_cost_s + budget.wer_pair_cost_s  # such a window can be granted
    seconds, windows = 3600, 0
    for _ in range(seconds):
        clock.t += 1.0
        for s in ("a", "b", "c"):
            reserved = budget.request(s, 2, 1)
            if reserved is not None:
                windows += 1
                budget.charge(reserved, 0.8, 2, 1, 1.6)  # two clips at 0.4 s, one pair at 1.6 s
    # what the scorer spent, pairs included, stays within the share (plus the bucket it started with)
    assert budget.charged_s <= 0.02 * seconds + budget.capacity + 1e-6, budget.stats()
    assert budget.charged_s >= 0.02 * seconds * 0.85, budget.stats()
    assert abs(budget.wer_pair_cost_s - 1.6) < 0.01 and abs(budget.clip_cost_s - 0.4) < 0.01
    assert windows <= (0.02 * seconds + budget.capacity) / 2.4 + 1  # fewer windows, not more CPU
    assert budget.stats()["wer_pair_cost_s"] == 1.6


# -- live ---------------------------------------------------------------------------------------------
def _live_config() -> ServerConfig:
    # deadline 400 ms: on a busy machine DF3 chunks that miss the 40 ms deadline pass through raw, and a window
    # takes no block with such a chunk. The scorer unniced and a large share: scored soon on a busy machine.
    return ServerConfig(host="127.0.0.1", port=0, auth=AuthConfig(dev_mode=True),
                        enhance=replace(EnhanceConfig(), default_stages=(), device="cpu", deadline_ms=400.0),
                        quality=QualityConfig(period_s=4, window_s=4, first_window_s=1, cpu_share=1.0, nice=0, scorer_idle=False,
                                              wer_every=1))


def _speech() -> np.ndarray:
    """About 25 s of real read speech, lightly noisy (running tap at 20 dB SNR)."""
    names = ["cmu_arctic_us_aew_a0001.wav", "cmu_arctic_us_aew_a0002.wav", "cmu_arctic_us_aew_a0003.wav",
             "cmu_arctic_a0010.wav", "cmu_arctic_us_axb_a0006.wav", "vctk_p286_011_48k.wav"]
    clean = np.concatenate([speech(n) for n in names])
    n = np.resize(noise("running_tap.wav"), len(clean))
    gain = np.sqrt(np.mean(clean ** 2) / (np.mean(n ** 2) + 1e-12) / 10 ** (20 / 10))
    return (clean + gain * n).astype(np.float32)


async def _wer_of(bot: Bot, stream: str, timeout: float) -> dict[str, Any]:
    """The stream's ``quality`` from ``stats`` once it shows a pair over >= 3 words with a WER below 0.5 (one
    4 s pair is noisy: a word cut at the window's edge, a misheard one; the mean over pairs is checked too)."""
    deadline = time.monotonic() + timeout
    seen: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        for ev in reversed(bot.events_of("stats")):
            for s in ev.get("streams", []):
                q = s.get("quality") or {}
                wer = q.get("wer")
                if s.get("stream") == stream and wer:
                    if wer["words"] >= 3 and wer["wer"] < 0.5:
                        return q  # type: ignore[no-any-return]
                    if wer not in seen:
                        seen.append(wer)
        await asyncio.sleep(0.25)
    raise AssertionError(f"no intelligibility pair with >= 3 words and WER < 0.5 within {timeout} s: {seen}")


async def _wer_metrics(url: str, room: str, timeout: float) -> dict[str, Any]:
    """The room's WER histogram (count, sum, labels) and the scored pairs, once /metrics has them (the telemetry
    sampler records a pair within a second of its report)."""
    deadline = time.monotonic() + timeout
    found: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            text = await (await http.get(f"{url}/metrics")).text()
            found = {"scored": 0.0}
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    if s.name in ("mediaserver_quality_wer_count", "mediaserver_quality_wer_sum") \
                            and s.labels.get("room") == room:
                        found[s.name.rsplit("_", 1)[1]] = s.value
                        found["labels"] = dict(s.labels)
                    if s.name == "mediaserver_quality_wer_pairs_total" and s.labels.get("result") == "scored":
                        found["scored"] += s.value
            if found.get("count"):
                return found
            await asyncio.sleep(0.5)
    raise AssertionError(f"no mediaserver_quality_wer series of room {room!r} in /metrics: {found}")


@pytest.mark.timeout(240)
async def test_live_call_with_denoise_reports_a_plausible_wer(start_server: ServerFactory,
                                                             spans: Any) -> None:
    rs = await start_server(_live_config())
    await rs.server.hub.executor.preload(["denoise"])
    pub = Bot(rs.url, "wer", "pub", _speech(), stages=["denoise"])
    await pub.join()
    stream = f"{pub.id}-mic"
    try:
        q = await _wer_of(pub, stream, timeout=150)
        found = await _wer_metrics(rs.url, "wer", timeout=20)
    finally:
        await pub.leave()
    wer = q["wer"]
    health = rs.server.health()["quality"]
    print("live call, denoise on lightly noisy speech:", wer, q["mos"], health["wer"], health["budget"])
    assert wer["stages"] == "denoise" and wer["pairs"] >= 1 and wer["age_s"] >= 0, wer
    assert wer["words"] >= 3, wer
    assert 0.0 <= wer["wer"] < 0.5, wer
    assert health["wer"]["every"] == 1 and health["wer"]["pairs"]["scored"] >= 1, health["wer"]
    assert health["wer"]["pairs"]["failed"] == 0 and health["wer"]["cpu_per_pair_s"] > 0, health["wer"]
    assert health["budget"]["wer_pair_cost_s"] > 0, health["budget"]
    # /metrics: the per room and stage set histogram, the pair counter (bounded labels: no stream); the mean
    # over every pair scored so far is plausible too
    labels = found["labels"]
    assert labels.get("stages") == "denoise" and not {"stream", "participant"} & set(labels), found
    assert found["count"] >= 1 and found["scored"] >= 1 and 0.0 <= found["sum"] / found["count"] < 0.5, found
    # the stream's track span carries the last pair (it ends once the sampler sees the stream gone)
    deadline = time.monotonic() + 20
    track: dict[str, Any] = {}
    while not track and time.monotonic() < deadline:
        track = next((dict(s.attributes or {}) for s in spans.get_finished_spans()
                      if s.name == "track" and (s.attributes or {}).get("mediaserver.stream") == stream), {})
        await asyncio.sleep(0.2)
    assert track, "the track span did not end"
    assert track["mediaserver.quality.wer"] >= 0.0 and track["mediaserver.quality.wer.words"] >= 3, track
    assert track["mediaserver.quality.wer.pairs"] >= wer["pairs"], track


@pytest.mark.browser
@pytest.mark.timeout(240)
async def test_browser_page_shows_the_wer(start_server: ServerFactory, browser) -> None:  # type: ignore[no-untyped-def]  # noqa: F811,E501
    from tests.test_browser import _join

    rs = await start_server(_live_config())
    await rs.server.hub.executor.preload(["denoise"])
    bot = Bot(rs.url, "werweb", "bot", _speech(), stages=["denoise"])
    await bot.join()
    tab = await (await browser.new_context()).new_page()
    try:
        await _join(tab, rs.url, "werweb", "tab")
        # the bot's row: OVRL and SNR as before, then the WER of its last pair
        await tab.wait_for_function(
            "[...document.querySelectorAll('#stats tbody tr')].some(r => /OVRL \\d\\.\\d\\d \\u2192 \\d\\.\\d\\d"
            " \\/ SNR -?\\d+ \\u2192 -?\\d+ dB \\/ WER \\d+ % of \\d+ words/.test(r.textContent))", timeout=150_000)
    finally:
        await bot.leave()
        await tab.context.close()
