"""Opus encoder and decoder bound directly to libopus (the copy PyAV ships).

Why not PyAV's codec contexts: aiortc's encoder is fixed at 96 kbit/s stereo
and its decoder path has no packet-loss concealment.  Here we get mono voice
encoding at a chosen bitrate with in-band FEC, and a decoder that conceals a
lost packet (PLC) or rebuilds it from the next packet's FEC data.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
from typing import Optional

import numpy as np

SAMPLE_RATE = 48_000
FRAME_SAMPLES = 960  # 20 ms packets on the wire
MAX_FRAME_SAMPLES = 5760  # 120 ms, the largest Opus frame

_OPUS_APPLICATION_VOIP = 2048
_OPUS_SET_BITRATE = 4002
_OPUS_SET_INBAND_FEC = 4012
_OPUS_SET_PACKET_LOSS_PERC = 4014
_OPUS_SET_COMPLEXITY = 4010
_OPUS_SET_SIGNAL = 4024
_OPUS_SIGNAL_VOICE = 3001


class OpusError(RuntimeError):
    pass


def _load_libopus() -> ctypes.CDLL:
    candidates: list[str] = []
    try:
        import av

        libs = os.path.join(os.path.dirname(os.path.dirname(av.__file__)), "av.libs")
        candidates += sorted(glob.glob(os.path.join(libs, "libopus*.so*")))
    except ImportError:  # pragma: no cover - av is a hard dependency of aiortc
        pass
    found = ctypes.util.find_library("opus")
    if found:
        candidates.append(found)
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        lib.opus_encoder_create.restype = ctypes.c_void_p
        lib.opus_encoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.opus_encode_float.restype = ctypes.c_int32
        lib.opus_encode_float.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int32,
        ]
        lib.opus_encoder_destroy.argtypes = [ctypes.c_void_p]
        lib.opus_encoder_ctl.restype = ctypes.c_int
        lib.opus_decoder_create.restype = ctypes.c_void_p
        lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.opus_decode_float.restype = ctypes.c_int
        lib.opus_decode_float.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
        ]
        lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
        lib.opus_packet_get_nb_samples.restype = ctypes.c_int
        lib.opus_packet_get_nb_samples.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32]
        return lib
    raise OpusError("libopus not found (looked in PyAV's bundled libraries and the system)")


_lib: Optional[ctypes.CDLL] = None


def libopus() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        _lib = _load_libopus()
    return _lib


class OpusEncoder:
    """A mono Opus encoder for one published stream: 20 ms frames, VoIP mode, in-band FEC."""

    def __init__(self, bitrate: int = 32_000, *, fec: bool = True, expected_loss_pct: int = 5,
                 complexity: int = 5) -> None:
        lib = libopus()
        err = ctypes.c_int(0)
        self._enc = lib.opus_encoder_create(SAMPLE_RATE, 1, _OPUS_APPLICATION_VOIP, ctypes.byref(err))
        if err.value != 0 or not self._enc:
            raise OpusError(f"opus_encoder_create failed: {err.value}")
        ctl = lib.opus_encoder_ctl
        ctl(ctypes.c_void_p(self._enc), ctypes.c_int(_OPUS_SET_BITRATE), ctypes.c_int32(bitrate))
        ctl(ctypes.c_void_p(self._enc), ctypes.c_int(_OPUS_SET_INBAND_FEC), ctypes.c_int32(1 if fec else 0))
        ctl(ctypes.c_void_p(self._enc), ctypes.c_int(_OPUS_SET_PACKET_LOSS_PERC), ctypes.c_int32(expected_loss_pct))
        ctl(ctypes.c_void_p(self._enc), ctypes.c_int(_OPUS_SET_COMPLEXITY), ctypes.c_int32(complexity))
        ctl(ctypes.c_void_p(self._enc), ctypes.c_int(_OPUS_SET_SIGNAL), ctypes.c_int32(_OPUS_SIGNAL_VOICE))
        self._out = ctypes.create_string_buffer(4000)
        self.bitrate = bitrate
        self.complexity = complexity

    def set_complexity(self, complexity: int) -> None:
        """Change the complexity (0-10) from the next frame on."""
        libopus().opus_encoder_ctl(ctypes.c_void_p(self._enc), ctypes.c_int(_OPUS_SET_COMPLEXITY),
                                   ctypes.c_int32(complexity))
        self.complexity = complexity

    def encode(self, pcm: np.ndarray) -> bytes:
        """Encode exactly one 20 ms frame of float32 mono samples."""
        if pcm.shape != (FRAME_SAMPLES,):
            raise ValueError(f"expected {FRAME_SAMPLES} samples, got {pcm.shape}")
        pcm = np.ascontiguousarray(pcm, dtype=np.float32)
        n = libopus().opus_encode_float(self._enc, pcm.ctypes.data, FRAME_SAMPLES, self._out, len(self._out))
        if n < 0:
            raise OpusError(f"opus_encode_float failed: {n}")
        return self._out.raw[:n]

    def close(self) -> None:
        if self._enc:
            libopus().opus_encoder_destroy(self._enc)
            self._enc = None

    def __del__(self) -> None:
        self.close()


class OpusDecoder:
    """A mono Opus decoder for one inbound stream, with loss concealment and FEC recovery."""

    def __init__(self) -> None:
        lib = libopus()
        err = ctypes.c_int(0)
        self._dec = lib.opus_decoder_create(SAMPLE_RATE, 1, ctypes.byref(err))
        if err.value != 0 or not self._dec:
            raise OpusError(f"opus_decoder_create failed: {err.value}")
        self._pcm = np.zeros(MAX_FRAME_SAMPLES, dtype=np.float32)
        self.last_frame_samples = FRAME_SAMPLES

    def packet_samples(self, data: bytes) -> int:
        n = libopus().opus_packet_get_nb_samples(data, len(data), SAMPLE_RATE)
        return n if n > 0 else 0

    def decode(self, data: bytes) -> np.ndarray:
        """Decode one packet; malformed packets are concealed rather than raising."""
        if not data:
            return self.conceal(self.last_frame_samples)
        n = libopus().opus_decode_float(self._dec, data, len(data), self._pcm.ctypes.data, MAX_FRAME_SAMPLES, 0)
        if n < 0:
            return self.conceal(self.last_frame_samples)
        self.last_frame_samples = n
        return self._pcm[:n].copy()

    def conceal(self, samples: int) -> np.ndarray:
        """Packet-loss concealment for ``samples`` (multiple of 2.5 ms)."""
        samples = max(120, min(MAX_FRAME_SAMPLES, samples - samples % 120))
        n = libopus().opus_decode_float(self._dec, None, 0, self._pcm.ctypes.data, samples, 0)
        if n < 0:
            return np.zeros(samples, dtype=np.float32)
        return self._pcm[:n].copy()

    def recover(self, next_packet: bytes, samples: int) -> np.ndarray:
        """Rebuild a lost frame of ``samples`` from the FEC data of the packet that follows it."""
        samples = max(120, min(MAX_FRAME_SAMPLES, samples - samples % 120))
        n = libopus().opus_decode_float(
            self._dec, next_packet, len(next_packet), self._pcm.ctypes.data, samples, 1
        )
        if n < 0:
            return self.conceal(samples)
        return self._pcm[:n].copy()

    def close(self) -> None:
        if self._dec:
            libopus().opus_decoder_destroy(self._dec)
            self._dec = None

    def __del__(self) -> None:
        self.close()
