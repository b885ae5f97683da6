"""The numba kernels of :mod:`enhancers.denoise.df3_native`: DF3's small ops, fused.

As torch ops DF3's per-frame tensors cost 2-20 us per op, about 450 ops a frame
(1.6 ms at one stream, half of it outside the GEMMs).  Here everything but the
GEMMs runs in a few fused kernels: the analysis window, both input features
with their running normalizations and the encoder's first columns, the
frequency convolutions' epilogues (bias, neighbour taps, ReLU), the grouped
linear layers, the GRU gates, the decoder's skips and upsampling, the deep
filter's pathway sums, the enhancement of the spectrum, overlap-add.

Activations are channels-last ``[B, F, C]`` as in :mod:`enhancers.denoise.df3_net`;
a GEMM's output ``[B * F, taps * C]`` is read in place.  Compiled with fast
math and cached on disk (``make setup`` and the Docker image compile them).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from enhancers.denoise.gtcrn_kernels import njit, sigmoid, tanh

_f = np.float32
F0, F1, LOG_EPS, MIN_NORM = _f(0.0), _f(1.0), _f(1e-10), _f(1e-30)
TEN, FORTY = _f(10.0), _f(40.0)


@njit
def analysis_frames(audio: np.ndarray, mem: np.ndarray, window: np.ndarray, frames: np.ndarray) -> None:
    """``frames`` [B, 2 hop] = (previous hop, this hop) * window; ``mem`` becomes this hop."""
    b, hop = audio.shape
    for r in range(b):
        for i in range(hop):
            frames[r, i] = mem[r, i] * window[i]
            x = audio[r, i]
            if not np.isfinite(x):
                x = F0
            frames[r, hop + i] = x * window[hop + i]
            mem[r, i] = x


@njit
def features(spec: np.ndarray, widths: np.ndarray, alpha: Any, erb_norm: np.ndarray, cplx_norm: np.ndarray,
             erb_hist: np.ndarray, cplx_hist: np.ndarray, erb_cols: np.ndarray, df_cols: np.ndarray) -> None:
    """Both normalized features of one frame, their 3-frame windows as the first convolutions'
    columns (``erb_cols`` [B * E, 3 frames * 3 taps], ``df_cols`` [B * nb_df, 6 * 3]: channel
    re/im * 3 + frame, then tap), the running norms and the 2-frame histories updated in place."""
    b = spec.shape[0]
    n_erb = widths.shape[0]
    nb_df = cplx_norm.shape[1]
    one_a = F1 - alpha
    win_e = np.empty((n_erb, 3), np.float32)
    win_c = np.empty((nb_df, 6), np.float32)
    for r in range(b):
        start = 0
        for e in range(n_erb):
            p = F0
            for f in range(start, start + widths[e]):
                v = spec[r, f]
                p += v.real * v.real + v.imag * v.imag
            start += widths[e]
            db = TEN * np.log10(p / _f(widths[e]) + LOG_EPS)
            state = db * one_a + erb_norm[r, e] * alpha
            erb_norm[r, e] = state
            win_e[e, 0], win_e[e, 1], win_e[e, 2] = erb_hist[r, e, 0], erb_hist[r, e, 1], (db - state) / FORTY
            erb_hist[r, e, 0], erb_hist[r, e, 1] = win_e[e, 1], win_e[e, 2]
        for f in range(nb_df):
            v = spec[r, f]
            state = abs(v) * one_a + cplx_norm[r, f] * alpha
            s = np.sqrt(state)
            cplx_norm[r, f] = max(state, MIN_NORM)
            for ri in range(2):
                win_c[f, ri * 3], win_c[f, ri * 3 + 1] = cplx_hist[r, f, ri, 0], cplx_hist[r, f, ri, 1]
            win_c[f, 2], win_c[f, 5] = v.real / s, v.imag / s
            for ri in range(2):
                cplx_hist[r, f, ri, 0], cplx_hist[r, f, ri, 1] = win_c[f, ri * 3 + 1], win_c[f, ri * 3 + 2]
        _unfold3(win_e, erb_cols, r * n_erb)
        _unfold3(win_c, df_cols, r * nb_df)


@njit(inline="always")
def _unfold3(x: np.ndarray, cols: np.ndarray, row0: int) -> None:
    """Size-3, padding-1 columns of ``x`` [F, C] into ``cols`` rows row0.. (column c * 3 + tap)."""
    n_f, n_c = x.shape
    for f in range(n_f):
        for c in range(n_c):
            for k in range(3):
                g = f + k - 1
                cols[row0 + f, c * 3 + k] = x[g, c] if 0 <= g < n_f else F0


@njit
def relu_(x: np.ndarray) -> None:
    flat = x.reshape(-1)
    for i in range(flat.shape[0]):
        flat[i] = max(flat[i], F0)


@njit
def pairs_out(z: np.ndarray, bias: np.ndarray, b: int, y: np.ndarray) -> None:
    """Stride-2 frequency conv's epilogue: ``z`` [B * Fo, 2 O] (pair i's taps for out i and i + 1) to
    ReLU'd ``y`` [B, Fo, O]."""
    f_out, o = y.shape[1], y.shape[2]
    for r in range(b):
        for i in range(f_out):
            row = r * f_out + i
            for c in range(o):
                v = z[row, c] + bias[c]
                if i > 0:
                    v += z[row - 1, o + c]
                y[r, i, c] = max(v, F0)


