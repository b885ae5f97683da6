"""Two-path multidelay block frequency-domain adaptive filter (MDF), batched.

The algorithm follows speexdsp's ``mdf.c`` (J.-M. Valin, "On adjusting the
learning rate in frequency domain echo cancellation with double-talk", IEEE
TASLP 2007): a partitioned-block frequency-domain filter whose per-bin step
size comes from an on-line estimate of the echo leakage (so it slows down by
itself in double talk), proportionate per-partition step sizes, the gradient
constraint applied to two partitions per block (AUMDF), and a two-path
structure: a *background* filter adapts all the time and is copied into the
*foreground* filter (which produces the output) only when it is reliably
better; when it is reliably worse it is reset from the foreground.

Like WebRTC AEC3 the linear filter may cover only the lower band (``bins``
below ``max_hz``): speech echo above it is weak and is left to the residual
echo suppressor, which cuts the cost of the filter by the same ratio.

Everything here is a function of a batch of per-stream state tensors (first
dimension = rows of the batch) so one call serves every stream.  Samples are
in 16-bit units (x 32768) so the regularisation constants keep the meaning
they have in speexdsp.  Spectra use ``norm="forward"`` like speexdsp's FFT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from enhancers.stage import CHUNK

# Indices into the per-stream scalar vector ``mdf_scalars``.
DAVG1, DAVG2, DVAR1, DVAR2, PEY, PYY, SUM_ADAPT, ADAPTED, LEAK, BLOCKS = range(10)
N_SCALARS = 10  # mdf_step restacks them in this order

MIN_LEAK = 0.005
VAR1_UPDATE = 0.5
VAR2_UPDATE = 0.25
VAR_BACKTRACK = 4.0


@dataclass(frozen=True)
class MdfConfig:
    """Sizes of the filter: ``partitions`` blocks of ``frame`` samples, bins up to ``max_hz``."""

    partitions: int
    frame: int = CHUNK
    max_hz: float = 8000.0

    @property
    def n_fft(self) -> int:
        return 2 * self.frame

    @property
    def bins(self) -> int:
        """FFT bins the filter adapts (the rest of the spectrum is left alone)."""
        return min(self.frame + 1, round(self.max_hz * self.n_fft / 48_000.0) + 1)


@dataclass
class MdfOutput:
    """What one block of the filter produces for the rows of a batch."""

    error: torch.Tensor  # [B, frame] mic minus foreground echo estimate (the AEC output)
    echo: torch.Tensor  # [B, frame] foreground echo estimate
    leak: torch.Tensor  # [B] echo leakage estimate (residual echo / echo estimate)
    adapted: torch.Tensor  # [B] bool, the filter has passed its initial adaptation


def mdf_initial_state(cfg: MdfConfig) -> dict[str, torch.Tensor]:
    k, f = cfg.partitions, cfg.bins
    decay = math.exp(-2.4 / k)
    prop = torch.tensor([0.7 * decay**i for i in range(k)], dtype=torch.float32)
    scalars = torch.zeros(N_SCALARS)
    scalars[PEY] = 1.0
    scalars[PYY] = 1.0
    return {
        "mdf_x": torch.zeros(k, f, dtype=torch.complex64),  # far spectra ring, slot = block count mod K
        "mdf_w": torch.zeros(k, f, dtype=torch.complex64),  # background (adapting) filter
        "mdf_wf": torch.zeros(k, f, dtype=torch.complex64),  # foreground (output) filter
        "mdf_prop": prop * (0.8 / float(prop.sum())),
        "mdf_power": torch.zeros(f),  # smoothed far-end power per bin
        "mdf_eh": torch.zeros(f),
        "mdf_yh": torch.zeros(f),
        "mdf_scalars": scalars,
    }


def power(z: torch.Tensor) -> torch.Tensor:
    """``|z|^2`` of a complex tensor without the square root of ``abs``."""
    return (z * z.conj()).real


def ring_order(count: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, K]`` ring slot holding the far spectrum of lag 0 ... K-1 at block ``count``."""
    lags = torch.arange(k, device=count.device)
    return torch.remainder(count[:, None] - lags[None, :], k)


def _time_half(spec: torch.Tensor, n_fft: int, frame: int) -> torch.Tensor:
    return torch.fft.irfft(spec, n=n_fft, norm="forward")[..., frame:]


def _spectrum_of_tail(x: torch.Tensor, n_fft: int, bins: int) -> torch.Tensor:
    """Lowest ``bins`` of the spectrum of ``[zeros, x]`` (x in the second half of the window)."""
    padded = torch.nn.functional.pad(x, (n_fft - x.shape[-1], 0))
    return torch.fft.rfft(padded, norm="forward")[..., :bins]


