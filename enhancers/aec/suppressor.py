"""Residual echo suppression after the linear filter, batched and zero-latency.

The gain follows the coherence-based nonlinear processor of WebRTC's
original AEC: per bin, the coherence between microphone and linear-filter
output (``cohde``: near 1 when the filter removed nothing, i.e. near-end
speech) and between microphone and echo reference (``cohxd``, here the
larger of the coherence with the delay-aligned far end and with the linear
echo estimate: near 1 where the mic is echo) give ``hNl = min(cohde,
1 - cohxd)``.  All of it runs on 200 Hz bands (``band_bins`` FFT bins
each, 121 bands): summing (cross-)spectra over a band before the coherence
cuts the variance of the estimates, and with it the near-end speech lost
in double talk, and makes the gain logic four times cheaper; the band
gains are expanded back to bins.  A near-end-only detector passes ``cohde``; a tracked minimum of
``hNl`` sets an *overdrive* exponent so that the suppression reaches a target
depth ("moderate": -11.5, "aggressive": -18.4 nats, as in WebRTC) and the gain
is ``hNl ** (overdrive * curve)``, stronger at high frequencies.  Where the far
end has been silent for longer than the echo tail the gain is exactly 1, so
near-end-only talk passes untouched.

Suppressed bins are filled with comfort noise at the microphone's noise
floor (a minimum-tracked PSD), ``sqrt(1 - gain^2)`` of it, so the output does
not pump between noise and silence.  Its random phases come from a counter
hash, so a stream's output does not depend on which other streams share its
batch.

The gains are applied with zero latency: they are turned into a minimum-phase
response (real cepstrum folding) and applied by overlap-save on ``[previous,
current]`` output, cross-faded from the previous block's filter.  A
minimum-phase response has its energy at the front, so what it has beyond one
chunk (and wraps around in the 2-chunk circular convolution) is negligible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from enhancers.aec.mdf import power
from enhancers.stage import CHUNK, SAMPLE_RATE

# Indices into ``sup_scalars``.
FB_MIN, FB_LOCAL_MIN, XD_AVG_MIN, OVERDRIVE, OVERDRIVE_SM, NEAR_STATE, NEW_MIN, MIN_CTR, DIVERGED, HANG = (
    range(10)
)
N_SCALARS = 10

# Per-stream suppression levels: (target suppression in nats, minimum overdrive); "off" disables.
SUPPRESSION_LEVELS: dict[str, tuple[float, float]] = {
    "off": (0.0, 1.0),
    "moderate": (-11.5, 2.0),
    "aggressive": (-18.4, 5.0),
}


@dataclass(frozen=True)
class SuppressorConfig:
    """Frame size and the constants of the coherence NLP."""

    frame: int = CHUNK
    psd_smoothing: float = 0.77  # WebRTC's 0.9 per 4 ms block, at 10 ms
    band_bins: int = 4  # FFT bins per band of the gain computation (200 Hz)
    pref_low_hz: float = 600.0
    pref_high_hz: float = 3000.0
    far_active_dbfs: float = -60.0
    hangover_chunks: int = 30
    noise_smoothing: float = 0.9
    noise_rise: float = 1.0012  # per chunk, ~0.5 dB/s
    noise_bias: float = 1.5  # minimum of a smoothed PSD underestimates its mean

    @property
    def n_fft(self) -> int:
        return 2 * self.frame

    @property
    def bins(self) -> int:
        return self.frame + 1

    @property
    def bands(self) -> int:
        return -(-self.bins // self.band_bins)


def suppressor_initial_state(cfg: SuppressorConfig) -> dict[str, torch.Tensor]:
    f, nb = cfg.bins, cfg.bands
    scalars = torch.zeros(N_SCALARS)
    scalars[FB_MIN] = scalars[FB_LOCAL_MIN] = scalars[XD_AVG_MIN] = 1.0
    scalars[OVERDRIVE] = scalars[OVERDRIVE_SM] = 2.0
    h = torch.ones(f, dtype=torch.complex64)
    return {
        "sup_psd": torch.zeros(4, nb),  # band-summed, smoothed |X|^2, |D|^2, |E|^2, |Y|^2
        "sup_cross": torch.zeros(3, nb, dtype=torch.complex64),  # X D*, D E*, Y D*
        "sup_scalars": scalars,
        "sup_filter": h,  # last applied (minimum-phase) filter spectrum
        "sup_noise_psd": torch.zeros(f),  # mic PSD smoothed for the noise tracker
        "sup_noise": torch.full((f,), 1e12),  # mic noise floor (tracked minimum)
        "sup_cn_tail": torch.zeros(cfg.frame),  # comfort noise overlap-add tail
        "sup_target": torch.tensor(-11.5),
        "sup_min_overdrive": torch.tensor(2.0),
        "sup_enabled": torch.tensor(1.0),
    }


class ResidualEchoSuppressor:
    """Owns the windows and band curves; ``step`` computes and applies the gains for a batch."""

    def __init__(self, cfg: SuppressorConfig, device: torch.device) -> None:
        self.cfg = cfg
        n, f, nb = cfg.n_fft, cfg.bins, cfg.bands
        self.window = torch.hann_window(n, periodic=True, device=device)
        lin = torch.linspace(0.0, 1.0, nb, device=device)
        self.weight_curve = 0.3 * torch.sqrt(lin) + 0.1
        self.weight_curve[0] = 0.0
        self.overdrive_curve = torch.sqrt(lin) + 1.0
        hz = (torch.arange(nb, device=device) + 0.5) * cfg.band_bins * SAMPLE_RATE / n
        self.pref = torch.nonzero((hz >= cfg.pref_low_hz) & (hz < cfg.pref_high_hz)).squeeze(1)
        fold = torch.zeros(n, device=device)
        fold[0] = 1.0
        fold[1 : n // 2] = 2.0
        fold[n // 2] = 1.0
        self.fold = fold
        taper = torch.ones(cfg.frame, device=device)
        taper[-cfg.frame // 8 :] = torch.hann_window(cfg.frame // 4, periodic=False, device=device)[
            cfg.frame // 8 :
        ]
        self.taper = taper
        self.fade = torch.linspace(0.0, 1.0, cfg.frame + 1, device=device)[1:]
        # Comfort-noise synthesis window (sqrt-Hann: its square overlap-adds to 1), and the
        # factor undoing the Hann analysis window's power loss (0.375).
        self.cn_window = torch.sqrt(self.window) / (0.375**0.5)
        self.bin_index = torch.arange(f, device=device, dtype=torch.long)
        # Far-end "active" threshold on the windowed pref-band power, 16-bit units.
        pref_bins = len(self.pref) * cfg.band_bins
        self.far_active = (10 ** (cfg.far_active_dbfs / 20) * 32768) ** 2 * 0.375 / n * pref_bins
        self.kernel = True  # the numba kernel on the CPU (gains); False: torch ops only
        from enhancers.aec.kernels import suppressor_gains

        self._kernel = suppressor_gains  # bound once: the dispatch runs every chunk
        self._weight_curve_np = self.weight_curve.cpu().numpy().astype(np.float64)
        self._overdrive_curve_np = self.overdrive_curve.cpu().numpy().astype(np.float64)
        self._pref_np = self.pref.cpu().numpy().astype(np.int64)

    def spectra(self, windowed: list[torch.Tensor], plain: list[torch.Tensor]) -> torch.Tensor:
        """``[B, len(windowed) + len(plain), bins]`` spectra (``norm="forward"``) of ``[B, 2*frame]``
        sample windows: Hann-windowed analysis spectra first, then rectangular ones, in one FFT call."""
        frames = torch.stack([w * self.window for w in windowed] + plain, dim=1)
        return torch.fft.rfft(frames, norm="forward")

    def to_bands(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``[B, C, bins]`` into ``[B, C, bands]``."""
        width = self.cfg.band_bins
        padded = torch.nn.functional.pad(x, (0, self.cfg.bands * width - x.shape[-1]))
        return padded.view(*x.shape[:-1], self.cfg.bands, width).sum(-1)

    def to_bins(self, g: torch.Tensor) -> torch.Tensor:
        """Expand band values ``[B, bands]`` to ``[B, bins]``."""
        return g.repeat_interleave(self.cfg.band_bins, dim=-1)[:, : self.cfg.bins]

    @staticmethod
    def smooth_bands(x: torch.Tensor) -> torch.Tensor:
        """[1, 2, 1] smoothing along the last (band) axis; edges reuse their own band."""
        padded = torch.cat([x[..., :1], x, x[..., -1:]], dim=-1)
        return 0.25 * padded[..., :-2] + 0.5 * x + 0.25 * padded[..., 2:]

    def gains(
        self,
        st: dict[str, torch.Tensor],
        xw: torch.Tensor,
        dw: torch.Tensor,
        ew: torch.Tensor,
        yw: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-bin suppression gains ``[B, bins]`` and the divergence flag ``[B]`` (use mic, not error).

        On the CPU one numba kernel does it (``kernels.py``: the same arithmetic, ~10x
        cheaper at small batches); ``self.kernel = False`` keeps the torch ops (the reference)."""
        if self.kernel and xw.device.type == "cpu":
            return self._gains_kernel(st, xw, dw, ew, yw)
        return self.gains_torch(st, xw, dw, ew, yw)

    def _gains_kernel(
        self,
        st: dict[str, torch.Tensor],
        xw: torch.Tensor,
        dw: torch.Tensor,
        ew: torch.Tensor,
        yw: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gain, flag = self.gains_stacked(st, torch.stack([xw, dw, ew, yw], 1).numpy())
        return torch.from_numpy(gain), torch.from_numpy(flag)

    def gains_stacked(self, st: dict[str, torch.Tensor], spectra: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The kernel's gains and divergence flags from ``[B, 4, bins]`` complex64 spectra (far end, mic,
        error, echo estimate), as numpy arrays; ``st`` updated in place."""
        cfg = self.cfg
        rows = spectra.shape[0]
        gain = np.empty((rows, cfg.bins), dtype=np.float32)
        flag = np.empty(rows, dtype=np.bool_)
        for key in ("sup_psd", "sup_cross", "sup_scalars"):  # updated in place: pool views or the batch's copies
            if not st[key].is_contiguous():
                st[key] = st[key].contiguous()
        self._kernel(
            spectra, st["sup_psd"].numpy(), st["sup_cross"].numpy(), st["sup_scalars"].numpy(),
            st["sup_min_overdrive"].numpy(), st["sup_target"].numpy(), st["sup_enabled"].numpy(),
            self._weight_curve_np, self._overdrive_curve_np, self._pref_np, float(self.far_active),
            float(cfg.psd_smoothing), int(cfg.band_bins), float(cfg.hangover_chunks), gain, flag,
        )
        return gain, flag

    def gains_torch(
        self,
        st: dict[str, torch.Tensor],
        xw: torch.Tensor,
        dw: torch.Tensor,
        ew: torch.Tensor,
        yw: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`gains` in torch ops (any device)."""
        cfg = self.cfg
        a = cfg.psd_smoothing
        # the per-stream scalars as separate [B] views, restacked once at the end (fewer small ops)
        fb_min, fb_local_min, xd_avg_min, overdrive, overdrive_sm, near_state, new_min_flag, min_ctr, diverged_flag, hang = (
            st["sup_scalars"].unbind(1)
        )
        spectra = torch.stack([xw, dw, ew, yw], 1)
        powers = self.to_bands(power(spectra))
        products = torch.view_as_real(
            spectra[:, [0, 1, 3]] * spectra[:, [1, 2, 1]].conj()
        )  # X D*, D E*, Y D*
        bands = torch.view_as_complex(self.to_bands(products.movedim(-1, 2)).movedim(2, -1).contiguous())
        psd = a * st["sup_psd"] + (1 - a) * powers
        cross = a * st["sup_cross"] + (1 - a) * bands
        st["sup_psd"], st["sup_cross"] = psd, cross
        psd, cross = (
            self.smooth_bands(psd),
            torch.view_as_complex(
                self.smooth_bands(torch.view_as_real(cross).movedim(-1, 2)).movedim(2, -1).contiguous()
            ),
        )
        sxx, sdd, see, syy = psd.unbind(1)
        sxx = sxx + 1e-3

        # Divergence safeguard: a linear output louder than the mic means the filter is off.
        sd_sum, se_sum = sdd.sum(-1), see.sum(-1)
        diverged = torch.where(diverged_flag > 0.5, se_sum * 1.05 >= sd_sum, se_sum > sd_sum)
        see = torch.where(diverged[:, None], sdd, see)
        cross_de = torch.where(diverged[:, None], sdd.to(cross.dtype), cross[:, 1])

        coh_de = power(cross_de) / (sdd * see + 1e-10)
        coh_xd = power(cross[:, 0]) / (sxx * sdd + 1e-10)
        coh_yd = power(cross[:, 2]) / (syy * sdd + 1e-10)
        coh_xd = torch.maximum(coh_xd, coh_yd).clamp(0.0, 1.0)
        coh_de = coh_de.clamp(0.0, 1.0)

        pref = self.pref
        xd_avg = 1.0 - coh_xd[:, pref].mean(-1)
        de_avg = coh_de[:, pref].mean(-1)
        xd_avg_min = torch.where((xd_avg < 0.75) & (xd_avg < xd_avg_min), xd_avg, xd_avg_min)
        near = torch.where((de_avg > 0.98) & (xd_avg > 0.9), 1.0, near_state)
        near = torch.where((de_avg < 0.95) | (xd_avg < 0.8), 0.0, near)
        near_b = near > 0.5
        no_echo_seen = xd_avg_min >= 1.0

        h_echo = torch.minimum(coh_de, 1.0 - coh_xd)
        sorted_pref = torch.sort(h_echo[:, pref], dim=-1).values
        q = sorted_pref.shape[-1] - 1
        fb_echo, fb_low_echo = sorted_pref[:, int(0.75 * q)], sorted_pref[:, int(0.5 * q)]
        use_de = near_b
        use_xd = ~near_b & no_echo_seen
        h = torch.where(use_de[:, None], coh_de, torch.where(use_xd[:, None], 1.0 - coh_xd, h_echo))
        fb = torch.where(use_de, de_avg, torch.where(use_xd, xd_avg, fb_echo))
        fb_low = torch.where(use_de, de_avg, torch.where(use_xd, xd_avg, fb_low_echo))
        overdrive = torch.where(no_echo_seen, st["sup_min_overdrive"], overdrive)

        # Track the local minimum of hNl to set the overdrive (suppression depth).
        new_min = (fb_low < 0.6) & (fb_low < fb_local_min)
        fb_local_min = torch.where(new_min, fb_low, fb_local_min)
        fb_min = torch.where(new_min, fb_low, fb_min)
        new_min_flag = torch.where(new_min, 1.0, new_min_flag)
        min_ctr = torch.where(new_min, 0.0, min_ctr)
        fb_local_min = (fb_local_min + 0.001).clamp_max(1.0)
        xd_avg_min = (xd_avg_min + 0.00075).clamp_max(1.0)
        min_ctr = torch.where(new_min_flag > 0.5, min_ctr + 1, min_ctr)
        fire = min_ctr >= 2
        od = torch.maximum(st["sup_target"] / (torch.log(fb_min + 1e-10) + 1e-10), st["sup_min_overdrive"])
        overdrive = torch.where(fire, od, overdrive)
        new_min_flag = torch.where(fire, 0.0, new_min_flag)
        min_ctr = torch.where(fire, 0.0, min_ctr)
        rate = torch.where(overdrive < overdrive_sm, 0.025, 0.23)
        overdrive_sm = (1 - rate) * overdrive_sm + rate * overdrive

        # Weight the bands towards the preferred-band level, then overdrive.
        h = torch.where(h > fb[:, None], self.weight_curve * fb[:, None] + (1 - self.weight_curve) * h, h)
        gain = torch.pow(h.clamp_min(1e-6), overdrive_sm[:, None] * self.overdrive_curve)

        # Only where the far end was active within the echo tail, and where enabled.
        far_now = psd[:, 0, pref].sum(-1) > self.far_active
        hang = torch.where(far_now, float(cfg.hangover_chunks), (hang - 1).clamp_min(0.0))
        active = (hang > 0) & (st["sup_enabled"] > 0.5)
        gain = torch.where(active[:, None], self.to_bins(gain), 1.0)
        st["sup_scalars"] = torch.stack(
            [fb_min, fb_local_min, xd_avg_min, overdrive, overdrive_sm, near, new_min_flag, min_ctr,
             diverged.float(), hang],
            1,
        )
        return gain, diverged & active

    def track_noise(self, st: dict[str, torch.Tensor], dw: torch.Tensor) -> torch.Tensor:
        """Update and return the microphone's noise floor PSD ``[B, bins]``."""
        cfg = self.cfg
        a = cfg.noise_smoothing
        psd = a * st["sup_noise_psd"] + (1 - a) * power(dw)
        noise = torch.where(psd < st["sup_noise"], psd, st["sup_noise"] * cfg.noise_rise)
        st["sup_noise_psd"], st["sup_noise"] = psd, noise
        return noise * cfg.noise_bias

    def comfort_noise_spectrum(
        self, noise: torch.Tensor, gain: torch.Tensor, count: torch.Tensor
    ) -> torch.Tensor:
        """Spectrum of one noise frame shaped like ``noise * (1 - gain^2)``, per-stream deterministic phases."""
        key = count[:, None] * 1_000_003 + self.bin_index[None, :] * 7919
        key = (key ^ (key >> 13)) * 0x5BD1E995
        key = key ^ (key >> 15)
        phase = torch.remainder(key, 1 << 16).float() * (2 * torch.pi / (1 << 16))
        phase[:, 0] = 0.0
        phase[:, -1] = 0.0
        mag = torch.sqrt((noise * (1 - gain.square())).clamp_min(0.0))
        return torch.polar(mag, phase)

    def minimum_phase(self, gain: torch.Tensor) -> torch.Tensor:
        """Spectrum of the causal minimum-phase response with magnitude ``gain``."""
        n = self.cfg.n_fft
        cep = torch.fft.irfft(torch.log(gain.clamp_min(1e-5)), n=n)
        log_spec = torch.fft.rfft(cep * self.fold)
        return torch.polar(torch.exp(log_spec.real), log_spec.imag)

    def apply(
        self,
        st: dict[str, torch.Tensor],
        gain: torch.Tensor,
        spec: torch.Tensor,
        noise_spec: torch.Tensor,
    ) -> torch.Tensor:
        """Output chunk: the newest half of the window whose spectrum is ``spec`` (``norm="forward"``)
        filtered with the gains (cross-faded from the last filter), plus overlap-added comfort noise."""
        frame, n = self.cfg.frame, self.cfg.n_fft
        new_h = self.minimum_phase(gain)
        frames = torch.fft.irfft(
            torch.stack([spec * st["sup_filter"], spec * new_h, noise_spec], 1), n=n, norm="forward"
        )
        st["sup_filter"] = new_h
        old, new = frames[:, 0, frame:], frames[:, 1, frame:]
        noise_frame = frames[:, 2] * self.cn_window
        noise = st["sup_cn_tail"] + noise_frame[:, :frame]
        st["sup_cn_tail"] = noise_frame[:, frame:]
        return old + (new - old) * self.fade + noise