@njit
def shift_out(z: np.ndarray, bias: np.ndarray, b: int, y: np.ndarray, act: int) -> None:
    """Stride-1 frequency conv's epilogue: ``z`` [B * F, 3 O] (the three taps' products) to ``y``
    [B, F, O]; ``act`` 0: none, 1: ReLU, 2: sigmoid."""
    n_f, o = y.shape[1], y.shape[2]
    for r in range(b):
        for i in range(n_f):
            row = r * n_f + i
            for c in range(o):
                v = z[row, o + c] + bias[c]
                if i > 0:
                    v += z[row - 1, c]
                if i < n_f - 1:
                    v += z[row + 1, 2 * o + c]
                if act == 1:
                    v = max(v, F0)
                elif act == 2:
                    v = sigmoid(v)
                y[r, i, c] = v


@njit
def grouped(x: np.ndarray, w: np.ndarray, y: np.ndarray, relu: int, add: np.ndarray) -> None:
    """DF3's grouped linear ``y[b, g*H + h] = sum_i x[b, g*I + i] w[g, i, h]``, ReLU'd if ``relu``, then
    plus ``add`` (same shape as ``y``; an empty array: nothing)."""
    n_g, n_i, n_h = w.shape
    acc = np.empty(n_h, np.float32)
    plus = add.shape[0] > 0
    for r in range(x.shape[0]):
        for g in range(n_g):
            acc[:] = F0
            for i in range(n_i):
                xv = x[r, g * n_i + i]
                for h in range(n_h):
                    acc[h] += xv * w[g, i, h]
            for h in range(n_h):
                v = acc[h]
                if relu:
                    v = max(v, F0)
                if plus:
                    v += add[r, g * n_h + h]
                y[r, g * n_h + h] = v


@numba.njit(cache=True, error_model="numpy")  # no fast math: x / peak exactly as the torch path divides
def unit_rows(x: np.ndarray, unit: np.ndarray, row: np.ndarray) -> None:
    """Each row of ``x`` [M, K] over its largest magnitude into ``unit`` [M + 1, K] (the last row is
    :class:`enhancers.denoise.int8.Matmul`'s sentinel, written once), the magnitudes into ``row``."""
    m, k = x.shape
    for r in range(m):
        peak = MIN_NORM
        for i in range(k):
            peak = max(peak, abs(x[r, i]))
        row[r] = peak
        for i in range(k):
            unit[r, i] = x[r, i] / peak


@njit
def gru_gates(gi: np.ndarray, gi_row: np.ndarray, b_ih: np.ndarray, gh: np.ndarray, gh_row: np.ndarray,
              b_hh: np.ndarray, h: np.ndarray) -> None:
    """A GRU cell's gates (PyTorch's order r, z, n) from the two projections, each ``proj * row + bias``
    (int8 GEMMs of unit rows; float32 ones pass rows of 1 and biases already added), ``h`` [B, H]
    replaced by the new hidden."""
    b, n_h = h.shape
    for r in range(b):
        si, sh = gi_row[r], gh_row[r]
        for j in range(n_h):
            rg = sigmoid(gi[r, j] * si + b_ih[j] + gh[r, j] * sh + b_hh[j])
            zg = sigmoid(gi[r, n_h + j] * si + b_ih[n_h + j] + gh[r, n_h + j] * sh + b_hh[n_h + j])
            n = tanh(gi[r, 2 * n_h + j] * si + b_ih[2 * n_h + j] + rg * (gh[r, 2 * n_h + j] * sh + b_hh[2 * n_h + j]))
            h[r, j] = n + zg * (h[r, j] - n)


@njit
def skip_add(e: np.ndarray, scale: np.ndarray, offset: np.ndarray, y: np.ndarray) -> None:
    """The ERB decoder's skip: ``y += relu(offset + e * scale)`` (per channel), all [B, F, C]."""
    b, n_f, n_c = y.shape
    for r in range(b):
        for f in range(n_f):
            for c in range(n_c):
                y[r, f, c] += max(offset[c] + e[r, f, c] * scale[c], F0)


