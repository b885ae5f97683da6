"""DeepFilterNet3 stepped in fused kernels on the CPU: one frame per stream per call, batched over streams.

Computes what :meth:`enhancers.denoise.df3.DeepFilterNet3Stage.step` computes for
one frame (``tests/test_denoise_df3.py`` runs the two side by side) with the
same weights, read from the stage's :class:`~enhancers.denoise.df3_net.DF3Network`:
the GRUs' GEMMs run in FBGEMM int8 where the network was built with it (on the same
prepacked weights), else torch; the frequency convolutions' GEMMs in numpy's
OpenBLAS (skinny products, K of 64-128 and 3-192 columns: 12 % less than torch's
at 16 streams, 8x less for the 3-column output layer; single-threaded in the
executor's worker, :func:`enhancers.compute_threads.limit_compute_threads`);
everything between them in the fused kernels of :mod:`enhancers.denoise.df3_kernels`.  About 30
GEMM calls and 25 kernel calls a frame instead of ~450 torch ops: at one
stream 0.4 ms against torch's 1.6 (and libDF's 1.0).

The state is the stage's own (``DeepFilterNet3Stage.state``, one row per stream
slot), updated in place through numpy views of its rows.  The GRUs' int8 GEMMs
quantize each row as the torch path does; a recurrent network carries the last-bit
differences of the fused float32 arithmetic through those roundings, so the two
int8 paths agree to about 30 dB (as int8 and float32 do), and the float32 paths to
about 100 dB.
"""

from __future__ import annotations

import numpy as np
import torch

from enhancers.denoise import df3_kernels as k
from enhancers.denoise.df3_dsp import DF3SignalProcessing
from enhancers.denoise.df3_net import DF3Network, FreqConv, GroupedLinear, StackedGru
from enhancers.denoise.int8 import Matmul


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)


class _Projection:
    """``x @ W + b`` of one GRU input: int8 (a ``Matmul`` prepacked for FBGEMM) or float32 (``weight_t``)."""

    def __init__(self, weight_t: torch.Tensor | None, bias: torch.Tensor, matmul: Matmul | None) -> None:
        self.matmul = matmul
        self.bias = _np(bias)
        if matmul is None:
            assert weight_t is not None
            self.weight = weight_t.contiguous()
            self.zero = np.zeros_like(self.bias)
        else:
            if matmul.packed is None:
                raise ValueError("int8 GRU weights without FBGEMM: run the torch path")
            self.sentinel = _np(matmul.sentinel)[0]

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(product, row factors, bias) for :func:`df3_kernels.gru_gates`."""
        m = x.shape[0]
        if self.matmul is None:
            return torch.addmm(torch.from_numpy(self.bias), torch.from_numpy(x), self.weight).numpy(), \
                np.ones(m, np.float32), self.zero
        unit = np.empty((m + 1, x.shape[1]), np.float32)
        unit[m] = self.sentinel
        row = np.empty(m, np.float32)
        k.unit_rows(x, unit, row)
        out = torch.ops.quantized.linear_dynamic(torch.from_numpy(unit), self.matmul.packed, False)
        return out.numpy(), row, self.bias


class _Gru:
    """One :class:`StackedGru`'s layers as projections."""

    def __init__(self, gru: StackedGru) -> None:
        self.layers: list[tuple[_Projection, _Projection]] = []
        for i in range(gru.num_layers):
            if gru.int8:
                ih, hh = getattr(gru, f"ih{i}"), getattr(gru, f"hh{i}")
                self.layers.append((_Projection(None, ih.bias, ih), _Projection(None, hh.bias, hh)))
            else:
                self.layers.append((
                    _Projection(getattr(gru, f"w_ih{i}").t(), getattr(gru, f"b_ih{i}"), None),
                    _Projection(getattr(gru, f"w_hh{i}").t(), getattr(gru, f"b_hh{i}"), None),
                ))

    def step(self, x: np.ndarray, hiddens: list[np.ndarray]) -> np.ndarray:
        """Runs the layers on ``x``, each hidden [B, H] replaced in place; returns the last."""
        for (ih, hh), h in zip(self.layers, hiddens, strict=True):
            gi, gi_row, b_ih = ih(x)
            gh, gh_row, b_hh = hh(h)
            k.gru_gates(gi, gi_row, b_ih, gh, gh_row, b_hh, h)
            x = h
        return x


def _float_weight(mm: Matmul) -> np.ndarray:
    """A GEMM operand in float32 (the convolutions' are: under ``MIN_INT8_WEIGHTS``; else dequantized)."""
    return _np(mm.weight.float() * mm.scale if mm.int8 else mm.weight)


