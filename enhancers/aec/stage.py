"""The server-side acoustic echo canceller stage (``aec``).

For each stream the SFU hands the stage the microphone chunk and, in
``ctx.reference``, the audio it sent that participant over the same 10 ms.
The echo of that reference comes back 50-500 ms later, so per stream the
stage (1) keeps a ring of the recent reference, (2) estimates the bulk delay
(:mod:`enhancers.aec.delay`), (3) runs a two-path MDF adaptive filter
(:mod:`enhancers.aec.mdf`) on the reference read that far back, and (4)
removes the residual echo with a coherence-based suppressor
(:mod:`enhancers.aec.suppressor`).  All of it is batched across streams;
every piece of per-stream state is a slot of ``self.state``.

The filter works on the current chunk, so ``latency_samples`` is 0.

Per-stream options (``stage.stream(**options)``):
``delay_hint_ms`` (the expected echo delay, used until the estimator locks)
and ``suppression`` (``"off"``, ``"moderate"`` (default), ``"aggressive"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from enhancers.aec.delay import BEST, CANDIDATE, DELAY, DelayConfig, DelayEstimator, delay_initial_state
from enhancers.aec.mdf import MdfConfig, mdf_initial_state, mdf_step, power, ring_order, shift_partitions
from enhancers.aec.stage_cpu import compile_kernels as compile_cpu_kernels
from enhancers.aec.stage_cpu import process_cpu
from enhancers.aec.suppressor import (
    SUPPRESSION_LEVELS,
    ResidualEchoSuppressor,
    SuppressorConfig,
    suppressor_initial_state,
)
from enhancers.stage import CHUNK, NEAR_SHIFT, BatchContext, Stage, StageStream

SCALE = 32768.0  # the filter works in 16-bit units (speexdsp's constants)


class EchoCancellerStage(Stage):
    """Batched echo canceller; owns the delay estimator, filter and suppressor constants and the state pool.

    ``tail_ms`` is the echo tail the adaptive filter covers after the bulk
    delay, ``pre_ms`` how far before the estimated delay it starts (absorbs a
    delay estimate that is a chunk or two off), ``max_delay_ms`` the largest
    bulk delay searched, ``linear_max_hz`` the top of the band the linear
    filter covers (above it the suppressor alone removes echo, as in AEC3).
    """

    name = "aec"
    latency_samples = 0
    live_options = frozenset({"delay_hint_ms", NEAR_SHIFT})

    def __init__(
        self,
        device: str | torch.device = "cpu",
        tail_ms: float = 210.0,
        pre_ms: float = 30.0,
        max_delay_ms: float = 600.0,
        linear_max_hz: float = 8000.0,
    ) -> None:
        super().__init__(device)
        self.margin = max(0, math.ceil(pre_ms / 10.0))
        partitions = self.margin + max(1, math.ceil(tail_ms / 10.0))
        self.mdf = MdfConfig(partitions=partitions, max_hz=linear_max_hz)
        self.delay_cfg = DelayConfig(max_delay_chunks=math.ceil(max_delay_ms / 10.0))
        self.sup_cfg = SuppressorConfig()
        self.ring_chunks = self.delay_cfg.max_delay_chunks + self.mdf.partitions + 3
        self.delay = DelayEstimator(self.delay_cfg, self.mdf.n_fft, self.device)
        self.suppressor = ResidualEchoSuppressor(self.sup_cfg, self.device)
        self._lanes = torch.arange(self.mdf.n_fft, device=self.device)
        # On the CPU the chunk runs in numpy with numba kernels (enhancers/aec/stage_cpu.py: the MDF block,
        # the delay estimator and the suppressor's gains, mdf_kernels.py and kernels.py, and the rest);
        # False: the torch ops of process_torch (the delay estimator and the gains keep their own flags).
        self.kernels = True
        # the suppressor's constant windows as numpy arrays (enhancers/aec/stage_cpu.py)
        sup = self.suppressor
        self._window_np, self._fold_np, self._cn_window_np, self._fade_np = (
            t.cpu().numpy().astype(np.float32) for t in (sup.window, sup.fold, sup.cn_window, sup.fade))
        if self.device.type == "cpu":  # load (or compile) them now, while the executor loads the stage,
            from enhancers.aec import kernels, mdf_kernels  # (not on a live stream's first chunk)

            kernels.compile_kernels()
            mdf_kernels.compile_kernels(self.mdf)
            compile_cpu_kernels(self)

    # -- per-stream state ---------------------------------------------------
    def initial_state(self) -> dict[str, torch.Tensor]:
        state = {
            "far_ring": torch.zeros(self.ring_chunks, CHUNK),
            "mic_prev": torch.zeros(CHUNK),
            "err_prev": torch.zeros(CHUNK),
            "echo_prev": torch.zeros(CHUNK),
            "count": torch.zeros((), dtype=torch.long),
            "filter_delay": torch.zeros((), dtype=torch.long),  # chunks the filter input is delayed by
            "hint": torch.tensor(-1, dtype=torch.long),  # delay hint in chunks, -1 = none
        }
        state.update(mdf_initial_state(self.mdf))
        state.update(delay_initial_state(self.delay_cfg))
        state.update(suppressor_initial_state(self.sup_cfg))
        return state

    def open_native(self, stream: StageStream) -> None:
        level = str(stream.options.get("suppression", "moderate"))
        if level not in SUPPRESSION_LEVELS:
            raise ValueError(f"suppression must be one of {sorted(SUPPRESSION_LEVELS)}, not {level!r}")
        target, min_overdrive = SUPPRESSION_LEVELS[level]
        self.state["sup_target"][stream.slot] = target
        self.state["sup_min_overdrive"][stream.slot] = min_overdrive
        self.state["sup_enabled"][stream.slot] = 0.0 if level == "off" else 1.0
        self.set_delay_hint(stream, stream.options.get("delay_hint_ms"))

    def retune(self, stream: StageStream, changed: dict[str, Any]) -> None:
        if "delay_hint_ms" in changed:
            self.set_delay_hint(stream, changed["delay_hint_ms"])
        if NEAR_SHIFT in changed:
            before = round(float(stream.options.get(NEAR_SHIFT) or 0) / CHUNK)
            after = round(float(changed[NEAR_SHIFT] or 0) / CHUNK)
            self.shift_near(stream, after - before)

    def shift_near(self, stream: StageStream, chunks: int) -> None:
        """The microphone's timeline jumped ``chunks`` chunks ahead (negative: it was stretched) between
        the last chunk and the next: a jitter buffer skipped or inserted audio, so the echo now comes
        that much sooner (later) after its reference.

        The echo path itself did not change, only where it sits: the delay estimate, the hint and the
        candidates' correlations move by ``chunks``; the adaptive filters keep their taps and read the
        far end from the new bulk delay (the far-spectrum ring rebuilt from it), and what the bulk delay
        cannot take (it stops at 0 and at the search range) moves the taps instead.  The canceller goes
        on cancelling, instead of leaking echo while the estimator finds the new delay."""
        if chunks == 0:
            return
        slot, n = stream.slot, self.delay_cfg.candidates
        scalars = self.state["dly_scalars"][slot]
        for i in (DELAY, CANDIDATE, BEST):
            if scalars[i] >= 0:
                scalars[i] = min(max(0.0, float(scalars[i]) - chunks), float(n - 1))
        hint = int(self.state["hint"][slot])
        if hint >= 0:
            self.state["hint"][slot] = min(max(0, hint - chunks), n - 1)
        for key in ("dly_corr", "dly_far_var"):  # per candidate delay d: the one that was d + chunks
            row = self.state[key][slot]
            moved = torch.zeros_like(row)
            if 0 < chunks < n:
                moved[: n - chunks] = row[chunks:]
            elif -n < chunks < 0:
                moved[-chunks:] = row[: n + chunks]
            row.copy_(moved)
        # the filter delay the next chunk will compute from the moved estimate (as in process)
        delay, hint = int(scalars[DELAY]), int(self.state["hint"][slot])
        bulk = delay if delay >= 0 else max(hint, 0)
        new_fd = max(0, bulk - self.margin)
        old_fd = int(self.state["filter_delay"][slot])
        rest = chunks - (old_fd - new_fd)  # what the taps must move by: out[p] = w[p + rest]
        rows = slice(slot, slot + 1)
        index = torch.tensor([slot], dtype=torch.long, device=self.device)
        if rest:
            by = torch.tensor([rest], dtype=torch.long, device=self.device)
            for key in ("mdf_w", "mdf_wf"):
                self.state[key][rows] = shift_partitions(self.state[key][rows], by)
        fd = torch.tensor([new_fd], dtype=torch.long, device=self.device)
        self.state["filter_delay"][slot] = new_fd
        count = self.state["count"][rows]
        self.state["mdf_x"][rows] = self._far_spectra(self.state["mdf_x"][rows], index, count, fd)

    def set_delay_hint(self, stream: StageStream, delay_ms: float | None) -> None:
        """Set (or clear, with ``None``) the stream's expected echo delay; used until the estimator locks."""
        chunks = (
            -1
            if delay_ms is None
            else max(0, min(round(float(delay_ms) / 10.0), self.delay_cfg.max_delay_chunks))
        )
        stream.options["delay_hint_ms"] = delay_ms
        self.state["hint"][stream.slot] = chunks

    def estimated_delay_ms(self, stream: StageStream) -> float | None:
        """The bulk delay the estimator has locked on for ``stream`` (None before it locks)."""
        chunks = float(self.state["dly_scalars"][stream.slot, DELAY])
        return None if chunks < 0 else chunks * 10.0

    # -- processing -----------------------------------------------------------
    def _rows(self, streams: Sequence[StageStream]) -> tuple[slice | torch.Tensor, torch.Tensor]:
        slots = [s.slot for s in streams]
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        if slots == list(range(slots[0], slots[0] + len(slots))):
            return slice(slots[0], slots[0] + len(slots)), index
        return index, index

    def _ring_chunks(self, index: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        """Far-end chunks number ``chunk`` ([B] or [B, K]) of the rows' rings."""
        pos = torch.remainder(chunk, self.ring_chunks)
        rows = index if pos.dim() == 1 else index[:, None]
        return self.state["far_ring"][rows, pos]

    def _far_window(self, index: torch.Tensor, end_chunk: torch.Tensor) -> torch.Tensor:
        """``[B, 2*CHUNK]`` far-end samples of chunks ``end_chunk - 1`` and ``end_chunk``."""
        return torch.cat(
            [self._ring_chunks(index, end_chunk - 1), self._ring_chunks(index, end_chunk)], dim=-1
        )

    def _far_at_lag(self, index: torch.Tensor, count: torch.Tensor, lag: torch.Tensor) -> torch.Tensor:
        """The far-end window aligned with the mic window ``[count-1, count]`` delayed by ``lag`` samples."""
        start = (count - 1) * CHUNK - lag
        sample = start[:, None] + self._lanes[None, :]
        chunk = torch.remainder(torch.div(sample, CHUNK, rounding_mode="floor"), self.ring_chunks)
        flat = chunk * CHUNK + torch.remainder(sample, CHUNK)
        ring = self.state["far_ring"].view(self.state["far_ring"].shape[0], -1)
        return ring[index[:, None], flat]

    def process(self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext) -> torch.Tensor:
        if self.kernels and self.device.type == "cpu":
            return process_cpu(self, audio, streams, ctx)
        return self.process_torch(audio, streams, ctx)

    def process_torch(
        self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext
    ) -> torch.Tensor:
        """:meth:`process` in torch ops (any device; the reference of the CPU path)."""
        rows, index = self._rows(streams)
        # With consecutive slots ``st`` holds views: in-place updates land in
        # the pool and only replaced entries are written back.
        st = {k: v[rows] for k, v in self.state.items() if k != "far_ring"}
        originals = dict(st) if isinstance(rows, slice) else {}
        mic = audio.to(self.device, torch.float32) * SCALE
        if ctx.reference is None:
            far = torch.zeros_like(mic)
        else:
            far = ctx.reference.to(self.device, torch.float32) * SCALE
        count = st["count"]
        self.state["far_ring"][index, torch.remainder(count, self.ring_chunks)] = far

        # Bulk delay: estimator (or the hint until it locks) minus the pre-delay margin.
        sup = self.suppressor
        mic_window = torch.cat([st["mic_prev"], mic], dim=-1)
        far_spec, mic_spec, mic_rect = sup.spectra(
            [self._far_window(index, count), mic_window], [mic_window]
        ).unbind(1)
        estimate = self.delay.update(st, power(far_spec), power(mic_spec), count).long()
        bulk = torch.where(estimate >= 0, estimate, st["hint"].clamp_min(0))
        filter_delay = (bulk - self.margin).clamp_min(0)
        changed = filter_delay != st["filter_delay"]
        if bool(changed.any()):
            self._realign(st, index, count, filter_delay, changed)
        st["filter_delay"] = filter_delay

        # Linear echo cancellation on the delay-compensated reference.
        x_window = self._far_window(index, count - filter_delay)
        x_new = torch.fft.rfft(x_window, norm="forward")[:, : self.mdf.bins]
        lin = mdf_step(st, x_new, x_window[:, CHUNK:], mic, count, self.mdf)

        # Residual echo suppression, with the far end aligned to the filter's main peak.
        lag = self._echo_lag(st, filter_delay, bulk, lin.adapted)
        err_window = torch.cat([st["err_prev"], lin.error], dim=-1)
        echo_window = torch.cat([st["echo_prev"], lin.echo], dim=-1)
        far_aligned = self._far_at_lag(index, count, lag)
        xw, ew, yw, err_rect = sup.spectra([far_aligned, err_window, echo_window], [err_window]).unbind(1)
        gain, diverged = sup.gains(st, xw, mic_spec, ew, yw)
        noise = sup.track_noise(st, mic_spec)
        base = torch.where(diverged[:, None], mic_rect, err_rect)
        out = sup.apply(st, gain, base, sup.comfort_noise_spectrum(noise, gain, count))

        st["mic_prev"], st["err_prev"], st["echo_prev"] = mic, lin.error, lin.echo
        st["count"] = count + 1
        for key, value in st.items():
            if value is not originals.get(key):
                self.state[key][rows] = value
        ctx.side["aec_delay_ms"] = bulk.float() * 10.0
        return (out / SCALE).to(audio.dtype)

    def _realign(
        self,
        st: dict[str, torch.Tensor],
        index: torch.Tensor,
        count: torch.Tensor,
        filter_delay: torch.Tensor,
        changed: torch.Tensor,
    ) -> None:
        """Shift the filters by the delay change and refill the far spectra from the ring."""
        shift = torch.where(changed, filter_delay - st["filter_delay"], 0)
        st["mdf_w"] = shift_partitions(st["mdf_w"], shift)
        st["mdf_wf"] = shift_partitions(st["mdf_wf"], shift)
        ring = self._far_spectra(st["mdf_x"], index, count, filter_delay)
        st["mdf_x"] = torch.where(changed[:, None, None], ring, st["mdf_x"])

    def _far_spectra(
        self, mdf_x: torch.Tensor, index: torch.Tensor, count: torch.Tensor, filter_delay: torch.Tensor
    ) -> torch.Tensor:
        """A copy of the rows' far-spectrum rings rebuilt from the far-end ring for ``filter_delay``."""
        k = self.mdf.partitions
        parts = torch.arange(k, device=self.device)
        # Before this block's update, lag j+1 (ring slot count-1-j) holds the
        # window ending at chunk count-1-delay-j.
        ends = count[:, None] - 1 - filter_delay[:, None] - parts[None, :]
        windows = torch.cat([self._ring_chunks(index, ends - 1), self._ring_chunks(index, ends)], dim=-1)
        rebuilt = torch.fft.rfft(windows, norm="forward")[..., : self.mdf.bins]
        slots = ring_order(count - 1, k)
        rows = torch.arange(count.shape[0], device=self.device)[:, None]
        ring = mdf_x.clone()
        ring[rows, slots] = rebuilt
        return ring

    def _echo_lag(
        self,
        st: dict[str, torch.Tensor],
        filter_delay: torch.Tensor,
        bulk: torch.Tensor,
        adapted: torch.Tensor,
    ) -> torch.Tensor:
        """Echo delay in samples: the foreground filter's main tap once adapted, else the bulk delay."""
        peak_part = st["mdf_prop"].argmax(dim=1)
        wf = st["mdf_wf"]
        part = torch.gather(wf, 1, peak_part[:, None, None].expand(-1, 1, wf.shape[2]))[:, 0]
        taps = torch.fft.irfft(part, n=self.mdf.n_fft)[:, :CHUNK]
        tap = taps.abs().argmax(dim=1)
        fine = (filter_delay + peak_part) * CHUNK + tap
        return torch.where(adapted, fine, bulk * CHUNK)
