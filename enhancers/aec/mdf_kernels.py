"""The MDF adaptive filter's block (``enhancers.aec.mdf.mdf_step``) as numba kernels and numpy FFTs (CPU).

``mdf_step`` is ~260 small torch ops per call: 0.84 ms at one stream, nearly
all of it dispatch.  Here one block is three row-by-row kernels around the
three FFTs the algorithm needs (pocketfft through numpy): the echo estimates
(``_accumulate``, then the inverse FFT), the two-path logic in the time
domain (``_two_path``, then the FFT of the error and echo), and the learning
rate, the gradient step and the choice of the partitions to constrain
(``_adapt``, then the constraint's FFT pair).  The arithmetic and the order
of the updates are ``mdf_step``'s, which stays the reference (and the GPU
path); ``tests/test_aec.py`` checks them against each other step by step.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from enhancers.aec.kernels import njit
from enhancers.aec.mdf import (
    ADAPTED,
    BLOCKS,
    DAVG1,
    DAVG2,
    DVAR1,
    DVAR2,
    LEAK,
    MIN_LEAK,
    PEY,
    PYY,
    SUM_ADAPT,
    VAR1_UPDATE,
    VAR2_UPDATE,
    VAR_BACKTRACK,
    MdfConfig,
    MdfOutput,
)

# aux columns written by _two_path for _adapt
SEE, SYY, SEY, SXX = range(4)


@njit
def _accumulate(ring: np.ndarray, w: np.ndarray, wf: np.ndarray, x_new: np.ndarray, count: np.ndarray,
                spec: np.ndarray) -> None:
    """Store the newest far spectrum in each row's ring; ``spec[b]`` = foreground and background echo spectra."""
    rows, k, f = ring.shape
    for b in range(rows):
        slot = count[b] % k
        for j in range(f):
            ring[b, slot, j] = x_new[b, j]
        for j in range(f):
            sf = 0j
            sb = 0j
            for lag in range(k):
                x = ring[b, (count[b] - lag) % k, j]
                sf += x * wf[b, lag, j]
                sb += x * w[b, lag, j]
            spec[b, 0, j] = sf
            spec[b, 1, j] = sb


@njit
def _two_path(yt: np.ndarray, mic: np.ndarray, x_frame: np.ndarray, scalars: np.ndarray, w: np.ndarray,
              wf: np.ndarray, floor_see: float, echo: np.ndarray, error: np.ndarray, padded: np.ndarray,
              aux: np.ndarray) -> None:
    """Foreground / background decision per row (filters copied in place), the output echo and error, and
    ``padded[b]`` = [zeros, background error], [zeros, background echo] for the FFT."""
    rows, frame = mic.shape
    half = padded.shape[2] - frame
    for b in range(rows):
        sff = 0.0
        see = 0.0
        dbf = 10.0
        for i in range(frame):
            ef = mic[b, i] - yt[b, 0, i]
            eb = mic[b, i] - yt[b, 1, i]
            sff += ef * ef
            see += eb * eb
            dy = yt[b, 0, i] - yt[b, 1, i]
            dbf += dy * dy
        diff = sff - see
        d1 = 0.6 * scalars[b, DAVG1] + 0.4 * diff
        d2 = 0.85 * scalars[b, DAVG2] + 0.15 * diff
        dvar1 = 0.36 * scalars[b, DVAR1] + 0.16 * sff * dbf
        dvar2 = 0.7225 * scalars[b, DVAR2] + 0.0225 * sff * dbf
        update_fg = (diff * abs(diff) > sff * dbf) or (d1 * abs(d1) > VAR1_UPDATE * dvar1) or (
            d2 * abs(d2) > VAR2_UPDATE * dvar2)
        reset_bg = (not update_fg) and ((-diff * abs(diff) > VAR_BACKTRACK * sff * dbf)
                                        or (-d1 * abs(d1) > VAR_BACKTRACK * dvar1)
                                        or (-d2 * abs(d2) > VAR_BACKTRACK * dvar2))
        if update_fg or reset_bg:
            d1 = d2 = dvar1 = dvar2 = 0.0
        scalars[b, DAVG1] = d1
        scalars[b, DAVG2] = d2
        scalars[b, DVAR1] = dvar1
        scalars[b, DVAR2] = dvar2
        if update_fg:
            wf[b] = w[b]
        elif reset_bg:
            w[b] = wf[b]
        sey = 0.0
        syy = 0.0
        sxx = 0.0
        for i in range(frame):
            yf = yt[b, 0, i]
            yb = yt[b, 1, i]
            if update_fg:
                fade = (i + 1) / frame
                e = yf * (1 - fade) + yb * fade
            else:
                e = yf
            echo[b, i] = e
            error[b, i] = mic[b, i] - e
            if reset_bg:
                yb = yf
            eb = mic[b, i] - yb
            sey += eb * yb
            syy += yb * yb
            sxx += x_frame[b, i] * x_frame[b, i]
            padded[b, 0, half + i] = eb
            padded[b, 1, half + i] = yb
        if reset_bg:
            see = sff
        aux[b, SEE] = max(see, floor_see)
        aux[b, SYY] = syy
        aux[b, SEY] = sey
        aux[b, SXX] = sxx


