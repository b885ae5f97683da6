"""The one place where audio crosses between aiortc/PyAV frames and the internal format.

Internal format: 48 kHz mono float32 in [-1, 1], 10 ms chunks of 480 samples.
"""

from __future__ import annotations

import fractions

import av
import numpy as np

SAMPLE_RATE = 48_000
CHUNK = 480
TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)

_resamplers: dict[tuple[str, str, int], av.AudioResampler] = {}


def frame_to_mono48k(frame: av.AudioFrame, resampler: av.AudioResampler | None = None) -> np.ndarray:
    """Any PyAV audio frame to 48 kHz mono float32 samples."""
    if frame.sample_rate != SAMPLE_RATE or frame.format.name not in ("s16", "flt", "fltp", "s16p"):
        rs = resampler or av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        out = [frame_to_mono48k(f) for f in rs.resample(frame)]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if frame.format.is_planar:
        pcm = data.reshape(channels, -1).mean(axis=0) if channels > 1 else data.reshape(-1)
    else:
        pcm = data.reshape(-1, channels).mean(axis=1) if channels > 1 else data.reshape(-1)
    if frame.format.name.startswith("s16"):
        return (pcm.astype(np.float32) / 32768.0).astype(np.float32)
    return pcm.astype(np.float32)


def mono48k_to_frame(samples: np.ndarray, pts: int) -> av.AudioFrame:
    """48 kHz mono float32 samples to an s16 mono PyAV frame with ``pts`` in 1/48000."""
    pcm = float_to_s16(samples)
    frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = SAMPLE_RATE
    frame.pts = pts
    frame.time_base = TIME_BASE
    return frame


def float_to_s16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)


def s16_to_float(pcm: np.ndarray) -> np.ndarray:
    return pcm.astype(np.float32) / 32768.0


class ChunkAssembler:
    """Cuts an arbitrary-length sample stream into 480-sample chunks."""

    def __init__(self) -> None:
        self._buf = np.zeros(0, dtype=np.float32)

    def push(self, samples: np.ndarray) -> list[np.ndarray]:
        buf = np.concatenate([self._buf, samples]) if len(self._buf) else samples
        n = len(buf) // CHUNK
        chunks = [buf[i * CHUNK:(i + 1) * CHUNK] for i in range(n)]
        self._buf = buf[n * CHUNK:]
        return chunks