@njit
def upsample_out(z: np.ndarray, bias: np.ndarray, b: int, y: np.ndarray) -> None:
    """Transposed conv (stride 2) + pointwise epilogue: ``z`` [B * F, 3 O] per-tap products to ReLU'd
    ``y`` [B, 2F, O]: even bins tap 1, odd bins tap 2 plus the next bin's tap 0."""
    n_f2, o = y.shape[1], y.shape[2]
    n_f = n_f2 // 2
    for r in range(b):
        for i in range(n_f):
            row = r * n_f + i
            for c in range(o):
                y[r, 2 * i, c] = max(z[row, o + c] + bias[c], F0)
                v = z[row, 2 * o + c] + bias[c]
                if i < n_f - 1:
                    v += z[row + 1, c]
                y[r, 2 * i + 1, c] = max(v, F0)


@njit
def pathway(taps: np.ndarray, pending: np.ndarray, bias: np.ndarray, b: int, path: np.ndarray) -> None:
    """The deep-filter pathway's causal time conv: ``taps`` [B * nb_df, order * C] (this frame's
    contributions 0..order-1 frames ahead) plus the carried sums ``pending`` [B, nb_df, order - 1, C]
    (shifted in place) to ReLU'd ``path`` [B, nb_df, C]."""
    nb_df, later, n_c = pending.shape[1], pending.shape[2], pending.shape[3]
    for r in range(b):
        for f in range(nb_df):
            row = r * nb_df + f
            for c in range(n_c):
                path[r, f, c] = max(pending[r, f, 0, c] + taps[row, c] + bias[c], F0)
            for j in range(later - 1):
                for c in range(n_c):
                    pending[r, f, j, c] = pending[r, f, j + 1, c] + taps[row, (j + 1) * n_c + c]
            for c in range(n_c):
                pending[r, f, later - 1, c] = taps[row, later * n_c + c]


@njit
def enhance(spec: np.ndarray, spec_hist: np.ndarray, low_hist: np.ndarray, gains: np.ndarray,
            band_of_bin: np.ndarray, df_raw: np.ndarray, path: np.ndarray, mix: np.ndarray,
            out: np.ndarray) -> None:
    """The spectrum ``lookahead`` frames back, enhanced into ``out`` [B, F]: ERB gains on every bin, the
    deep filter (coefficients ``tanh(df_raw) + path``, order taps over the last frames) replacing the
    lowest ``nb_df``, mixed back toward the noisy frame by ``mix``; the histories shifted in place."""
    b, n_bins = spec.shape
    nb_df, later = low_hist.shape[1], low_hist.shape[2]
    order = later + 1
    la = spec_hist.shape[1]
    for r in range(b):
        m = mix[r]
        for f in range(n_bins):
            t = spec_hist[r, 0, f]
            if f < nb_df:
                acc_re, acc_im = F0, F0
                for k in range(order):
                    x = low_hist[r, f, k] if k < later else spec[r, f]
                    base = f * 2 * order + 2 * k
                    c_re = tanh(df_raw[r, base]) + path[r, f, 2 * k]
                    c_im = tanh(df_raw[r, base + 1]) + path[r, f, 2 * k + 1]
                    acc_re += x.real * c_re - x.imag * c_im
                    acc_im += x.real * c_im + x.imag * c_re
                v_re, v_im = acc_re, acc_im
            else:
                g = gains[r, band_of_bin[f]]
                v_re, v_im = t.real * g, t.imag * g
            out[r, f] = complex(v_re + m * (t.real - v_re), v_im + m * (t.imag - v_im))
        for f in range(nb_df):
            for k in range(later - 1):
                low_hist[r, f, k] = low_hist[r, f, k + 1]
            low_hist[r, f, later - 1] = spec[r, f]
        for j in range(la - 1):
            for f in range(n_bins):
                spec_hist[r, j, f] = spec_hist[r, j + 1, f]
        for f in range(n_bins):
            spec_hist[r, la - 1, f] = spec[r, f]


@njit
def overlap_add(frames: np.ndarray, window: np.ndarray, mem: np.ndarray, out: np.ndarray) -> None:
    """Windowed inverse-FFT frames [B, 2 hop]: first half plus ``mem`` into ``out``, second half into ``mem``."""
    b, hop = out.shape
    for r in range(b):
        for i in range(hop):
            out[r, i] = frames[r, i] * window[i] + mem[r, i]
            mem[r, i] = frames[r, hop + i] * window[hop + i]
