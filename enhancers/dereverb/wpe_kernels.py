"""One frame of the recursive WPE (``enhancers.dereverb.wpe.RecursiveWpe._step``) as a numba kernel (CPU).

The torch step is ~140 small ops per call (0.7 ms at one stream, nearly all
dispatch); here one call walks the rows and bins once: the prediction error
of every bin with the current filter, then, for the bins of this frame's
update group, the power estimate, Potter's square-root RLS update of the
inverse correlation matrix and the filter update, and finally the frame into
the history ring.  The arithmetic and its order are the torch step's, which
stays the reference (and the GPU path); ``tests/test_dereverb.py`` checks
them against each other step by step.
"""

from __future__ import annotations

import math

import numpy as np

from enhancers.aec.kernels import njit

SILENCE_POWER = 1e-12  # (enhancers.dereverb.wpe's constants)
RELATIVE_POWER_FLOOR = 1e-10


@njit
def wpe_step(
    frame: np.ndarray,  # [N, 2, F] float32 planes of the observed frame
    history: np.ndarray,  # [N, 2, L, F] float32 ring of past frames, updated in place
    filt: np.ndarray,  # [N, 2, K, F] float32 prediction filter, updated in place
    root: np.ndarray,  # [N, 2, K, K, Fg] float32 square root of this group's inverse correlation, in place
    root_scale: np.ndarray,  # [N, F] float32, updated in place
    delay: np.ndarray,  # [N] int64
    alpha: np.ndarray,  # [N] float32 (per frame)
    frames_seen: np.ndarray,  # [N] int64
    group: int,
    stride: int,
    spacing: int,
    power_frames: int,
    power_floor: float,
    error: np.ndarray,  # [N, 2, F] float32, out
) -> None:
    rows, _, taps, bins = filt.shape
    length = history.shape[2]
    group_bins = root.shape[4]
    slots = np.empty(taps, dtype=np.int64)
    power = np.empty(group_bins)
    wr = np.empty(taps)
    wi = np.empty(taps)
    zr = np.empty(taps)
    zi = np.empty(taps)
    sr = np.empty(taps)
    si = np.empty(taps)
    for n in range(rows):
        t = frames_seen[n]
        for k in range(taps):
            slots[k] = (t - (delay[n] + spacing * k)) % length
        # the prediction error of every bin with the filter as it is
        for f in range(bins):
            pr = 0.0
            pi = 0.0
            for k in range(taps):
                gr = filt[n, 0, k, f]
                gi = filt[n, 1, k, f]
                xr = history[n, 0, slots[k], f]
                xi = history[n, 1, slots[k], f]
                pr += gr * xr + gi * xi
                pi += gr * xi - gi * xr
            error[n, 0, f] = frame[n, 0, f] - pr
            error[n, 1, f] = frame[n, 1, f] - pi
        # the power estimate of this group's bins, and its relative floor
        top = -np.inf
        for g in range(group_bins):
            f = group + g * stride
            p = frame[n, 0, f] ** 2 + frame[n, 1, f] ** 2
            if power_frames > 1:
                for j in range(1, power_frames):
                    s = (t - j) % length
                    p += history[n, 0, s, f] ** 2 + history[n, 1, s, f] ** 2
                p /= power_frames
            if power_floor > 0:
                wp = 0.0
                for k in range(taps):
                    wp += history[n, 0, slots[k], f] ** 2 + history[n, 1, slots[k], f] ** 2
                p = max(p, power_floor * (wp / taps))
            power[g] = p
            top = max(top, p)
        floor = max(top * RELATIVE_POWER_FLOOR, SILENCE_POWER)
        alpha_u = float(alpha[n]) ** stride
        for g in range(group_bins):
            f = group + g * stride
            window_power = 0.0
            for k in range(taps):
                wr[k] = history[n, 0, slots[k], f]
                wi[k] = history[n, 1, slots[k], f]
                window_power += wr[k] * wr[k] + wi[k] * wi[k]
            window_power /= taps
            c = alpha_u * max(power[g], floor)
            scale = root_scale[n, f]
            # z = s S^H w
            znorm = 0.0
            for i in range(taps):
                ar = 0.0
                ai = 0.0
                for j in range(taps):
                    s_r = root[n, 0, j, i, g]
                    s_i = root[n, 1, j, i, g]
                    ar += s_r * wr[j] + s_i * wi[j]
                    ai += s_r * wi[j] - s_i * wr[j]
                zr[i] = ar * scale
                zi[i] = ai * scale
                znorm += zr[i] * zr[i] + zi[i] * zi[i]
            # S z
            for i in range(taps):
                ar = 0.0
                ai = 0.0
                for j in range(taps):
                    s_r = root[n, 0, i, j, g]
                    s_i = root[n, 1, i, j, g]
                    ar += s_r * zr[j] - s_i * zi[j]
                    ai += s_r * zi[j] + s_i * zr[j]
                sr[i] = ar
                si[i] = ai
            active = window_power > SILENCE_POWER
            inv_den = 1.0 / (c + znorm) if active else 0.0
            # Kalman gain k = P w / (c + w^H P w); filter += k e*
            kg = scale * inv_den
            er = error[n, 0, f]
            ei = error[n, 1, f]
            for k in range(taps):
                gr = sr[k] * kg
                gi = si[k] * kg
                filt[n, 0, k, f] += gr * er + gi * ei
                filt[n, 1, k, f] += gi * er - gr * ei
            # Potter: S <- S - gamma (S z) z^H
            gamma = inv_den / (1.0 + math.sqrt(c * inv_den))
            for i in range(taps):
                lr = sr[i] * gamma
                li = si[i] * gamma
                for j in range(taps):
                    root[n, 0, i, j, g] -= lr * zr[j] + li * zi[j]
                    root[n, 1, i, j, g] -= li * zr[j] - lr * zi[j]
            if active:
                root_scale[n, f] = scale / math.sqrt(alpha_u)
        # the frame into the ring (after every read of the past)
        slot = t % length
        for f in range(bins):
            history[n, 0, slot, f] = frame[n, 0, f]
            history[n, 1, slot, f] = frame[n, 1, f]


def compile_kernels() -> None:
    """Compile into the on-disk cache with the stage's argument types (``make setup``)."""
    n, taps, bins, length, stride = 1, 8, 90, 20, 2
    wpe_step(
        np.zeros((n, 2, bins), np.float32), np.zeros((n, 2, length, bins), np.float32),
        np.zeros((n, 2, taps, bins), np.float32), np.zeros((n, 2, taps, taps, bins // stride), np.float32),
        np.ones((n, bins), np.float32), np.ones(n, np.int64), np.full(n, 0.99, np.float32), np.zeros(n, np.int64),
        0, stride, 2, 1, 0.0, np.empty((n, 2, bins), np.float32),
    )