@njit
def _adapt(spec: np.ndarray, x_new: np.ndarray, ring: np.ndarray, count: np.ndarray, w: np.ndarray,
           power_state: np.ndarray, eh: np.ndarray, yh: np.ndarray, prop_state: np.ndarray, scalars: np.ndarray,
           aux: np.ndarray, n_fft: int, frame: int, parts: np.ndarray) -> None:
    """The leakage-based learning rate, the gradient step on the background filter, and which two
    partitions the constraint takes this block (``parts``)."""
    rows, k, f = w.shape
    spec_average = frame / 48_000.0
    beta0 = 2.0 * spec_average
    beta_max = 0.5 * spec_average
    rf = np.empty(f)
    step = np.empty(f)
    norms = np.empty(k)
    for b in range(rows):
        see, syy, sey, sxx = aux[b, SEE], aux[b, SYY], aux[b, SEY], aux[b, SXX]
        blocks = scalars[b, BLOCKS]
        ss = max(1.0 / (blocks + 1.0), 0.35 / k)
        pey_inst = 0.0
        yy = 0.0
        for j in range(f):
            e = spec[b, 0, j]
            y = spec[b, 1, j]
            x = x_new[b, j]
            rf[j] = e.real * e.real + e.imag * e.imag
            yf_pow = y.real * y.real + y.imag * y.imag
            power_state[b, j] = (1 - ss) * power_state[b, j] + 1.0 + ss * (x.real * x.real + x.imag * x.imag)
            eh_d = rf[j] - eh[b, j]
            yh_d = yf_pow - yh[b, j]
            pey_inst += eh_d * yh_d
            yy += yh_d * yh_d
            eh[b, j] = (1 - spec_average) * eh[b, j] + spec_average * rf[j]
            yh[b, j] = (1 - spec_average) * yh[b, j] + spec_average * yf_pow
            step[j] = yf_pow  # kept for the step below
        pyy_inst = math.sqrt(yy)
        pey_inst = pey_inst / (pyy_inst + 1e-9)
        alpha = min(beta0 * syy, beta_max * see) / see
        pyy = max((1 - alpha) * scalars[b, PYY] + alpha * pyy_inst, 1.0)
        pey = (1 - alpha) * scalars[b, PEY] + alpha * pey_inst
        pey = min(max(pey, MIN_LEAK * pyy), pyy)
        leak = pey / pyy
        rer = (1e-4 * sxx + 3.0 * leak * syy) / see
        rer = min(max(rer, sey * sey / (1 + see * syy)), 0.5)
        sum_adapt = scalars[b, SUM_ADAPT]
        was = scalars[b, ADAPTED]
        adapted = was > 0.5 or (was < 0.5 and sum_adapt > k and leak > 0.03)
        warm_rate = min(0.25 * sxx, 0.25 * see) / see if sxx > n_fft * 1000.0 else 0.0
        for j in range(f):
            fp = power_state[b, j] + 10.0
            if adapted:
                r = min(leak * step[j], 0.5 * (rf[j] + 1.0))
                r = 0.7 * r + 0.3 * rer * (rf[j] + 1.0)
                step[j] = r / ((rf[j] + 1.0) * fp)
            else:
                step[j] = warm_rate / fp
        if not adapted:
            sum_adapt = sum_adapt + warm_rate
        if adapted:  # proportionate step per partition, from the filter before this step
            top = 0.0
            for lag in range(k):
                energy = 0.0
                for j in range(f):
                    v = w[b, lag, j]
                    energy += v.real * v.real + v.imag * v.imag
                norms[lag] = math.sqrt(energy + 1.0)
                top = max(top, norms[lag])
            total = 0.0
            for lag in range(k):
                norms[lag] += 0.1 * top
                total += norms[lag]
            for lag in range(k):
                prop_state[b, lag] = 0.99 * norms[lag] / (total + 1.0)
        for lag in range(k):
            p = prop_state[b, lag]
            slot = (count[b] - lag) % k
            for j in range(f):
                w[b, lag, j] += ring[b, slot, j].conjugate() * (step[j] * spec[b, 0, j]) * p
        scalars[b, PEY] = pey
        scalars[b, PYY] = pyy
        scalars[b, SUM_ADAPT] = sum_adapt
        scalars[b, ADAPTED] = 1.0 if adapted else 0.0
        scalars[b, LEAK] = leak
        scalars[b, BLOCKS] = blocks + 1
        parts[b, 0] = 0
        parts[b, 1] = min(1 + count[b] % max(k - 1, 1), k - 1)


