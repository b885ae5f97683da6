"""The echo canceller's chunk (``EchoCancellerStage.process``) on the CPU in numpy, with numba kernels.

In torch the chunk is ~300 small ops: at one stream 0.84 ms, two thirds of it dispatch around the
kernels (the MDF block, the delay estimator and the suppressor's gains already run as numba kernels:
``mdf_kernels.py``, ``kernels.py``).  Here the rest is numpy on the same state (zero-copy views of
the stage's tensors) and three small kernels: the far end read back at the echo's lag, the noise
floor with the comfort noise's spectrum, and the output's cross-fade with the comfort noise's
overlap-add.  The arithmetic and its order are ``process``'s, which stays the reference (and the GPU
path); ``tests/test_aec.py`` compares the two chunk by chunk from the same state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from enhancers.aec.delay import DelayEstimator
from enhancers.aec.kernels import njit
from enhancers.aec.mdf import MdfConfig
from enhancers.aec.mdf_kernels import mdf_step_kernels
from enhancers.aec.suppressor import ResidualEchoSuppressor
from enhancers.stage import CHUNK, BatchContext, StageStream


class CpuCanceller(Protocol):
    """What the CPU chunk reads of :class:`enhancers.aec.stage.EchoCancellerStage` (which imports this
    module: a protocol, not an import, keeps the two out of an import cycle)."""

    state: dict[str, torch.Tensor]
    suppressor: ResidualEchoSuppressor
    mdf: MdfConfig
    delay: DelayEstimator
    margin: int
    ring_chunks: int
    _window_np: np.ndarray
    _fold_np: np.ndarray
    _cn_window_np: np.ndarray
    _fade_np: np.ndarray

    def stream(self, **options: Any) -> StageStream: ...

    def _rows(self, streams: Sequence[StageStream]) -> tuple[slice | torch.Tensor, torch.Tensor]: ...

    def _realign(self, st: dict[str, torch.Tensor], index: torch.Tensor, count: torch.Tensor,
                 filter_delay: torch.Tensor, changed: torch.Tensor) -> None: ...

SCALE = np.float32(32768.0)
TWO_PI_16 = np.float32(2 * math.pi / (1 << 16))


@njit
def far_at_lag(ring: np.ndarray, slots: np.ndarray, count: np.ndarray, lag: np.ndarray, out: np.ndarray) -> None:
    """``out[b]``: the ``2*CHUNK`` far-end samples aligned with the mic window ``[count-1, count]`` of row
    ``b`` delayed by ``lag[b]`` samples, read from the far-end ring of slot ``slots[b]``."""
    rows, n = out.shape
    chunks, chunk = ring.shape[1], ring.shape[2]
    for b in range(rows):
        start = (count[b] - 1) * chunk - lag[b]
        for i in range(n):
            sample = start + i
            c = (sample // chunk) % chunks
            out[b, i] = ring[slots[b], c, sample % chunk]


@njit
def noise_and_comfort(power: np.ndarray, noise_psd: np.ndarray, noise: np.ndarray, gain: np.ndarray,
                      count: np.ndarray, smoothing: float, rise: float, bias: float, out: np.ndarray) -> None:
    """The mic's noise floor (``track_noise``, state updated in place) and the comfort noise's spectrum
    shaped like ``floor * (1 - gain^2)`` with per-stream deterministic phases (``comfort_noise_spectrum``)."""
    rows, bins = power.shape
    a = np.float32(smoothing)
    for b in range(rows):
        for j in range(bins):
            psd = a * noise_psd[b, j] + (np.float32(1.0) - a) * power[b, j]
            floor = psd if psd < noise[b, j] else noise[b, j] * np.float32(rise)
            noise_psd[b, j] = psd
            noise[b, j] = floor
            g = gain[b, j]
            mag = np.float32(math.sqrt(max(floor * np.float32(bias) * (np.float32(1.0) - g * g), np.float32(0.0))))
            if j == 0 or j == bins - 1:
                out[b, j] = mag
                continue
            key = count[b] * 1_000_003 + j * 7919
            key = (key ^ (key >> 13)) * 0x5BD1E995
            key = key ^ (key >> 15)
            phase = np.float32(key % (1 << 16)) * TWO_PI_16
            out[b, j] = complex(mag * np.float32(math.cos(phase)), mag * np.float32(math.sin(phase)))


@njit
def cross_fade(frames: np.ndarray, cn_window: np.ndarray, fade: np.ndarray, tail: np.ndarray,
               out: np.ndarray) -> None:
    """The output chunk (``apply``): the last filter's and the new filter's newest halves cross-faded,
    plus the comfort noise's frame overlap-added to its last tail (``tail`` updated in place)."""
    rows, _, n = frames.shape
    half = n // 2
    for b in range(rows):
        for i in range(half):
            old = frames[b, 0, half + i]
            new = frames[b, 1, half + i]
            out[b, i] = old + (new - old) * fade[i] + (tail[b, i] + frames[b, 2, i] * cn_window[i])
        for i in range(half):
            tail[b, i] = frames[b, 2, half + i] * cn_window[half + i]