def shift_partitions(w: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``out[b, k] = w[b, k + shift[b]]`` (zeros outside): re-aligns filters after a bulk delay change."""
    k = w.shape[1]
    idx = torch.arange(k, device=w.device)[None, :] + shift[:, None]
    valid = (idx >= 0) & (idx < k)
    gathered = torch.gather(w, 1, idx.clamp(0, k - 1)[:, :, None].expand(-1, -1, w.shape[2]))
    return torch.where(valid[:, :, None], gathered, torch.zeros((), dtype=w.dtype, device=w.device))


def _adjust_prop(w: torch.Tensor) -> torch.Tensor:
    """Proportionate step per partition: larger where the filter has energy."""
    norms = torch.sqrt(torch.linalg.vector_norm(torch.view_as_real(w).flatten(2), dim=-1).square() + 1.0)
    norms = norms + 0.1 * norms.amax(dim=1, keepdim=True)
    return 0.99 * norms / (norms.sum(dim=1, keepdim=True) + 1.0)


def _constrain(w: torch.Tensor, parts: torch.Tensor, cfg: MdfConfig) -> None:
    """Zero the second half of the impulse response of partitions ``parts`` [B, P], in place."""
    index = parts[:, :, None].expand(-1, -1, w.shape[2])
    taps = torch.fft.irfft(torch.gather(w, 1, index), n=cfg.n_fft)
    taps[..., cfg.frame :] = 0.0
    w.scatter_(1, index, torch.fft.rfft(taps)[..., : cfg.bins])


def mdf_step(
    st: dict[str, torch.Tensor],
    x_new: torch.Tensor,
    x_frame: torch.Tensor,
    mic: torch.Tensor,
    count: torch.Tensor,
    cfg: MdfConfig,
) -> MdfOutput:
    """Run one block for every row.

    The filters and the far-spectrum ring in ``st`` are updated in place (so
    they may be views of the stage's state); the smaller entries are replaced.

    ``x_new`` [B, bins] is the (low band) spectrum of the newest (delay-compensated) far-end
    window ``[x(t-1), x(t)]``, ``x_frame`` [B, frame] its newest half, ``mic``
    [B, frame] the microphone block, all in 16-bit units; ``count`` [B] is
    each row's block counter (it positions the far-spectrum ring).
    """
    n, frame, k = cfg.n_fft, cfg.frame, cfg.partitions
    # the per-stream scalars as separate [B] views, restacked once at the end (fewer small ops)
    davg1, davg2, dvar1, dvar2, pey, pyy, sum_adapt, was_adapted, _, blocks = st["mdf_scalars"].unbind(1)
    rows = torch.arange(mic.shape[0], device=mic.device)
    ring = st["mdf_x"]
    ring[rows, torch.remainder(count, k)] = x_new
    x = ring[rows[:, None], ring_order(count, k)]  # [B, K, F], lag order
    w, wf = st["mdf_w"], st["mdf_wf"]

    # Foreground (output) and background (adapting) echo estimates.
    yf, yb = _time_half(torch.stack([(x * wf).sum(1), (x * w).sum(1)], 1), n, frame).unbind(1)
    ef = mic - yf
    eb = mic - yb
    sff = ef.square().sum(-1)
    see = eb.square().sum(-1)
    dbf = (yf - yb).square().sum(-1) + 10.0

    # Two-path logic: is the background filter reliably better (copy it to the
    # foreground) or reliably worse (reset it from the foreground)?
    diff = sff - see
    d1 = 0.6 * davg1 + 0.4 * diff
    d2 = 0.85 * davg2 + 0.15 * diff
    dvar1 = 0.36 * dvar1 + 0.16 * sff * dbf
    dvar2 = 0.7225 * dvar2 + 0.0225 * sff * dbf
    update_fg = (
        (diff * diff.abs() > sff * dbf)
        | (d1 * d1.abs() > VAR1_UPDATE * dvar1)
        | (d2 * d2.abs() > VAR2_UPDATE * dvar2)
    )
    reset_bg = ~update_fg & (
        (-diff * diff.abs() > VAR_BACKTRACK * sff * dbf)
        | (-d1 * d1.abs() > VAR_BACKTRACK * dvar1)
        | (-d2 * d2.abs() > VAR_BACKTRACK * dvar2)
    )
    switched = update_fg | reset_bg
    davg1, davg2, dvar1, dvar2 = (v.masked_fill(switched, 0.0) for v in (d1, d2, dvar1, dvar2))
    if bool(switched.any()):
        to_fg = torch.nonzero(update_fg).squeeze(1)
        wf.index_copy_(0, to_fg, w.index_select(0, to_fg))
        to_bg = torch.nonzero(reset_bg).squeeze(1)
        w.index_copy_(0, to_bg, wf.index_select(0, to_bg))
    # Output echo: cross-fade from the old to the new foreground within the block.
    fade = torch.linspace(0.0, 1.0, frame + 1, device=mic.device)[1:]
    echo = torch.where(update_fg[:, None], yf * (1 - fade) + yb * fade, yf)
    yb = torch.where(reset_bg[:, None], yf, yb)
    eb = torch.where(reset_bg[:, None], ef, eb)
    see = torch.where(reset_bg, sff, see)
    see = see.clamp_min(n * 100.0 / 64.0)

    # Statistics for the adaptive learning rate.
    sey = (eb * yb).sum(-1)
    syy = yb.square().sum(-1)
    sxx = x_frame.square().sum(-1)
    e_spec, y_spec = _spectrum_of_tail(torch.stack([eb, yb], 1), n, cfg.bins).unbind(1)
    rf = power(e_spec)
    yf_pow = power(y_spec)
    xf_pow = power(x_new)
    # Smoothed far power; a running mean over the first blocks so a young
    # stream does not start with a huge step.
    ss = torch.clamp(1.0 / (blocks + 1.0), min=0.35 / k)[:, None]
    far_power = (1 - ss) * st["mdf_power"] + 1.0 + ss * xf_pow

    spec_average = frame / 48_000.0 * 1.0
    beta0 = 2.0 * spec_average
    beta_max = 0.5 * spec_average
    eh_d = rf - st["mdf_eh"]
    yh_d = yf_pow - st["mdf_yh"]
    pey_inst = (eh_d * yh_d).sum(-1)
    pyy_inst = torch.sqrt((yh_d * yh_d).sum(-1))
    pey_inst = pey_inst / (pyy_inst + 1e-9)
    st["mdf_eh"] = (1 - spec_average) * st["mdf_eh"] + spec_average * rf
    st["mdf_yh"] = (1 - spec_average) * st["mdf_yh"] + spec_average * yf_pow
    alpha = torch.minimum(beta0 * syy, beta_max * see) / see
    pyy = ((1 - alpha) * pyy + alpha * pyy_inst).clamp_min(1.0)
    pey = (1 - alpha) * pey + alpha * pey_inst
    pey = torch.minimum(torch.maximum(pey, MIN_LEAK * pyy), pyy)
    leak = pey / pyy

    rer = (1e-4 * sxx + 3.0 * leak * syy) / see
    rer = torch.maximum(rer, sey * sey / (1 + see * syy)).clamp_max(0.5)
    newly = (was_adapted < 0.5) & (sum_adapt > k) & (leak > 0.03)
    adapted = (was_adapted > 0.5) | newly

    # Per-bin step: adaptive (leakage-based) once adapted, fixed before.
    r = torch.minimum(leak[:, None] * yf_pow, 0.5 * (rf + 1.0))
    r = 0.7 * r + 0.3 * rer[:, None] * (rf + 1.0)
    step_adapted = r / ((rf + 1.0) * (far_power + 10.0))
    warm_rate = torch.where(sxx > n * 1000.0, torch.minimum(0.25 * sxx, 0.25 * see) / see, 0.0)
    step_warm = warm_rate[:, None] / (far_power + 10.0)
    sum_adapt = torch.where(adapted, sum_adapt, sum_adapt + warm_rate)
    step = torch.where(adapted[:, None], step_adapted, step_warm)

    # Gradient step on the background filter, then the rotating constraint.
    prop = torch.where(adapted[:, None], _adjust_prop(w), st["mdf_prop"])
    grad = x.conj() * (step * e_spec)[:, None, :]
    w.add_(grad.mul_(prop[:, :, None]))
    rotating = 1 + torch.remainder(count, max(k - 1, 1))
    parts = torch.stack([torch.zeros_like(rotating), rotating.clamp_max(k - 1)], dim=1)
    _constrain(w, parts, cfg)
    sc = torch.stack([davg1, davg2, dvar1, dvar2, pey, pyy, sum_adapt, adapted.float(), leak, blocks + 1], 1)

    st["mdf_prop"], st["mdf_power"], st["mdf_scalars"] = prop, far_power, sc
    return MdfOutput(error=mic - echo, echo=echo, leak=leak, adapted=adapted)
