"""Enhancement on the live forwarding path: what a subscriber hears gets better."""

from __future__ import annotations

import asyncio

import numpy as np

from enhancers.eval.metrics import dnsmos
from loadtest.bot import Bot
from tests.conftest import ServerFactory, noise, speech


def _mix(clean: np.ndarray, noisy: np.ndarray, snr_db: float) -> np.ndarray:
    n = np.resize(noisy, len(clean))
    gain = np.sqrt(np.mean(clean ** 2) / (np.mean(n ** 2) + 1e-12) / 10 ** (snr_db / 10))
    return (clean + gain * n).astype(np.float32)


async def test_subscriber_hears_denoised_speech(start_server: ServerFactory) -> None:
    rs = await start_server()
    clean = np.concatenate([speech("cmu_arctic_us_aew_a0001.wav"), speech("cmu_arctic_us_axb_a0005.wav")])
    noisy = _mix(clean, noise("doing_the_dishes.wav"), snr_db=5.0)
    raw_pub = Bot(rs.url, "raw", "pub", noisy, stages=[])
    raw_sub = Bot(rs.url, "raw", "sub", None, stages=[])
    dn_pub = Bot(rs.url, "clean", "pub", noisy, stages=["denoise"])
    dn_sub = Bot(rs.url, "clean", "sub", None, stages=[])
    await rs.server.hub.executor.preload(["denoise"])
    for bot in (raw_pub, raw_sub, dn_pub, dn_sub):
        await bot.join()
    try:
        await asyncio.sleep(8.0)
        raw = raw_sub.received_from(raw_pub.id)  # type: ignore[arg-type]
        den = dn_sub.received_from(dn_pub.id)  # type: ignore[arg-type]
        assert len(raw) > 48_000 * 3.5 and len(den) > 48_000 * 3.5
        raw_score = dnsmos(raw[48_000:], 48_000)
        den_score = dnsmos(den[48_000:], 48_000)
        assert den_score["ovrl"] > raw_score["ovrl"] + 0.2, (raw_score, den_score)
        assert den_score["bak"] > raw_score["bak"] + 0.5, (raw_score, den_score)
        stats = rs.server.hub.stats()
        assert stats["stages"]["denoise"]["rows"] > 300
    finally:
        for bot in (raw_pub, raw_sub, dn_pub, dn_sub):
            await bot.leave()