def mdf_step_kernels(
    st: dict[str, torch.Tensor],
    x_new: torch.Tensor,
    x_frame: torch.Tensor,
    mic: torch.Tensor,
    count: torch.Tensor,
    cfg: MdfConfig,
) -> MdfOutput:
    """:func:`enhancers.aec.mdf.mdf_step` on the CPU: the state in ``st`` updated in place."""
    for key in ("mdf_x", "mdf_w", "mdf_wf", "mdf_prop", "mdf_power", "mdf_eh", "mdf_yh", "mdf_scalars"):
        if not st[key].is_contiguous():
            st[key] = st[key].contiguous()
    n, frame, f = cfg.n_fft, cfg.frame, cfg.bins
    rows = mic.shape[0]
    ring, w, wf = st["mdf_x"].numpy(), st["mdf_w"].numpy(), st["mdf_wf"].numpy()
    scalars = st["mdf_scalars"].numpy()
    xn = np.ascontiguousarray(x_new.numpy())
    cnt = np.ascontiguousarray(count.numpy())
    spec = np.empty((rows, 2, f), dtype=np.complex64)
    _accumulate(ring, w, wf, xn, cnt, spec)
    yt = np.ascontiguousarray(np.fft.irfft(spec, n=n, norm="forward")[..., frame:])
    echo = np.empty((rows, frame), dtype=np.float32)
    error = np.empty((rows, frame), dtype=np.float32)
    padded = np.zeros((rows, 2, n), dtype=np.float32)
    aux = np.empty((rows, 4))
    _two_path(yt, np.ascontiguousarray(mic.numpy()), np.ascontiguousarray(x_frame.numpy()), scalars, w, wf,
              n * 100.0 / 64.0, echo, error, padded, aux)
    ey = np.ascontiguousarray(np.fft.rfft(padded, norm="forward")[..., :f])
    parts = np.empty((rows, 2), dtype=np.int64)
    _adapt(ey, xn, ring, cnt, w, st["mdf_power"].numpy(), st["mdf_eh"].numpy(), st["mdf_yh"].numpy(),
           st["mdf_prop"].numpy(), scalars, aux, n, frame, parts)
    # the constraint: the second half of the impulse response of partitions ``parts`` goes to zero
    index = np.arange(rows)[:, None]
    taps = np.fft.irfft(w[index, parts], n=n)
    taps[..., frame:] = 0.0
    w[index, parts] = np.fft.rfft(taps)[..., :f]
    leak = torch.from_numpy(scalars[:, LEAK].copy())
    adapted = torch.from_numpy(scalars[:, ADAPTED] > 0.5)
    return MdfOutput(error=torch.from_numpy(error), echo=torch.from_numpy(echo), leak=leak, adapted=adapted)


def compile_kernels(cfg: Any = None) -> None:
    """Compile into the on-disk cache with the stage's argument types (``make setup``)."""
    from enhancers.aec.mdf import mdf_initial_state

    cfg = cfg or MdfConfig(partitions=24)
    state = {k: v[None].clone() for k, v in mdf_initial_state(cfg).items()}
    mdf_step_kernels(state, torch.zeros(1, cfg.bins, dtype=torch.complex64), torch.zeros(1, cfg.frame),
                     torch.zeros(1, cfg.frame), torch.zeros(1, dtype=torch.long), cfg)
