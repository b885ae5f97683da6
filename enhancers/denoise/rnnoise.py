"""RNNoise denoising: one native RNNoise state per stream, on CPU.

The light option and the baseline the neural stages are compared with.  We
call the ``librnnoise.so`` that the ``pyrnnoise`` wheel ships through ctypes
(located without importing ``pyrnnoise``, whose package import pulls in
audio-file tooling we do not need).  RNNoise works on 10 ms frames at
48 kHz of 16-bit-scaled floats and delays its output by two frames (960 samples).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from enhancers.stage import CHUNK, BatchContext, Stage, StageStream

PCM_SCALE = 32768.0
_FLOAT_P = ctypes.POINTER(ctypes.c_float)


def rnnoise_library_path() -> Path:
    spec = importlib.util.find_spec("pyrnnoise")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the pyrnnoise wheel is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "librnnoise.so"


@functools.lru_cache(maxsize=1)
def rnnoise_library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(rnnoise_library_path()))
    lib.rnnoise_create.argtypes = [ctypes.c_void_p]
    lib.rnnoise_create.restype = ctypes.c_void_p
    lib.rnnoise_destroy.argtypes = [ctypes.c_void_p]
    lib.rnnoise_destroy.restype = None
    lib.rnnoise_get_frame_size.argtypes = []
    lib.rnnoise_get_frame_size.restype = ctypes.c_int
    lib.rnnoise_process_frame.argtypes = [ctypes.c_void_p, _FLOAT_P, _FLOAT_P]
    lib.rnnoise_process_frame.restype = ctypes.c_float
    frame = lib.rnnoise_get_frame_size()
    if frame != CHUNK:
        raise RuntimeError(f"librnnoise frame size is {frame}, expected {CHUNK}")
    return lib


class RNNoiseState:
    """One native RNNoise state; processes 480-sample float frames in [-1, 1]."""

    def __init__(self) -> None:
        self._lib = rnnoise_library()
        handle = self._lib.rnnoise_create(None)
        if not handle:
            raise RuntimeError("rnnoise_create failed")
        self._handle: int | None = handle
        self._buf = np.zeros(CHUNK, dtype=np.float32)
        self._ptr = self._buf.ctypes.data_as(_FLOAT_P)

    def process_frame(self, frame: np.ndarray, out: np.ndarray) -> float:
        """Denoise ``frame`` into ``out``; returns RNNoise's speech probability."""
        if self._handle is None:
            raise RuntimeError("RNNoise state is closed")
        np.multiply(frame, PCM_SCALE, out=self._buf)
        prob = float(self._lib.rnnoise_process_frame(self._handle, self._ptr, self._ptr))
        np.multiply(self._buf, 1.0 / PCM_SCALE, out=out)
        return prob

    def close(self) -> None:
        if self._handle is not None:
            self._lib.rnnoise_destroy(self._handle)
            self._handle = None

    def __del__(self) -> None:
        self.close()


class RNNoiseStage(Stage):
    """RNNoise denoiser: owns nothing shared but the library; each stream's native state
    lives in ``StageStream.native``.  Runs on CPU whatever the executor device."""

    name = "denoise:rnnoise"
    latency_samples = 2 * CHUNK  # 20 ms window + one frame of lookahead, measured with an impulse

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__(device)
        rnnoise_library()  # fail at construction, not on the first chunk

    def open_native(self, stream: StageStream) -> None:
        stream.native = RNNoiseState()

    def close_native(self, stream: StageStream) -> None:
        if isinstance(stream.native, RNNoiseState):
            stream.native.close()
        stream.native = None

    def process(self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext) -> torch.Tensor:
        x = np.nan_to_num(audio.detach().to("cpu", torch.float32).numpy())
        out = np.empty_like(x)
        for row, stream in enumerate(streams):  # per-stream native state: a loop by nature
            stream.native.process_frame(x[row], out[row])
        return torch.from_numpy(out).to(audio.device)