def _power(z: np.ndarray) -> np.ndarray:
    return z.real * z.real + z.imag * z.imag


def process_cpu(stage: CpuCanceller, audio: torch.Tensor, streams: Sequence[StageStream],
                ctx: BatchContext) -> torch.Tensor:
    """``stage.process`` for a batch on the CPU; the same result, state and side information."""
    rows, index = stage._rows(streams)
    st = {k: v[rows] for k, v in stage.state.items() if k != "far_ring"}
    originals = dict(st) if isinstance(rows, slice) else {}
    sup, cfg = stage.suppressor, stage.mdf
    n, frame = cfg.n_fft, CHUNK
    b = audio.shape[0]
    slots = index.numpy()
    mic = audio.numpy().astype(np.float32, copy=False) * SCALE
    far = (ctx.reference.numpy().astype(np.float32, copy=False) * SCALE if ctx.reference is not None
           else np.zeros_like(mic))
    ring = stage.state["far_ring"].numpy()
    chunks = stage.ring_chunks
    count = st["count"].numpy().copy()
    ring[slots, count % chunks] = far

    # Bulk delay: estimator (or the hint until it locks) minus the pre-delay margin.
    window = stage._window_np
    frames = np.empty((b, 3, n), dtype=np.float32)
    frames[:, 0, :frame] = ring[slots, (count - 1) % chunks]
    frames[:, 0, frame:] = far
    frames[:, 0] *= window
    frames[:, 2, :frame] = st["mic_prev"].numpy()
    frames[:, 2, frame:] = mic
    frames[:, 1] = frames[:, 2] * window
    spectra = np.fft.rfft(frames, norm="forward")
    far_spec, mic_spec, mic_rect = spectra[:, 0], spectra[:, 1], spectra[:, 2]
    mic_power = _power(mic_spec)
    estimate = stage.delay.update(st, torch.from_numpy(_power(far_spec)), torch.from_numpy(mic_power),
                                  torch.from_numpy(count)).numpy()
    hint = st["hint"].numpy()
    bulk = np.where(estimate >= 0, estimate, np.maximum(hint, 0))
    filter_delay = np.maximum(bulk - stage.margin, 0)
    changed = filter_delay != st["filter_delay"].numpy()
    if changed.any():
        stage._realign(st, index, torch.from_numpy(count), torch.from_numpy(filter_delay), torch.from_numpy(changed))
    st["filter_delay"] = torch.from_numpy(filter_delay)

    # Linear echo cancellation on the delay-compensated reference.
    delayed = count - filter_delay
    x_window = np.concatenate([ring[slots, (delayed - 1) % chunks], ring[slots, delayed % chunks]], axis=1)
    x_new = np.fft.rfft(x_window, norm="forward")[:, : cfg.bins]
    lin = mdf_step_kernels(st, torch.from_numpy(np.ascontiguousarray(x_new)),
                           torch.from_numpy(np.ascontiguousarray(x_window[:, frame:])), torch.from_numpy(mic),
                           torch.from_numpy(count), cfg)
    error, echo, adapted = lin.error.numpy(), lin.echo.numpy(), lin.adapted.numpy()

    # Residual echo suppression, with the far end aligned to the filter's main peak.
    peak_part = st["mdf_prop"].numpy().argmax(axis=1)
    part = st["mdf_wf"].numpy()[np.arange(b), peak_part]
    taps = np.fft.irfft(part, n=n)[:, :frame]
    fine = (filter_delay + peak_part) * frame + np.abs(taps).argmax(axis=1)
    lag = np.where(adapted, fine, bulk * frame).astype(np.int64)
    frames = np.empty((b, 4, n), dtype=np.float32)
    far_at_lag(ring, slots, count, lag, frames[:, 0])
    frames[:, 0] *= window
    frames[:, 3, :frame] = st["err_prev"].numpy()
    frames[:, 3, frame:] = error
    frames[:, 1] = frames[:, 3] * window
    frames[:, 2, :frame] = st["echo_prev"].numpy()
    frames[:, 2, frame:] = echo
    frames[:, 2] *= window
    spectra = np.fft.rfft(frames, norm="forward")
    gain, diverged = sup.gains_stacked(st, np.ascontiguousarray(
        np.stack([spectra[:, 0], mic_spec, spectra[:, 1], spectra[:, 2]], axis=1)))
    noise_spec = np.empty((b, sup.cfg.bins), dtype=np.complex64)
    for key in ("sup_noise_psd", "sup_noise", "sup_filter", "sup_cn_tail"):
        if not st[key].is_contiguous():
            st[key] = st[key].contiguous()
    noise_and_comfort(mic_power, st["sup_noise_psd"].numpy(), st["sup_noise"].numpy(), gain, count,
                      sup.cfg.noise_smoothing, sup.cfg.noise_rise, sup.cfg.noise_bias, noise_spec)
    base = np.where(diverged[:, None], mic_rect, spectra[:, 3])

    # The gains as a minimum-phase filter, cross-faded from the last one, plus comfort noise.
    cep = np.fft.irfft(np.log(np.maximum(gain, np.float32(1e-5))), n=n)
    log_spec = np.fft.rfft(cep * stage._fold_np)
    new_h = (np.exp(log_spec.real) * np.exp(1j * log_spec.imag)).astype(np.complex64)
    filters = st["sup_filter"].numpy()
    spec3 = np.stack([base * filters, base * new_h, noise_spec], axis=1)
    filters[...] = new_h
    out = np.empty((b, frame), dtype=np.float32)
    cross_fade(np.fft.irfft(spec3, n=n, norm="forward"), stage._cn_window_np, stage._fade_np,
               st["sup_cn_tail"].numpy(), out)

    st["mic_prev"], st["err_prev"], st["echo_prev"] = (torch.from_numpy(mic), torch.from_numpy(error),
                                                       torch.from_numpy(echo))
    st["count"] = torch.from_numpy(count + 1)
    for key, value in st.items():
        if value is not originals.get(key):
            stage.state[key][rows] = value
    ctx.side["aec_delay_ms"] = torch.from_numpy(bulk.astype(np.float32) * np.float32(10.0))
    return torch.from_numpy(out / SCALE).to(audio.dtype)


def compile_kernels(stage: CpuCanceller) -> None:
    """Compile (or load from the on-disk cache) this module's kernels: one chunk of a throwaway stream."""
    stream = stage.stream()
    try:
        chunk = torch.zeros(1, CHUNK)
        process_cpu(stage, chunk, [stream], BatchContext(reference=chunk))
    finally:
        stream.close()
