"""The numba kernels of :mod:`enhancers.denoise.gtcrn_native`: GTCRN's small ops, fused.

As torch ops these small tensors cost ~2-20 us per op here (``gru_cell`` ~20 us, grouped
``conv1d`` ~60 us; the 33-step intra-frame GRU alone ~1 ms, more than the whole ONNX Runtime
frame), so everything but the larger GEMMs runs here: features, the convolutions' column
building, the GRU cells, the GT blocks' depthwise convs over their rings, the DPGRNN norms,
the mask.  Activations are channel-major, ``[channels, B * bins]``.  Compiled with fast math
and cached on disk next to this file (the first load compiles, ~20 s; ``make setup`` and the
Docker image do it).  Kernels index 1-D views from 0: numba's fix-up of negative computed
indices would stop the vectorizer.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

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


def njit(*args: Any, **options: Any) -> Any:
    """``numba.njit`` with this module's options: fast math, cached on disk, no division checks."""
    jit: Any = numba.njit
    return jit(*args, fastmath=True, cache=True, error_model="numpy", **options)


@njit(inline="always")
def tanh(x: Any) -> Any:
    x = min(max(x, -TANH_CLAMP), TANH_CLAMP)
    x2 = x * x
    return x * ((((((P0 * x2 + P1) * x2 + P2) * x2 + P3) * x2 + P4) * x2 + P5) * x2 + P6) / (
        ((Q0 * x2 + Q1) * x2 + Q2) * x2 + Q3)


@njit(inline="always")
def sigmoid(x: Any) -> Any:
    return F2 + F2 * tanh(F2 * x)


@njit(inline="always")
def prelu(x: Any, a: Any) -> Any:
    return x if x >= F0 else a * x


