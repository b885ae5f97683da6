"""Recursive (online) weighted prediction error dereverberation, batched.

The recursion follows ``nara_wpe.wpe.OnlineWPE`` for one microphone: per STFT
bin, the late reverberation of the current frame is predicted from ``taps``
past frames that end ``delay`` frames ago, with a filter estimated by
recursive least squares weighted by the inverse signal power.  Every tensor
carries a leading stream dimension ``N`` and a bin dimension ``F``, so one
call advances all streams and all bins by one frame with a handful of
vectorised torch ops.

Per-stream options cost nothing extra: ``taps`` below the configured maximum
is a zero block in the initial inverse correlation matrix (those taps never
adapt), ``delay`` is a gather index into the frame history, and ``alpha`` is
a per-stream scale.

Differences from nara_wpe, all deliberate: the history is indexed so that
``delay=d`` predicts from frame ``t-d`` backwards (nara's offline ``wpe``
convention; its ``OnlineWPE`` predicts from ``t-d-2``), the inverse
correlation update uses its Hermitian symmetry (one rank-1 update from the
same matrix-vector product), and the update is frozen on digital silence so
the matrix cannot wind up while a stream is muted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Mean |frame|^2 of the prediction window below which a bin counts as silent.
SILENCE_POWER = 1e-12
# Relative floor of the power estimate (as nara_wpe's _stable_positive_inverse).
RELATIVE_POWER_FLOOR = 1e-10
import os
COMPLEX = torch.complex128 if os.environ.get('C128') else torch.complex64


@dataclass
class WpeState:
    """One batch of recursive WPE state, rows aligned with the streams.

    ``history`` ``[N, F, L]`` holds past observed frames, index 0 being the
    previous frame; ``inv_cov`` ``[N, F, K, K]`` is the inverse weighted
    correlation matrix of the prediction window; ``filter`` ``[N, F, K]`` the
    prediction filter; ``delay`` ``[N]`` (long) and ``alpha`` ``[N]`` the
    per-stream delay in frames and forgetting factor.  The tensors are
    updated in place.
    """

    history: torch.Tensor
    inv_cov: torch.Tensor
    filter: torch.Tensor
    delay: torch.Tensor
    alpha: torch.Tensor


class RecursiveWpe:
    """Sizes and the per-frame recursion of batched single-channel online WPE.

    ``max_taps`` is the filter length every stream pays for, ``max_delay``
    the largest delay a stream may ask for, ``power_frames`` how many frames
    (the current one and its predecessors) the signal power estimate
    averages.  Owns no per-stream state; see :class:`WpeState`.
    """

    def __init__(self, bins: int, max_taps: int, max_delay: int, power_frames: int) -> None:
        if max_taps < 1 or max_delay < 1 or power_frames < 1:
            raise ValueError("taps, delay and power_frames must be at least 1")
        self.bins = bins
        self.max_taps = max_taps
        self.max_delay = max_delay
        self.power_frames = power_frames
        self.history_length = max(max_delay + max_taps - 1, power_frames - 1)

    # -- state -------------------------------------------------------------
    def initial_history(self) -> torch.Tensor:
        return torch.zeros(self.bins, self.history_length, dtype=COMPLEX)

    def initial_inv_cov(self, taps: int) -> torch.Tensor:
        """Identity on the first ``taps`` taps, zero elsewhere, for every bin."""
        if not 1 <= taps <= self.max_taps:
            raise ValueError(f"taps must be in 1..{self.max_taps}, got {taps}")
        diag = (torch.arange(self.max_taps) < taps).to(COMPLEX)
        return torch.diag(diag).expand(self.bins, -1, -1).clone()

    def initial_filter(self) -> torch.Tensor:
        return torch.zeros(self.bins, self.max_taps, dtype=COMPLEX)

    def check_delay(self, delay: int) -> int:
        if not 1 <= delay <= self.max_delay:
            raise ValueError(f"delay must be in 1..{self.max_delay}, got {delay}")
        return delay

    # -- recursion -------------------------------------------------------------
    def window(self, state: WpeState) -> torch.Tensor:
        """Prediction window ``[N, F, K]``: frames ``t-delay`` back to ``t-delay-K+1``."""
        n = state.history.shape[0]
        offsets = torch.arange(self.max_taps, device=state.history.device)
        index = (state.delay.unsqueeze(1) - 1 + offsets).view(n, 1, self.max_taps)
        return torch.gather(state.history, 2, index.expand(n, self.bins, self.max_taps))

    def power(self, frame: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """Power estimate ``[N, F]``: mean |y|^2 over the last ``power_frames`` frames."""
        power = frame.real.square() + frame.imag.square()
        if self.power_frames > 1:
            past = history[..., : self.power_frames - 1]
            power = power + (past.real.square() + past.imag.square()).sum(-1)
            power = power / self.power_frames
        fs = int(os.environ.get("FSMOOTH", "0"))
        if fs:
            power = torch.nn.functional.avg_pool1d(power.unsqueeze(1), 2 * fs + 1, 1, fs, count_include_pad=False).squeeze(1)
        tf = float(os.environ.get("TFLOOR", "0"))
        if tf:
            power = torch.maximum(power, tf * power.mean(dim=1, keepdim=True))
        floor = power.amax(dim=1, keepdim=True) * RELATIVE_POWER_FLOOR
        return torch.maximum(power, floor.clamp_min(SILENCE_POWER))

    def step(self, frame: torch.Tensor, state: WpeState) -> torch.Tensor:
        """Dereverberate one frame ``[N, F]`` (complex64) and advance ``state``."""
        window = self.window(state)
        prediction_error = frame - torch.einsum("nfk,nfk->nf", state.filter.conj(), window)

        power = self.power(frame, state.history)
        wf = float(os.environ.get("WFLOOR", "0"))
        if wf:
            power = torch.maximum(power, wf * (window.real.square() + window.imag.square()).mean(-1))
        alpha = state.alpha.view(-1, 1)
        gain_dir = torch.einsum("nfij,nfj->nfi", state.inv_cov, window)  # P w
        quad = torch.einsum("nfk,nfk->nf", window.conj(), gain_dir).real.clamp_min(0.0)  # w^H P w
        denominator = (alpha * power + quad) * (1.0 + float(os.environ.get("DEPS", "0")))
        dl = float(os.environ.get("DLOAD", "0"))
        active = (window.real.square() + window.imag.square()).mean(-1) > SILENCE_POWER
        inv_den = torch.where(active, 1.0 / denominator, torch.zeros_like(denominator))

        # Kalman gain k = P w / den; filter += k e*.
        state.filter.add_(gain_dir * (inv_den * prediction_error.conj()).unsqueeze(-1))
        # P <- (P - (P w)(P w)^H / den) / alpha, using P = P^H; frozen where silent.
        scaled = gain_dir * inv_den.sqrt().unsqueeze(-1)
        trace = torch.diagonal(state.inv_cov, dim1=-2, dim2=-1).real.sum(-1)
        tmax = float(os.environ.get("TMAX", "0")) * self.max_taps
        grow = active & (trace < tmax) if tmax else active
        forget = torch.where(grow, 1.0 / alpha, torch.ones_like(inv_den)).to(state.inv_cov.dtype)
        state.inv_cov.sub_(scaled.unsqueeze(-1) * scaled.conj().unsqueeze(-2))
        state.inv_cov.mul_(forget.view(*forget.shape, 1, 1))
        if dl:
            torch.diagonal(state.inv_cov, dim1=-2, dim2=-1).add_(dl)

        history = torch.cat((frame.unsqueeze(-1), state.history[..., :-1]), dim=-1)
        state.history.copy_(history)
        return prediction_error
