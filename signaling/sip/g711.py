"""G.711 µ-law (PCMU) and A-law (PCMA) codecs as numpy lookup tables.

The tables are built once at import with the ITU-T G.711 segment rules,
vectorized over every 16-bit sample value: encoding is one table lookup per
sample, decoding one lookup per byte.  Audio crosses this module as float32
in [-1, 1] (8 kHz), bytes on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_ULAW_BIAS = 0x84
_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)


def _ulaw_encode_all() -> np.ndarray:
    """µ-law byte of every int16 value, indexed by the value viewed as uint16 (ITU-T G.191 rules)."""
    x = np.arange(65536, dtype=np.int32)
    x = np.where(x >= 32768, x - 65536, x)  # index -> signed sample
    magnitude = np.where(x < 0, ~x, x) >> 2  # 14 bits; one's complement for negatives, as G.191 does
    biased = np.minimum(magnitude + (_ULAW_BIAS >> 2), 0x1FFF)
    seg = np.searchsorted(_ULAW_SEG_END, biased, side="left").astype(np.int32)
    uval = (seg << 4) | ((biased >> (seg + 1)) & 0x0F)
    return (uval ^ np.where(x < 0, 0x7F, 0xFF)).astype(np.uint8)


def _ulaw_decode_all() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    mag = (((mantissa << 3) + _ULAW_BIAS) << exponent) - _ULAW_BIAS
    return np.where(u & 0x80, -mag, mag).astype(np.int16)


def _alaw_encode_all() -> np.ndarray:
    x = np.arange(65536, dtype=np.int32)
    x = np.where(x >= 32768, x - 65536, x) >> 3  # 13-bit magnitude domain
    mask = np.where(x >= 0, 0xD5, 0x55)
    mag = np.where(x >= 0, x, -x - 1)
    seg = np.searchsorted(_ALAW_SEG_END, mag, side="left").astype(np.int32)
    low = np.where(seg < 2, (mag >> 1) & 0x0F, (mag >> np.maximum(seg, 1)) & 0x0F)
    aval = np.where(seg >= 8, 0x7F, (np.minimum(seg, 7) << 4) | low)
    return ((aval ^ mask) & 0xFF).astype(np.uint8)


def _alaw_decode_all() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    t = np.where(seg == 0, t + 8, t + 0x108)
    t = np.where(seg > 1, t << np.maximum(seg - 1, 0), t)
    return np.where(a & 0x80, t, -t).astype(np.int16)


ULAW_ENCODE = _ulaw_encode_all()
ULAW_DECODE = _ulaw_decode_all()
ALAW_ENCODE = _alaw_encode_all()
ALAW_DECODE = _alaw_decode_all()


def float_to_int16(audio: np.ndarray) -> np.ndarray:
    return np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)


@dataclass(frozen=True)
class G711Codec:
    """One G.711 law: its RTP payload type, SDP name and the two lookup tables."""

    name: str  # "PCMU" | "PCMA"
    payload_type: int
    encode_table: np.ndarray
    decode_table: np.ndarray

    def encode(self, audio: np.ndarray) -> bytes:
        """float32 samples in [-1, 1] (8 kHz) -> one byte per sample."""
        pcm = float_to_int16(np.asarray(audio, dtype=np.float32))
        return bytes(self.encode_table[pcm.view(np.uint16)])

    def decode(self, payload: bytes) -> np.ndarray:
        """One byte per sample -> float32 samples in [-1, 1]."""
        codes = np.frombuffer(payload, dtype=np.uint8)
        return self.decode_table[codes].astype(np.float32) / 32768.0


PCMU = G711Codec("PCMU", 0, ULAW_ENCODE, ULAW_DECODE)
PCMA = G711Codec("PCMA", 8, ALAW_ENCODE, ALAW_DECODE)
CODECS = {c.name: c for c in (PCMU, PCMA)}