def _conv_weight(conv: FreqConv) -> tuple[np.ndarray, np.ndarray]:
    return _float_weight(conv.mm), _np(conv.bias)


def _grouped(layer: GroupedLinear) -> np.ndarray:
    return _np(layer.weight)


class DF3Fused:
    """DF3's weights laid out for :mod:`df3_kernels` and the per-frame step over state rows."""

    def __init__(self, net: DF3Network, dsp: DF3SignalProcessing) -> None:
        enc, erb, df = net.encoder, net.erb_decoder, net.df_decoder
        self.window = _np(dsp.analysis_window)
        self.synthesis_window = _np(dsp.synthesis_window)
        self.widths = np.asarray(dsp.erb_widths, dtype=np.int64)
        self.band_of_bin = dsp.band_of_bin.cpu().numpy().astype(np.int64)
        self.alpha = np.float32(dsp.alpha)
        self.fft_size, self.hop = dsp.fft_size, dsp.hop
        self.order = df.order
        self.channels = erb.channels
        self.erb0_w, self.erb0_b = _float_weight(enc.erb0.mm), _np(enc.erb0.bias)  # narrow: float32
        self.df0_w, self.df0_b = _float_weight(enc.df0.mm), _np(enc.df0.bias)
        self.erb1, self.erb2, self.erb3, self.df1 = (_conv_weight(c) for c in (enc.erb1, enc.erb2, enc.erb3, enc.df1))
        self.df_fc_emb = _grouped(enc.df_fc_emb)
        self.enc_in, self.enc_out = _grouped(enc.emb_gru.linear_in), _grouped(enc.emb_gru.linear_out)  # type: ignore[arg-type]
        self.enc_gru = _Gru(enc.emb_gru.gru)
        self.erb_in, self.erb_out = _grouped(erb.emb_gru.linear_in), _grouped(erb.emb_gru.linear_out)  # type: ignore[arg-type]
        self.erb_gru = _Gru(erb.emb_gru.gru)
        self.skips = [(_np(getattr(erb, f"{p}_s")), _np(getattr(erb, f"{p}_b"))) for p in ("p3", "p2", "p1", "p0")]
        self.t3 = _conv_weight(erb.t3)
        self.t2, self.t1 = (_float_weight(erb.t2_k), _np(erb.t2_b)), (_float_weight(erb.t1_k), _np(erb.t1_b))
        self.out = _conv_weight(erb.out)
        self.df_in = _grouped(df.df_gru.linear_in)
        self.df_gru = _Gru(df.df_gru.gru)
        self.df_skip, self.df_out = _grouped(df.df_skip), _grouped(df.df_out)
        self.convp_w = _float_weight(df.convp_k)
        self.convp_b = _np(df.convp_b)
        self.nb_df = int(dsp.config.nb_df)
        self.n_erb = int(dsp.config.nb_erb)
        self._none = np.empty((0, 0), np.float32)

    @staticmethod
    def _mm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return np.matmul(x, w)

    def step(self, audio: np.ndarray, st: dict[str, np.ndarray]) -> np.ndarray:
        """One frame: ``audio`` [B, hop] float32; ``st`` the stage's state rows as numpy views, updated in
        place (complex histories as complex64).  Returns the output [B, hop] (float32)."""
        b, hop = audio.shape
        e_n, nb_df, ch = self.n_erb, self.nb_df, self.channels
        frames = np.empty((b, 2 * hop), np.float32)
        k.analysis_frames(audio, st["analysis_mem"], self.window, frames)
        spec = torch.fft.rfft(torch.from_numpy(frames), dim=1).numpy()
        erb_cols = np.empty((b * e_n, 9), np.float32)
        df_cols = np.empty((b * nb_df, 18), np.float32)
        k.features(spec, self.widths, self.alpha, st["erb_norm"], st["cplx_norm"], st["erb_hist"],
                   st["cplx_hist"], erb_cols, df_cols)

        # encoder
        e0 = np.matmul(erb_cols, self.erb0_w).reshape(b, e_n, ch)
        e0 += self.erb0_b
        k.relu_(e0)
        e1 = np.empty((b, e_n // 2, ch), np.float32)
        k.pairs_out(self._mm(e0.reshape(b * e_n // 2, 2 * ch), self.erb1[0]), self.erb1[1], b, e1)
        e2 = np.empty((b, e_n // 4, ch), np.float32)
        k.pairs_out(self._mm(e1.reshape(b * e_n // 4, 2 * ch), self.erb2[0]), self.erb2[1], b, e2)
        e3 = np.empty_like(e2)
        k.shift_out(self._mm(e2.reshape(b * e_n // 4, ch), self.erb3[0]), self.erb3[1], b, e3, 1)
        c0 = np.matmul(df_cols, self.df0_w).reshape(b, nb_df, ch)
        c0 += self.df0_b
        k.relu_(c0)
        c1 = np.empty((b, nb_df // 2, ch), np.float32)
        k.pairs_out(self._mm(c0.reshape(b * nb_df // 2, 2 * ch), self.df1[0]), self.df1[1], b, c1)
        emb_in = np.empty((b, e3.shape[1] * ch), np.float32)
        k.grouped(c1.reshape(b, -1), self.df_fc_emb, emb_in, 1, e3.reshape(b, -1))
        z = np.empty((b, self.enc_in.shape[0] * self.enc_in.shape[2]), np.float32)
        k.grouped(emb_in, self.enc_in, z, 1, self._none)
        y = self.enc_gru.step(z, [st["enc_h0"]])
        emb = np.empty((b, self.enc_out.shape[0] * self.enc_out.shape[2]), np.float32)
        k.grouped(y, self.enc_out, emb, 1, self._none)

        # ERB decoder: band gains
        z = np.empty((b, self.erb_in.shape[0] * self.erb_in.shape[2]), np.float32)
        k.grouped(emb, self.erb_in, z, 1, self._none)
        y = self.erb_gru.step(z, [st["erb_h0"], st["erb_h1"]])
        d = np.empty((b, self.erb_out.shape[0] * self.erb_out.shape[2]), np.float32)
        k.grouped(y, self.erb_out, d, 1, self._none)
        d3 = d.reshape(b, -1, ch)
        k.skip_add(e3, self.skips[0][0], self.skips[0][1], d3)
        y3 = np.empty_like(d3)
        k.shift_out(self._mm(d3.reshape(-1, ch), self.t3[0]), self.t3[1], b, y3, 1)
        k.skip_add(e2, self.skips[1][0], self.skips[1][1], y3)
        y2 = np.empty((b, 2 * y3.shape[1], ch), np.float32)
        k.upsample_out(self._mm(y3.reshape(-1, ch), self.t2[0]), self.t2[1], b, y2)
        k.skip_add(e1, self.skips[2][0], self.skips[2][1], y2)
        y1 = np.empty((b, 2 * y2.shape[1], ch), np.float32)
        k.upsample_out(self._mm(y2.reshape(-1, ch), self.t1[0]), self.t1[1], b, y1)
        k.skip_add(e0, self.skips[3][0], self.skips[3][1], y1)
        gains = np.empty((b, e_n, 1), np.float32)
        k.shift_out(self._mm(y1.reshape(-1, ch), self.out[0]), self.out[1], b, gains, 2)

        # deep-filter decoder: coefficients for the low band
        z = np.empty((b, self.df_in.shape[0] * self.df_in.shape[2]), np.float32)
        k.grouped(emb, self.df_in, z, 1, self._none)
        y_df = self.df_gru.step(z, [st["df_h0"], st["df_h1"]])
        path = np.empty((b, nb_df, 2 * self.order), np.float32)
        k.pathway(self._mm(c0.reshape(b * nb_df, ch), self.convp_w), st["df_pending"], self.convp_b, b, path)
        y = np.empty_like(y_df)
        k.grouped(emb, self.df_skip, y, 0, y_df)
        df_raw = np.empty((b, self.df_out.shape[0] * self.df_out.shape[2]), np.float32)
        k.grouped(y, self.df_out, df_raw, 0, self._none)

        # enhance the frame `lookahead` back, inverse STFT, overlap-add
        enhanced = np.empty_like(spec)
        k.enhance(spec, st["spec_hist"], st["spec_low_hist"], gains.reshape(b, e_n), self.band_of_bin, df_raw,
                  path, st["atten_mix"], enhanced)
        out_frames = torch.fft.irfft(torch.from_numpy(enhanced), n=self.fft_size, dim=1).numpy()
        out = np.empty((b, hop), np.float32)
        k.overlap_add(out_frames, self.synthesis_window, st["synthesis_mem"], out)
        return out


def fused_available(net: DF3Network) -> bool:
    """True when every int8 GRU of ``net`` has FBGEMM's prepacked weights (or the network is float32)."""
    grus = (net.encoder.emb_gru.gru, net.erb_decoder.emb_gru.gru, net.df_decoder.df_gru.gru)
    return all(not gru.int8 or all(getattr(gru, f"{p}{i}").packed is not None
                                   for i in range(gru.num_layers) for p in ("ih", "hh")) for gru in grus)

