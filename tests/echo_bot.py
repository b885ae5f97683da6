"""A participant whose microphone hears its own loudspeaker: the echo path of a speakerphone.

``EchoBot`` plays what it receives through a simulated speaker-to-microphone
path (a bulk delay plus a real measured room impulse response) and adds it
to its own speech before publishing, like a phone on speaker or a laptop
without echo cancellation.
"""

from __future__ import annotations

import collections
from typing import Any, Optional

import numpy as np
from scipy.signal import fftconvolve

from loadtest.bot import FRAME, Bot, PcmTrack, Recording


class EchoPathMic(PcmTrack):
    """Own speech plus the convolved, delayed loudspeaker signal."""

    def __init__(self, own: Optional[np.ndarray], ir: np.ndarray, delay_s: float, gain: float) -> None:
        super().__init__(own, loop=True)
        self.ir = (ir * gain).astype(np.float32)
        self.speaker: collections.deque[np.ndarray] = collections.deque()
        self.speaker_len = 0
        self.tail = np.zeros(len(ir) - 1, dtype=np.float32)
        self.pending = np.zeros(int(delay_s * 48_000), dtype=np.float32)  # the bulk delay

    def feed_speaker(self, samples: np.ndarray) -> None:
        self.speaker.append(samples)
        self.speaker_len += len(samples)
        # a real playout buffer has bounded latency: drop what is more than 100 ms behind
        while self.speaker_len > 4_800 and len(self.speaker) > 1:
            self.speaker_len -= len(self.speaker.popleft())

    def _speaker_block(self) -> np.ndarray:
        need = FRAME
        parts = [self.pending] if len(self.pending) else []
        have = len(self.pending)
        while have < need and self.speaker:
            s = self.speaker.popleft()
            self.speaker_len -= len(s)
            parts.append(s)
            have += len(s)
        buf = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
        if len(buf) < need:
            buf = np.concatenate([buf, np.zeros(need - len(buf), dtype=np.float32)])
        self.pending = buf[need:]
        return buf[:need]

    def next_block(self) -> np.ndarray:
        own = super().next_block()
        spk = self._speaker_block()
        wet = fftconvolve(spk, self.ir)
        wet[: len(self.tail)] += self.tail
        self.tail = wet[FRAME:].astype(np.float32)
        return (own + wet[:FRAME]).astype(np.float32)


class EchoBot(Bot):
    """A Bot whose published audio contains the echo of everything it hears."""

    def __init__(self, url: str, room: str, name: str, own: Optional[np.ndarray], ir: np.ndarray,
                 *, delay_s: float = 0.12, gain: float = 1.0, **kw: Any) -> None:
        super().__init__(url, room, name, None, **kw)
        self.track = EchoPathMic(own, ir, delay_s, gain)

    async def _record(self, track, rec: Recording) -> None:  # type: ignore[no-untyped-def]
        from aiortc.mediastreams import MediaStreamError
        import time

        mic = self.track
        assert isinstance(mic, EchoPathMic)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            data = frame.to_ndarray().astype(np.float32) / 32768.0
            channels = len(frame.layout.channels)
            mono = data.reshape(-1, channels).mean(axis=1) if channels > 1 else data.reshape(-1)
            rec.blocks.append(mono.astype(np.float32))
            rec.arrivals.append(time.monotonic())
            mic.feed_speaker(mono.astype(np.float32))
