"""A lighter media path for bots in large numbers: pre-encoded sending, inline receiving.

aiortc's default audio path costs a participant two thread hand-offs per
packet (the Opus encode runs in the default executor, decoding in one
thread per receiver) plus a pure-Python audio-level computation; with tens
of bots per process the GIL hand-offs alone starve the event loop, and a
starved load generator measures its own delays instead of the server's.

- ``EncodedPcmTrack`` encodes the bot's whole (looped) signal once with
  libopus at construction and, paced in real time, hands aiortc's sender
  ready Opus packets (aiortc only packetizes them, as the server does).
- ``InlineDecoder`` takes the place of a receiver's jitter buffer: every RTP
  packet is decoded on arrival, in the event loop, and appended to the
  bot's ``Recording``; aiortc's decoder thread stays idle.  With
  ``decode=False`` it only counts: the packets' RTP headers (tapped before
  it) give loss, gaps and jitter, and no audio is kept.  Missing packets
  leave holes in the pts timeline (no concealment), which the analysis
  counts as gaps.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import av
import numpy as np
from aiortc.codecs.opus import OpusDecoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

if TYPE_CHECKING:
    from loadtest.bot import Recording

RATE = 48_000
FRAME = 960
TIME_BASE = fractions.Fraction(1, RATE)
TS_MOD = 1 << 32


@dataclass
class OpusPacket:
    """One pre-encoded 20 ms Opus packet; duck-types what aiortc's sender reads from an ``av.Packet``."""

    data: bytes
    pts: int
    time_base: fractions.Fraction = TIME_BASE

    def __bytes__(self) -> bytes:
        return self.data


def frame_mono(frame: Any) -> np.ndarray:
    """A decoded s16 ``av.AudioFrame`` (mono or stereo) as mono float32 in [-1, 1]."""
    pcm = frame.to_ndarray().astype(np.float32) / 32768.0
    channels = len(frame.layout.channels)
    return (pcm.reshape(-1, channels).mean(axis=1) if channels > 1 else pcm.reshape(-1)).astype(np.float32)


def decode_opus(decoder: OpusDecoder, payload: bytes) -> list[np.ndarray]:
    """One Opus packet through ``decoder``: its mono float32 frames."""
    frames: list[Any] = list(decoder.decode(JitterFrame(data=payload, timestamp=0)))
    return [frame_mono(f) for f in frames]


def encode_opus(samples: np.ndarray, bitrate: int = 32_000) -> list[bytes]:
    """``samples`` (48 kHz mono float32) as 20 ms mono Opus packets (libopus, VoIP mode), one per frame.

    Packet ``k`` starts at sample ``k * 960``; like any libopus stream its
    content lags the packet timing by the encoder's look-ahead (312 samples).
    """
    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate = RATE
    codec.layout = "mono"
    codec.format = "s16"
    codec.bit_rate = bitrate
    codec.time_base = TIME_BASE
    codec.options = {"application": "voip", "frame_duration": "20"}
    n = len(samples) // FRAME * FRAME
    pcm = (np.clip(samples[:n], -1, 1) * 32767).astype(np.int16)
    packets: list[bytes] = []
    for k in range(0, n, FRAME):
        frame = av.AudioFrame.from_ndarray(pcm[k:k + FRAME].reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = k
        frame.time_base = TIME_BASE
        packets += [bytes(p) for p in codec.encode(frame)]
    packets += [bytes(p) for p in codec.encode(None)]
    return packets[: n // FRAME]


_lookahead_ms: float | None = None


def opus_lookahead_ms() -> float:
    """Measured content delay of a libopus encode/decode (its look-ahead: 312 samples, 6.5 ms)."""
    global _lookahead_ms
    if _lookahead_ms is None:
        x = np.zeros(RATE // 5, dtype=np.float32)
        burst = np.random.default_rng(5).standard_normal(480).astype(np.float32)
        x[RATE // 20:RATE // 20 + 480] = np.hanning(480).astype(np.float32) * burst * 0.3
        decoder = OpusDecoder()
        out = [block for p in encode_opus(x) for block in decode_opus(decoder, p)]
        y = np.concatenate(out)[: len(x)]
        corr = np.correlate(y, x[RATE // 20 - 480:RATE // 20 + 960], mode="valid")
        _lookahead_ms = (int(np.argmax(corr)) - (RATE // 20 - 480)) / RATE * 1000.0
    return _lookahead_ms


class EncodedPcmTrack(MediaStreamTrack):
    """Publishes a pre-encoded, looping signal in real time (same logs as ``PcmTrack``)."""

    kind = "audio"

    def __init__(self, samples: np.ndarray, packets: list[bytes] | None = None) -> None:
        super().__init__()
        self.packets = packets or encode_opus(samples) or encode_opus(np.zeros(FRAME, dtype=np.float32))
        self._index = 0
        self._pts = 0
        self._start: float | None = None
        self.send_log: list[tuple[float, int]] = []
        self.wire_log: list[tuple[float, int]] = []

    async def recv(self) -> OpusPacket:  # type: ignore[override]
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        delay = self._start + self._pts / RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        packet = OpusPacket(self.packets[self._index % len(self.packets)], self._pts)
        self.send_log.append((time.monotonic(), self._pts))
        self._index += 1
        self._pts += FRAME
        return packet


class InlineDecoder:
    """Stands in for an aiortc receiver's jitter buffer: decodes each packet as it arrives."""

    def __init__(self, recording: Recording, decode: bool = True) -> None:
        self.recording = recording
        self.decode = decode
        self._decoder = OpusDecoder()
        self._origin: int | None = None
        self.capacity = 16

    def add(self, packet: Any) -> tuple[bool, None]:
        rec = self.recording
        if self._origin is None:
            self._origin = int(packet.timestamp)
            rec.ts_origin = self._origin
        data = getattr(packet, "_data", b"")
        if data and self.decode:
            for mono in decode_opus(self._decoder, data):
                rec.blocks.append(mono)
                rec.arrivals.append(time.monotonic())
                rec.pts.append((int(packet.timestamp) - self._origin) % TS_MOD)
        return False, None

    def remove(self, count: int) -> None:  # aiortc API compatibility
        pass

    def smart_remove(self, count: int) -> bool:
        return False
