"""enhance_track: the engine used by a plain aiortc application, without the SFU."""

from __future__ import annotations

import numpy as np

from enhancers.executor import Executor, ExecutorConfig
from loadtest.bot import PcmTrack
from mediaserver.audio_format import frame_to_mono48k
from mediaserver.enhanced_track import enhance_track
from tests.audio_checks import best_alignment
from tests.conftest import speech


async def test_wrapped_track_is_limited_and_keeps_its_content() -> None:
    loud = speech(seconds=2.0) * 4.0  # peaks far above full scale once the source clips at 1.0
    executor = Executor(ExecutorConfig(device="cpu"))
    await executor.start()
    try:
        await executor.preload(["limiter"])
        source = PcmTrack(np.clip(loud, -0.99, 0.99), loop=False)
        track = enhance_track(source, executor, "limiter")
        out = []
        for _ in range(80):
            frame = await track.recv()
            out.append(frame_to_mono48k(frame))
        audio = np.concatenate(out)
        assert len(audio) >= 48_000 * 1.5
        assert np.max(np.abs(audio[4800:])) <= 0.9  # the limiter's -1 dBFS ceiling
        ncc, _ = best_alignment(audio[4800:48_000], np.clip(loud, -0.99, 0.99))
        assert ncc > 0.9
        assert executor.stats()["stages"]["limiter"]["rows"] > 100
        track.stop()
    finally:
        await executor.close()