@njit
def features(spec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


@njit
def conv0_cols(xpad: np.ndarray, erb: np.ndarray) -> np.ndarray:
    """im2col of SFE + conv 0 (kernel 5, stride 2) as one kernel of 7 bins: [3 * 7, B * 65], row (c, j),
    column (b, fo) = bin 2 fo + j - 3 of channel c (SFE padding: see :func:`conv1_cols`)."""
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


@njit
def conv1_cols(z: np.ndarray, xpad: np.ndarray, edges: np.ndarray, a: float
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
            ac[q] = prelu(zc[q], a)
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


@njit
def poly_cols(v: np.ndarray, n_in: int, groups: int) -> np.ndarray:
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


@njit
def interleave(z: np.ndarray, a: float, skip: np.ndarray) -> np.ndarray:
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
                oc[2 * m] = prelu(ze[m], a) + sc[2 * m]
            for m in range(SUB - 1):
                oc[2 * m + 1] = prelu(zo[m], a) + sc[2 * m + 1]
    return out


@njit
def project(w: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
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


@njit
def gru(gi: np.ndarray, gh: np.ndarray, h: np.ndarray, out: np.ndarray, hidden: int) -> None:
    """ONNX GRU gates (z, r, h; linear_before_reset) on columns: projections [3 hidden, N] with biases,
    ``h`` and ``out`` [hidden, N]."""
    for j in range(hidden):
        iz, ir, ic = gi[j], gi[hidden + j], gi[2 * hidden + j]
        hz, hr, hc = gh[j], gh[hidden + j], gh[2 * hidden + j]
        hj, oj = h[j], out[j]
        for q in range(h.shape[1]):
            z = sigmoid(iz[q] + hz[q])
            c = tanh(ic[q] + sigmoid(ir[q] + hr[q]) * hc[q])
            oj[q] = c + z * (hj[q] - c)


@njit
def gt_block(y: np.ndarray, x: np.ndarray, skip: np.ndarray, add_skip: bool, ring: np.ndarray,
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
            co[1] = prelu(y1[0] + y2[1], a1)
            for f in range(1, SUB - 1):
                co[f + 1] = prelu(y0[f - 1] + y1[f] + y2[f + 1], a1)
            co[SUB] = prelu(y0[SUB - 2] + y1[SUB - 1], a1)
        for c in range(CH):
            oc, mc, cc, dc, w = old[c], mid[c], cur[c], d[c, base : base + SUB], wd[c]
            w0, w1, w2_, w3, w4, w5, w6, w7, w8 = w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8]
            for f in range(SUB):
                v = bd[c] + w0 * oc[f] + w1 * oc[f + 1] + w2_ * oc[f + 2] + w3 * mc[f] + w4 * mc[f + 1]
                dc[f] = prelu(v + w5 * mc[f + 2] + w6 * cc[f] + w7 * cc[f + 1] + w8 * cc[f + 2], a2)
        ring[write[b, i], half] = cur
    p = project(w2, b2, d)
    e, h, hn = np.empty((HALF, n), np.float32), np.empty((CH, n), np.float32), np.empty((CH, n), np.float32)
    for c in range(HALF):
        for b in range(n):
            pc, acc = p[c, b * SUB : b * SUB + SUB], F0
            for f in range(SUB):
                acc += pc[f] * pc[f]
            e[c, b] = acc / _f(SUB)
    for b in range(n):
        h[:, b] = tra[slots[b], idx]
    gru(project(w_ih, b_ih, e), project(w_hh, b_hh, h), h, hn, CH)
    for b in range(n):
        tra[slots[b], idx] = hn[:, b]
    att, out = project(w_att, b_att, hn), np.empty((CH, n * SUB), np.float32)
    for c in range(HALF):
        for b in range(n):
            g, pc, oc = sigmoid(att[c, b]), p[c, b * SUB :], out[2 * c, b * SUB : b * SUB + SUB]
            for f in range(SUB):
                oc[f] = pc[f] * g
        out[2 * c + 1] = x[HALF + c]
    if add_skip:
        for c in range(CH):
            oc, sc = out[c], skip[c]
            for q in range(n * SUB):
                oc[q] += sc[q]
    return out


@njit
def bins_major(x: np.ndarray) -> np.ndarray:
    """[16, B * 33] with columns (stream, bin) -> columns (bin, stream)."""
    n = x.shape[1] // SUB
    out = np.empty_like(x)
    for c in range(CH):
        for t in range(SUB):
            src, dst = x[c, t:], out[c, t * n : t * n + n]
            for b in range(n):
                dst[b] = src[b * SUB]
    return out


@njit
def intra(gi: np.ndarray, rec: np.ndarray, rb: np.ndarray) -> np.ndarray:
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
                    z = sigmoid(gz[b] + bz + rz[0] * h0 + rz[1] * h1 + rz[2] * h2 + rz[3] * h3)
                    r = sigmoid(gr[b] + br + rr[0] * h0 + rr[1] * h1 + rr[2] * h2 + rr[3] * h3)
                    c = tanh(gc[b] + r * (bn + rn[0] * h0 + rn[1] * h1 + rn[2] * h2 + rn[3] * h3))
                    nh[j, b] = c + z * (h[j, b] - c)
            h[:] = nh
            y[4 * u : 4 * u + 4, t * n : t * n + n] = nh
    return y


@njit
def norm_residual(z: np.ndarray, w: np.ndarray, bias: np.ndarray, res: np.ndarray, skip: np.ndarray,
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


@njit
def norm_gather(z: np.ndarray, w: np.ndarray, bias: np.ndarray, res: np.ndarray, inter: np.ndarray,
                 slots: np.ndarray, k: int) -> np.ndarray:
    """[``res`` + LayerNorm(``z``) (:func:`norm_residual`); the hiddens ``inter[slot, k]``]: [32, 33 * B]."""
    n = slots.shape[0]
    out = np.empty((2 * CH, SUB * n), np.float32)
    out[:CH] = norm_residual(z, w, bias, res, res, False)
    for c in range(CH):
        for t in range(SUB):
            dst = out[CH + c, t * n : t * n + n]
            for b in range(n):
                dst[b] = inter[slots[b], k, c, t]
    return out


@njit
def inter_step(g: np.ndarray, xh: np.ndarray, inter: np.ndarray, slots: np.ndarray, k: int) -> np.ndarray:
    """The inter-frame GRUs from ``g`` [96, 33 * B], the projections of ``xh`` = [input; hidden] per group
    (input: rows 24 grp + (z, r, h) * 8 + j, hidden: 48 + ..): the new hiddens, also to ``inter[slot, k]``."""
    n = slots.shape[0]
    out = np.empty((CH, xh.shape[1]), np.float32)
    for grp in range(2):
        rows = slice(3 * HALF * grp, 3 * HALF * (grp + 1))
        h = xh[CH + HALF * grp : CH + HALF * (grp + 1)]
        gru(g[rows], g[48:][rows], h, out[HALF * grp : HALF * (grp + 1)], HALF)
    for c in range(CH):
        for t in range(SUB):
            src = out[c, t * n : t * n + n]
            for b in range(n):
                inter[slots[b], k, c, t] = src[b]
    return out


@njit
def apply_mask(spec: np.ndarray, m: np.ndarray, erb_bs: np.ndarray) -> np.ndarray:
    """tanh of the decoder's output ``m`` [(bin 2m / 2m + 1, re / im), B * 65], ERB band split (64 bands
    -> 192 bins), complex mask on ``spec`` in float32: [B, 257] complex."""
    n = spec.shape[0]
    out, mr, mi = np.empty((n, BINS), np.complex128), np.empty(BINS, np.float32), np.empty(BINS, np.float32)
    for b in range(n):
        mr[LOW:], mi[LOW:] = F0, F0
        for f in range(129):
            vr, vi = tanh(m[2 * (f % 2), b * 65 + f // 2]), tanh(m[2 * (f % 2) + 1, b * 65 + f // 2])
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


@njit
def ring_rows(slots: np.ndarray, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
