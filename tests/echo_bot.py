"""A participant whose microphone hears its own loudspeaker: the echo path of a speakerphone.

``EchoBot`` plays what it receives through a simulated speaker-to-microphone
path and adds it to its own speech before publishing, like a phone on
speaker or a laptop without echo cancellation.  The loudspeaker plays each
received frame at its RTP time plus a fixed playout delay (a device's
jitter buffer: frames arriving later than that are lost, as on a real
device), then the bulk delay and a real measured room impulse response take
it to the microphone.  Playout and microphone run on one clock, so the echo
path has a constant delay, as a real device's has between glitches.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np
from scipy.signal import fftconvolve

from loadtest.bot import FRAME, Bot, PcmTrack, Recording

RING = 48_000 * 4  # 4 s of loudspeaker signal, indexed by microphone sample position


class EchoPathMic(PcmTrack):
    """Own speech plus the loudspeaker signal, delayed and convolved with a room impulse response."""

    def __init__(self, own: Optional[np.ndarray], ir: np.ndarray, delay_s: float, gain: float,
                 playout_s: float = 0.08) -> None:
        super().__init__(own, loop=True)
        self.ir = (ir * gain).astype(np.float32)
        self.tail = np.zeros(len(ir) - 1, dtype=np.float32)
        self.delay = int(delay_s * 48_000)  # loudspeaker -> microphone bulk delay
        self.playout = int(playout_s * 48_000)  # receive jitter buffer of the device
        self.ring = np.zeros(RING, dtype=np.float32)
        self.mic_position = 0  # samples the microphone has produced
        self.anchor: Optional[tuple[int, int]] = None  # (first pts, its playout position)
        self.late_frames = 0

    def feed_speaker(self, samples: np.ndarray, pts: int) -> None:
        """A decoded frame with RTP time ``pts`` (samples): schedule it for playout."""
        if self.anchor is None:
            self.anchor = (pts, self.mic_position + self.playout)
        position = (pts - self.anchor[0]) % (1 << 32) + self.anchor[1]  # RTP time wraps at 2**32
        if position < self.mic_position - self.delay or position + len(samples) > self.mic_position + RING // 2:
            self.late_frames += 1  # arrived after its playout time (or absurdly early): lost
            return
        index = (position + np.arange(len(samples))) % RING
        self.ring[index] = samples

    def _speaker_block(self) -> np.ndarray:
        index = (self.mic_position - self.delay + np.arange(FRAME)) % RING
        block = self.ring[index].copy()
        self.ring[index] = 0.0  # played: the slot is free for the signal one ring later
        return block

    def next_block(self) -> np.ndarray:
        own = super().next_block()
        spk = self._speaker_block()
        self.mic_position += FRAME
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

        mic = self.track
        assert isinstance(mic, EchoPathMic)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            data = frame.to_ndarray().astype(np.float32) / 32768.0
            channels = len(frame.layout.channels)
            mono = (data.reshape(-1, channels).mean(axis=1) if channels > 1 else data.reshape(-1)).astype(np.float32)
            rec.blocks.append(mono)
            rec.arrivals.append(time.monotonic())
            rec.pts.append(int(frame.pts) if frame.pts is not None else -1)
            if frame.pts is not None:
                mic.feed_speaker(mono, int(frame.pts))
