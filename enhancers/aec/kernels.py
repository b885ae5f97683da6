"""The echo canceller's per-row arithmetic as numba kernels (CPU): the residual echo suppressor's gains
and the bulk delay estimator's update.

:meth:`enhancers.aec.suppressor.ResidualEchoSuppressor.gains` is ~210 small torch
ops per call: at one stream that is 0.68 ms of dispatch for a few thousand
flops.  This kernel computes the same thing row by row in one call (the band
powers and cross-spectra, their smoothing, the coherences, the near-end
detector, the overdrive tracking, the gains), reading and updating the same
state arrays in place.  The torch code stays the reference (and the path on
a GPU); ``tests/test_aec.py`` checks that both give the same gains.  The delay estimator
(``enhancers.aec.delay``, ~85 ops) is the same story: ``delay_update``.

Compiled into an on-disk cache next to this file (``make setup`` does it once).
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np

# Indices into ``sup_scalars`` (the same as enhancers.aec.suppressor's).
FB_MIN, FB_LOCAL_MIN, XD_AVG_MIN, OVERDRIVE, OVERDRIVE_SM, NEAR_STATE, NEW_MIN, MIN_CTR, DIVERGED, HANG = range(10)


def njit(*args: Any, **options: Any) -> Any:
    """``numba.njit`` cached on disk, IEEE semantics (the torch path is the reference)."""
    jit: Any = numba.njit
    return jit(*args, cache=True, **options)


@njit
def suppressor_gains(
    spectra: np.ndarray,  # [B, 4, F] complex64: far (aligned), mic, linear error, linear echo (Hann-windowed)
    psd_state: np.ndarray,  # [B, 4, nb] float32, updated in place (smoothed band powers)
    cross_state: np.ndarray,  # [B, 3, nb] complex64, updated in place (X D*, D E*, Y D*)
    scalars: np.ndarray,  # [B, 10] float32, updated in place
    min_overdrive: np.ndarray,  # [B]
    target: np.ndarray,  # [B]
    enabled: np.ndarray,  # [B]
    weight_curve: np.ndarray,  # [nb]
    overdrive_curve: np.ndarray,  # [nb]
    pref: np.ndarray,  # [P] int64 band indices of the preferred band
    far_active: float,
    a: float,
    band_bins: int,
    hangover: float,
    gain: np.ndarray,  # [B, F] float32, out
    flag: np.ndarray,  # [B] bool, out: diverged and active
) -> None:
    rows, _, nbins = spectra.shape
    nb = psd_state.shape[2]
    npref = pref.shape[0]
    sm_p = np.empty((4, nb), dtype=np.float64)
    sm_c = np.empty((3, nb), dtype=np.complex128)
    coh_de = np.empty(nb, dtype=np.float64)
    coh_xd = np.empty(nb, dtype=np.float64)
    h = np.empty(nb, dtype=np.float64)
    hp = np.empty(npref, dtype=np.float64)
    for b in range(rows):
        # band-summed powers and cross-spectra, smoothed over time (the state keeps these)
        for k in range(nb):
            p0 = p1 = p2 = p3 = 0.0
            c0 = c1 = c2 = 0j
            for j in range(k * band_bins, min((k + 1) * band_bins, nbins)):
                x = spectra[b, 0, j]
                d = spectra[b, 1, j]
                e = spectra[b, 2, j]
                y = spectra[b, 3, j]
                p0 += x.real * x.real + x.imag * x.imag
                p1 += d.real * d.real + d.imag * d.imag
                p2 += e.real * e.real + e.imag * e.imag
                p3 += y.real * y.real + y.imag * y.imag
                c0 += x * d.conjugate()
                c1 += d * e.conjugate()
                c2 += y * d.conjugate()
            psd_state[b, 0, k] = a * psd_state[b, 0, k] + (1 - a) * p0
            psd_state[b, 1, k] = a * psd_state[b, 1, k] + (1 - a) * p1
            psd_state[b, 2, k] = a * psd_state[b, 2, k] + (1 - a) * p2
            psd_state[b, 3, k] = a * psd_state[b, 3, k] + (1 - a) * p3
            cross_state[b, 0, k] = a * cross_state[b, 0, k] + (1 - a) * c0
            cross_state[b, 1, k] = a * cross_state[b, 1, k] + (1 - a) * c1
            cross_state[b, 2, k] = a * cross_state[b, 2, k] + (1 - a) * c2
        # [1, 2, 1] smoothing along the bands, edges reuse their own band
        for k in range(nb):
            lo = k - 1 if k > 0 else 0
            hi = k + 1 if k < nb - 1 else nb - 1
            for c in range(4):
                sm_p[c, k] = 0.25 * psd_state[b, c, lo] + 0.5 * psd_state[b, c, k] + 0.25 * psd_state[b, c, hi]
            for c in range(3):
                sm_c[c, k] = 0.25 * cross_state[b, c, lo] + 0.5 * cross_state[b, c, k] + 0.25 * cross_state[b, c, hi]
        fb_min = scalars[b, FB_MIN]
        fb_local_min = scalars[b, FB_LOCAL_MIN]
        xd_avg_min = scalars[b, XD_AVG_MIN]
        overdrive = scalars[b, OVERDRIVE]
        overdrive_sm = scalars[b, OVERDRIVE_SM]
        near = scalars[b, NEAR_STATE]
        new_min_flag = scalars[b, NEW_MIN]
        min_ctr = scalars[b, MIN_CTR]
        hang = scalars[b, HANG]

        # divergence safeguard: a linear output louder than the mic means the filter is off
        sd_sum = 0.0
        se_sum = 0.0
        for k in range(nb):
            sd_sum += sm_p[1, k]
            se_sum += sm_p[2, k]
        if scalars[b, DIVERGED] > 0.5:
            diverged = se_sum * 1.05 >= sd_sum
        else:
            diverged = se_sum > sd_sum
        for k in range(nb):
            sxx = sm_p[0, k] + 1e-3
            sdd = sm_p[1, k]
            see = sm_p[2, k]
            syy = sm_p[3, k]
            if diverged:
                see = sdd
                cde = sdd * sdd
            else:
                cde = sm_c[1, k].real ** 2 + sm_c[1, k].imag ** 2
            de = cde / (sdd * see + 1e-10)
            xd = (sm_c[0, k].real ** 2 + sm_c[0, k].imag ** 2) / (sxx * sdd + 1e-10)
            yd = (sm_c[2, k].real ** 2 + sm_c[2, k].imag ** 2) / (syy * sdd + 1e-10)
            xd = max(xd, yd)
            coh_xd[k] = min(max(xd, 0.0), 1.0)
            coh_de[k] = min(max(de, 0.0), 1.0)

        xd_mean = 0.0
        de_mean = 0.0
        for i in range(npref):
            xd_mean += coh_xd[pref[i]]
            de_mean += coh_de[pref[i]]
        xd_avg = 1.0 - xd_mean / npref
        de_avg = de_mean / npref
        if xd_avg < 0.75 and xd_avg < xd_avg_min:
            xd_avg_min = xd_avg
        if de_avg > 0.98 and xd_avg > 0.9:
            near = 1.0
        if de_avg < 0.95 or xd_avg < 0.8:
            near = 0.0
        near_b = near > 0.5
        no_echo_seen = xd_avg_min >= 1.0

        for i in range(npref):
            k = pref[i]
            hp[i] = min(coh_de[k], 1.0 - coh_xd[k])
        hp.sort()
        q = npref - 1
        fb_echo = hp[int(0.75 * q)]
        fb_low_echo = hp[int(0.5 * q)]
        use_xd = (not near_b) and no_echo_seen
        for k in range(nb):
            if near_b:
                h[k] = coh_de[k]
            elif use_xd:
                h[k] = 1.0 - coh_xd[k]
            else:
                h[k] = min(coh_de[k], 1.0 - coh_xd[k])
        if near_b:
            fb = de_avg
            fb_low = de_avg
        elif use_xd:
            fb = xd_avg
            fb_low = xd_avg
        else:
            fb = fb_echo
            fb_low = fb_low_echo
        if no_echo_seen:
            overdrive = min_overdrive[b]

        # track the local minimum of hNl to set the overdrive (suppression depth)
        if fb_low < 0.6 and fb_low < fb_local_min:
            fb_local_min = fb_low
            fb_min = fb_low
            new_min_flag = 1.0
            min_ctr = 0.0
        fb_local_min = min(fb_local_min + 0.001, 1.0)
        xd_avg_min = min(xd_avg_min + 0.00075, 1.0)
        if new_min_flag > 0.5:
            min_ctr = min_ctr + 1
        if min_ctr >= 2:
            overdrive = max(target[b] / (math.log(fb_min + 1e-10) + 1e-10), min_overdrive[b])
            new_min_flag = 0.0
            min_ctr = 0.0
        rate = 0.025 if overdrive < overdrive_sm else 0.23
        overdrive_sm = (1 - rate) * overdrive_sm + rate * overdrive

        # only where the far end was active within the echo tail, and where enabled
        far_power = 0.0
        for i in range(npref):
            far_power += sm_p[0, pref[i]]
        if far_power > far_active:
            hang = hangover
        else:
            hang = max(hang - 1.0, 0.0)
        active = hang > 0 and enabled[b] > 0.5
        for k in range(nb):
            hk = h[k]
            if hk > fb:
                hk = weight_curve[k] * fb + (1 - weight_curve[k]) * hk
            g = max(hk, 1e-6) ** (overdrive_sm * overdrive_curve[k]) if active else 1.0
            for j in range(k * band_bins, min((k + 1) * band_bins, nbins)):
                gain[b, j] = g
        flag[b] = diverged and active

        scalars[b, FB_MIN] = fb_min
        scalars[b, FB_LOCAL_MIN] = fb_local_min
        scalars[b, XD_AVG_MIN] = xd_avg_min
        scalars[b, OVERDRIVE] = overdrive
        scalars[b, OVERDRIVE_SM] = overdrive_sm
        scalars[b, NEAR_STATE] = near
        scalars[b, NEW_MIN] = new_min_flag
        scalars[b, MIN_CTR] = min_ctr
        scalars[b, DIVERGED] = 1.0 if diverged else 0.0
        scalars[b, HANG] = hang


def compile_kernels() -> None:
    """Compile the kernel into its on-disk cache now (``make setup``, the image), with the argument types the
    stage passes (C-contiguous float32 / complex64 state, float64 curves), not in a worker on first use."""
    rows, bins, bands = 1, 481, 121
    suppressor_gains(
        np.zeros((rows, 4, bins), np.complex64), np.zeros((rows, 4, bands), np.float32),
        np.zeros((rows, 3, bands), np.complex64), np.ones((rows, 10), np.float32),
        np.full(rows, 2.0, np.float32), np.full(rows, -11.5, np.float32), np.ones(rows, np.float32),
        np.zeros(bands), np.ones(bands), np.arange(10, 20, dtype=np.int64), 1.0, 0.77, 4, 30.0,
        np.empty((rows, bins), np.float32), np.empty(rows, np.bool_),
    )
    cand, dbands = 61, 24
    delay_update(
        np.ones((rows, bins), np.float32), np.ones((rows, bins), np.float32), np.arange(dbands, dtype=np.int64),
        np.arange(1, dbands + 1, dtype=np.int64), np.ones(dbands, np.float32), np.zeros(rows, np.int64),
        np.zeros((rows, cand, dbands), np.float32), np.zeros((rows, dbands), np.float32),
        np.zeros((rows, dbands), np.float32), np.zeros((rows, cand), np.float32), np.zeros((rows, cand), np.float32),
        np.zeros(rows, np.float32), np.zeros((rows, 6), np.float32), 0.99, 0.25, 0.05, 15.0,
        np.empty(rows, np.int64),
    )


@njit
def delay_update(
    far_power: np.ndarray,  # [B, F] float32 power spectra of the newest far-end window
    near_power: np.ndarray,  # [B, F] float32 of the microphone window
    band_lo: np.ndarray,  # [bands] int64 first bin of each band
    band_hi: np.ndarray,  # [bands] int64 one past its last bin
    floor: np.ndarray,  # [bands] float32 band power floor
    count: np.ndarray,  # [B] int64 chunk counters
    ring: np.ndarray,  # [B, C, bands] float32 far onset features, updated in place
    far_last: np.ndarray,  # [B, bands] float32, updated in place
    near_last: np.ndarray,  # [B, bands]
    corr: np.ndarray,  # [B, C] float32
    far_var: np.ndarray,  # [B, C]
    near_var: np.ndarray,  # [B]
    scalars: np.ndarray,  # [B, 6] float32: delay, candidate, confirm, locked, score, best
    lam: float,
    min_score: float,
    margin: float,
    confirm_chunks: float,
    delay_out: np.ndarray,  # [B] int64
) -> None:
    rows = far_power.shape[0]
    n_cand = ring.shape[1]
    bands = ring.shape[2]
    far_f = np.empty(bands, dtype=np.float64)
    near_f = np.empty(bands, dtype=np.float64)
    score = np.empty(n_cand, dtype=np.float64)
    for b in range(rows):
        far_mean = 0.0
        near_mean = 0.0
        for k in range(bands):
            fe = 0.0
            ne = 0.0
            for j in range(band_lo[k], band_hi[k]):
                fe += far_power[b, j]
                ne += near_power[b, j]
            lf = math.log(fe + floor[k])
            ln = math.log(ne + floor[k])
            far_f[k] = max(lf - far_last[b, k], 0.0)
            near_f[k] = max(ln - near_last[b, k], 0.0)
            far_last[b, k] = lf
            near_last[b, k] = ln
            far_mean += far_f[k]
            near_mean += near_f[k]
        far_mean /= bands
        near_mean /= bands
        slot = count[b] % n_cand
        near_energy = 0.0
        for k in range(bands):
            ring[b, slot, k] = far_f[k] - far_mean
            near_f[k] -= near_mean
            near_energy += near_f[k] * near_f[k]
        near_var[b] = lam * near_var[b] + (1 - lam) * near_energy
        best = 0
        best_score = -np.inf
        for d in range(n_cand):
            s = (count[b] - d) % n_cand
            inst = 0.0
            energy = 0.0
            for k in range(bands):
                p = ring[b, s, k]
                inst += p * near_f[k]
                energy += p * p
            corr[b, d] = lam * corr[b, d] + (1 - lam) * inst
            far_var[b, d] = lam * far_var[b, d] + (1 - lam) * energy
            score[d] = corr[b, d] / math.sqrt(far_var[b, d] * near_var[b] + 1e-6)
            if score[d] > best_score:
                best_score = score[d]
                best = d
        current = scalars[b, 0]
        candidate = scalars[b, 1]
        confirm = scalars[b, 2]
        locked = scalars[b, 3]
        cur_score = -1.0 if current < 0 else score[int(max(current, 0.0))]
        best_f = float(best)
        wants = best_score > min_score and best_score > cur_score + margin and best_f != current
        if wants and best_f == candidate:
            confirm = confirm + 1
        elif wants:
            confirm = 1.0
        else:
            confirm = 0.0
        candidate = best_f if wants else -1.0
        delay = current
        if confirm >= confirm_chunks:
            delay = best_f
            locked = 1.0
            confirm = 0.0
        scalars[b, 0] = delay
        scalars[b, 1] = candidate
        scalars[b, 2] = confirm
        scalars[b, 3] = locked
        scalars[b, 4] = score[int(max(delay, 0.0))]
        scalars[b, 5] = best_f
        delay_out[b] = int(delay)
