"""Enhancement on the live forwarding path: what a subscriber hears gets better."""

from __future__ import annotations

import asyncio

import numpy as np

from enhancers.eval.metrics import dnsmos
from loadtest.bot import Bot
from tests.conftest import RunningServer, ServerFactory, noise, speech


def _mix(clean: np.ndarray, noisy: np.ndarray, snr_db: float) -> np.ndarray:
    n = np.resize(noisy, len(clean))
    gain = np.sqrt(np.mean(clean ** 2) / (np.mean(n ** 2) + 1e-12) / 10 ** (snr_db / 10))
    return (clean + gain * n).astype(np.float32)


async def _received(rs: RunningServer, room: str, audio: np.ndarray, stages: list[str]) -> np.ndarray:
    pub = Bot(rs.url, room, "pub", audio, stages=stages)
    sub = Bot(rs.url, room, "sub", None, stages=[])
    await pub.join()
    await sub.join()
    try:
        await asyncio.sleep(8.0)
        return sub.received_from(pub.id)  # type: ignore[arg-type]
    finally:
        await pub.leave()
        await sub.leave()


async def test_subscriber_hears_denoised_speech(start_server: ServerFactory) -> None:
    rs = await start_server()
    clean = np.concatenate([speech("cmu_arctic_us_aew_a0001.wav"), speech("cmu_arctic_us_axb_a0005.wav")])
    noisy = _mix(clean, noise("doing_the_dishes.wav"), snr_db=5.0)
    await rs.server.hub.executor.preload(["denoise"])
    # one call at a time: the comparison should not depend on how loaded the test machine is
    raw = await _received(rs, "raw", noisy, [])
    den = await _received(rs, "clean", noisy, ["denoise"])
    assert len(raw) > 48_000 * 3.5 and len(den) > 48_000 * 3.5
    raw_score = dnsmos(raw[48_000:], 48_000)
    den_score = dnsmos(den[48_000:], 48_000)
    stats = rs.server.hub.stats()
    brief = {k: stats[k] for k in ("chunks", "stage_calls", "bypass_deadline", "stage_unavailable", "late_discarded")}
    assert den_score["ovrl"] > raw_score["ovrl"] + 0.2, (brief, raw_score["ovrl"], den_score["ovrl"])
    assert den_score["bak"] > raw_score["bak"] + 0.5, (raw_score, den_score)
    assert stats["stages"]["denoise"]["rows"] > 300
