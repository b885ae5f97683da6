"""DeepFilterNet3's three networks as streaming steps in torch.

The official export (``enc.onnx``, ``erb_dec.onnx``, ``df_dec.onnx``) runs
whole sequences; libDF pulses it one frame at a time.  Here each network's
``forward`` takes one frame of ``B`` streams plus their recurrent state (GRU
hiddens, the frames kept for causal time convolutions) and returns the new
state: the caller owns the state, so any set of streams steps together.
For many frames at once the frame-local parts (``convs``, ``decode``,
``pathway_taps``, ``coefs``) take any number of rows and the GRUs step
through the frames (``SqueezedGru.sequence``).

Weights come from the ONNX graphs, found by the nodes that use them.  For
speed on small per-frame tensors everything runs channels-last (``[B, F,
C]``) as GEMMs: each frequency convolution is one matmul (:class:`FreqConv`),
depthwise + pointwise pairs (no nonlinearity between them) are fused into
one dense kernel, and the deep-filter pathway's causal time convolution
keeps running partial sums (transposed FIR form) instead of past frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from enhancers.denoise.df3_assets import DF3Assets
from enhancers.denoise.int8 import Matmul
from enhancers.denoise.onnx_weights import GruWeights, OnnxWeights


def fuse_separable(depthwise: torch.Tensor, pointwise: torch.Tensor) -> torch.Tensor:
    """Depthwise [C,1,1,k] then pointwise [O,C,1,1] as one dense conv1d weight [O,C,k]."""
    return pointwise[:, :, 0, 0, None] * depthwise[None, :, 0, 0, :]


class FreqConv(torch.nn.Module):
    """Size-3 convolution along frequency (padding 1, stride 1 or 2) on channels-last [B, F, C].

    Picks the cheapest GEMM form for the shape: narrow inputs unfold into
    [B*F, 3C] columns; wide stride-1 inputs multiply once by all three taps and
    add the shifted results; stride-2 inputs view (even, odd) bin pairs as one
    row and multiply by a [2C, 2O] kernel.  None of the latter two copies its input.
    With ``precision="int8"`` the GEMM of the latter two is int8 (:mod:`.int8`); the
    narrow ones (K = 3C <= 24) stay float32.
    """

    bias: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, precision: str = "fp32") -> None:
        super().__init__()
        out_ch, in_ch, k = weight.shape
        assert k == 3 and stride in (1, 2)
        self.stride = stride
        if in_ch <= 8:
            self.mode = "unfold"
            kernel = weight.permute(1, 2, 0).reshape(in_ch * 3, out_ch)
        elif stride == 1:
            self.mode = "shift"
            kernel = torch.cat([weight[:, :, t].t() for t in range(3)], dim=1)  # [C, 3*O]
        else:
            self.mode = "pairs"
            # row i = (x[2i], x[2i+1]); out[i] = W1 x[2i] + W2 x[2i+1] + W0 x[2i-1]
            kernel = torch.zeros(2 * in_ch, 2 * out_ch)
            kernel[:in_ch, :out_ch] = weight[:, :, 1].t()
            kernel[in_ch:, :out_ch] = weight[:, :, 2].t()
            kernel[in_ch:, out_ch:] = weight[:, :, 0].t()  # x[2i+1] feeds out[i+1] through W0
        self.register_buffer("bias", bias if bias is not None else torch.zeros(out_ch), persistent=False)
        if self.mode == "unfold":
            self.mm = Matmul(kernel, self.bias, "fp32")
        else:
            self.mm = Matmul(kernel, None, precision)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f, c = x.shape
        if self.mode == "unfold":
            windows = F.pad(x, (0, 0, 1, 1)).unfold(1, 3, self.stride)  # [B, F_out, C, 3]
            f_out = windows.shape[1]
            return self.mm(windows.reshape(b * f_out, -1)).view(b, f_out, -1)
        if self.mode == "shift":
            z = self.mm(x.reshape(b * f, c)).view(b, f, 3, -1)
            y = z[:, :, 1] + self.bias
            y[:, 1:] += z[:, :-1, 0]
            y[:, :-1] += z[:, 1:, 2]
            return y
        z = self.mm(x.reshape(b * f // 2, 2 * c)).view(b, f // 2, 2, -1)
        y = z[:, :, 0] + self.bias
        y[:, 1:] += z[:, :-1, 1]
        return y


class GroupedLinear(torch.nn.Module):
    """DeepFilterNet's grouped linear layer (einsum ``btgi,gih->btgh``) on [B, G*I]."""

    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.groups, self.in_size, self.out_size = (int(d) for d in weight.shape)
        self.register_buffer("weight", weight.contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        y = torch.bmm(x.view(b, self.groups, self.in_size).transpose(0, 1), self.weight)
        return y.transpose(0, 1).reshape(b, self.groups * self.out_size)


class StackedGru(torch.nn.Module):
    """A stack of GRU layers stepped one frame at a time; one hidden [B, H] per layer.

    float32: ``torch.gru_cell``; int8: the two GEMMs of each cell in int8 (:mod:`.int8`),
    the gates in float32 (PyTorch's gate order r, z, n).
    """

    def __init__(self, layers: list[GruWeights], precision: str = "fp32") -> None:
        super().__init__()
        self.num_layers = len(layers)
        self.hidden_size = layers[0].hidden_size
        self.int8 = precision == "int8"
        for i, layer in enumerate(layers):
            if self.int8:
                self.add_module(f"ih{i}", Matmul(layer.w_ih.t(), layer.b_ih, precision))
                self.add_module(f"hh{i}", Matmul(layer.w_hh.t(), layer.b_hh, precision))
                continue
            for name in ("w_ih", "w_hh", "b_ih", "b_hh"):
                self.register_buffer(f"{name}{i}", getattr(layer, name).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor, hidden: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        new = []
        for i in range(self.num_layers):
            if self.int8:
                x = self._cell(getattr(self, f"ih{i}")(x), getattr(self, f"hh{i}")(hidden[i]), hidden[i])
            else:
                x = torch.gru_cell(
                    x,
                    hidden[i],
                    getattr(self, f"w_ih{i}"),
                    getattr(self, f"w_hh{i}"),
                    getattr(self, f"b_ih{i}"),
                    getattr(self, f"b_hh{i}"),
                )
            new.append(x)
        return x, new

    def _cell(self, gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """GRU gates from the input and hidden projections (biases included): the new hidden."""
        hs = self.hidden_size
        rz = torch.sigmoid_(gi[:, : 2 * hs].add_(gh[:, : 2 * hs]))
        n = torch.tanh_(torch.addcmul(gi[:, 2 * hs :], rz[:, :hs], gh[:, 2 * hs :]))
        return torch.lerp(n, h, rz[:, hs:])


class SqueezedGru(torch.nn.Module):
    """DF3's SqueezedGRU_S: grouped linear in + ReLU, GRU stack, optional grouped linear out + ReLU."""

    def __init__(
        self, onnx: OnnxWeights, linear_in: str, grus: list[str], linear_out: str | None, precision: str = "fp32"
    ) -> None:
        """``linear_in``/``linear_out``: outputs of the Einsum nodes; ``grus``: outputs of the GRU nodes."""
        super().__init__()
        self.linear_in = GroupedLinear(onnx.input_tensor(linear_in, "Einsum", 1))
        self.gru = StackedGru([onnx.gru(name) for name in grus], precision)
        self.linear_out = GroupedLinear(onnx.input_tensor(linear_out, "Einsum", 1)) if linear_out else None

    def forward(self, x: torch.Tensor, hidden: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        y, hidden = self.gru(torch.relu_(self.linear_in(x)), hidden)
        if self.linear_out is not None:
            y = torch.relu_(self.linear_out(y))
        return y, hidden

    def sequence(
        self, x: torch.Tensor, hidden: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """All frames of ``x`` [B, T, I] (the linear layers batched over time)."""
        b, t, _ = x.shape
        z = torch.relu_(self.linear_in(x.reshape(b * t, -1))).view(b, t, -1)
        steps = []
        for i in range(t):
            y_i, hidden = self.gru(z[:, i], hidden)
            steps.append(y_i)
        y = torch.stack(steps, dim=1)
        if self.linear_out is not None:
            y = torch.relu_(self.linear_out(y.reshape(b * t, -1))).view(b, t, -1)
        return y, hidden


class DF3Encoder(torch.nn.Module):
    """Encoder: ERB and complex-spectrum conv paths, embedding GRU, local SNR head.

    State: the two previous ERB feature frames [B, E, 2] and complex feature
    frames [B, nb_df, 2 (re/im), 2 (frames)], oldest first; the GRU hidden [B, H].
    """

    lsnr_w: torch.Tensor
    lsnr_b: torch.Tensor

    def __init__(self, onnx: OnnxWeights, lsnr_min: float, lsnr_max: float, precision: str = "fp32") -> None:
        super().__init__()
        w, b = onnx.conv("/erb_conv0/1/Conv_output_0")  # [64, 1, 3 time, 3 freq]: time taps as channels
        self.erb0 = FreqConv(w[:, 0], b, 1)
        separable = {}
        for name, dw, pw, stride in (
            ("erb1", "/erb_conv1/0/Conv_output_0", "/erb_conv1/1/Conv_output_0", 2),
            ("erb2", "/erb_conv2/Conv_output_0", "/erb_conv2/Conv_1_output_0", 2),
            ("erb3", "/erb_conv3/0/Conv_output_0", "/erb_conv3/1/Conv_output_0", 1),
            ("df1", "/df_conv1/Conv_output_0", "/df_conv1/Conv_1_output_0", 2),
        ):
            w_pw, b_pw = onnx.conv(pw)
            separable[name] = FreqConv(fuse_separable(onnx.conv(dw)[0], w_pw), b_pw, stride, precision)
        self.erb1, self.erb2, self.erb3, self.df1 = (separable[n] for n in ("erb1", "erb2", "erb3", "df1"))
        # complex input: grouped 3x3 conv (re -> first 32 ch, im -> last 32), then pointwise; fused
        w_g, _ = onnx.conv("/df_conv0/1/Conv_output_0")  # [64, 1, 3, 3]
        w_pw, b_pw = onnx.conv("/df_conv0/2/Conv_output_0")  # [64, 64, 1, 1]
        half = w_g.shape[0] // 2
        dense = torch.zeros(w_g.shape[0], 2, 3, 3)  # [O1, re/im, time, freq]
        dense[:half, 0] = w_g[:half, 0]
        dense[half:, 1] = w_g[half:, 0]
        fused = torch.einsum("po,octk->pctk", w_pw[:, :, 0, 0], dense).reshape(w_pw.shape[0], 6, 3)
        self.df0 = FreqConv(fused, b_pw, 1, precision)
        self.df_fc_emb = GroupedLinear(onnx.input_tensor("/df_fc_emb/0/Einsum_output_0", "Einsum", 1))
        self.emb_gru = SqueezedGru(
            onnx,
            "/emb_gru/linear_in/0/Einsum_output_0",
            ["/emb_gru/GRU_output_0"],
            "/emb_gru/linear_out/0/Einsum_output_0",
            precision,
        )
        lsnr_node = onnx.node("/lsnr_fc/0/Add_output_0", "Add")
        self.register_buffer(
            "lsnr_w", onnx.input_tensor("/lsnr_fc/0/MatMul_output_0", "MatMul", 1), persistent=False
        )
        self.register_buffer("lsnr_b", onnx.tensor(lsnr_node.input[0]), persistent=False)
        self.lsnr_scale = lsnr_max - lsnr_min
        self.lsnr_offset = lsnr_min

    def forward(
        self,
        feat_erb: torch.Tensor,
        feat_spec: torch.Tensor,
        erb_hist: torch.Tensor,
        spec_hist: torch.Tensor,
        hidden: list[torch.Tensor],
    ) -> tuple[
        list[torch.Tensor],
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        list[torch.Tensor],
    ]:
        """One frame: ``feat_erb`` [B, E], ``feat_spec`` [B, nb_df, 2] (re, im).

        Returns ([e0, e1, e2, e3], emb, c0, lsnr, new erb_hist, new spec_hist, new hidden).
        """
        erb_win = torch.cat([erb_hist, feat_erb[:, :, None]], dim=2)  # [B, E, 3 frames]
        spec_win = torch.cat([spec_hist, feat_spec[:, :, :, None]], dim=3)  # [B, F, re/im, 3 frames]
        skips, c0, emb_in = self.convs(erb_win, spec_win)
        emb, hidden = self.emb_gru(emb_in, hidden)
        return skips, emb, c0, self.lsnr(emb), erb_win[:, :, 1:], spec_win[:, :, :, 1:], hidden

    def convs(
        self, erb_win: torch.Tensor, spec_win: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """The frame-local part: windows of 3 frames [N, E, 3] and [N, F, 2, 3] to
        (skips [e0..e3], c0 [N, F, C], GRU input [N, emb])."""
        n = erb_win.shape[0]
        e0 = torch.relu_(self.erb0(erb_win))  # [N, 32, 64]
        e1 = torch.relu_(self.erb1(e0))  # [N, 16, 64]
        e2 = torch.relu_(self.erb2(e1))  # [N, 8, 64]
        e3 = torch.relu_(self.erb3(e2))  # [N, 8, 64]
        c0 = torch.relu_(self.df0(spec_win.reshape(n, spec_win.shape[1], 6)))  # [N, 96, 64]
        c1 = torch.relu_(self.df1(c0))  # [N, 48, 64]
        emb_in = torch.relu_(self.df_fc_emb(c1.reshape(n, -1))).add_(e3.reshape(n, -1))
        return [e0, e1, e2, e3], c0, emb_in

    def lsnr(self, emb: torch.Tensor) -> torch.Tensor:
        """Local SNR estimate in dB from the embedding [N, emb] -> [N]."""
        return torch.sigmoid(emb @ self.lsnr_w + self.lsnr_b)[..., 0] * self.lsnr_scale + self.lsnr_offset


class DF3ErbDecoder(torch.nn.Module):
    """ERB decoder: GRU on the embedding, U-Net style upsampling to band gains.  State: two GRU hiddens."""

    p3_s: torch.Tensor
    p3_b: torch.Tensor
    p2_s: torch.Tensor
    p2_b: torch.Tensor
    p1_s: torch.Tensor
    p1_b: torch.Tensor
    p0_s: torch.Tensor
    p0_b: torch.Tensor
    t2_b: torch.Tensor
    t1_b: torch.Tensor

    def __init__(self, onnx: OnnxWeights, precision: str = "fp32") -> None:
        super().__init__()
        self.emb_gru = SqueezedGru(
            onnx,
            "/emb_gru/linear_in/Einsum_output_0",
            ["/emb_gru/GRU_output_0", "/emb_gru/GRU_1_output_0"],
            "/emb_gru/linear_out/Einsum_output_0",
            precision,
        )
        for name, out in (
            ("p3", "/conv3p/0/Conv_output_0"),
            ("p2", "/conv2p/Conv_output_0"),
            ("p1", "/conv1p/Conv_output_0"),
            ("p0", "/conv0p/Conv_output_0"),
        ):
            w, b = onnx.conv(out)  # depthwise 1x1: a per-channel scale and offset
            self.register_buffer(f"{name}_s", w[:, 0, 0, 0].contiguous(), persistent=False)
            self.register_buffer(f"{name}_b", b, persistent=False)
        w_pw, b_pw = onnx.conv("/convt3/Conv_1_output_0")
        self.t3 = FreqConv(fuse_separable(onnx.conv("/convt3/Conv_output_0")[0], w_pw), b_pw, 1, precision)
        upsample: dict[str, Matmul] = {}
        for name, convt, pw in (
            ("t2", "/convt2/0/ConvTranspose_output_0", "/convt2/1/Conv_output_0"),
            ("t1", "/convt1/ConvTranspose_output_0", "/convt1/Conv_output_0"),
        ):
            w_t, _ = onnx.conv(convt, transposed=True)  # [C, 1, 1, 3] depthwise, stride 2
            w_pw, b_pw = onnx.conv(pw)
            # per tap k: x @ (diag(w_t[:, k]) @ pw^T); taps stacked along the output: [C, 3*O]
            taps = [w_t[:, 0, 0, k, None] * w_pw[:, :, 0, 0].t() for k in range(3)]
            upsample[name] = Matmul(torch.cat(taps, dim=1), None, precision)
            self.register_buffer(f"{name}_b", b_pw, persistent=False)
        self.t2_k, self.t1_k = upsample["t2"], upsample["t1"]
        w, b = onnx.conv("/conv0_out/0/Conv_output_0")  # [1, 64, 1, 3]
        self.out = FreqConv(w[:, :, 0, :], b, 1)
        self.channels = int(self.p3_s.shape[0])

    @staticmethod
    def _upsample(x: torch.Tensor, kernel: Matmul, bias: torch.Tensor) -> torch.Tensor:
        """Depthwise transposed conv (k 3, stride 2, pad 1, output pad 1) + pointwise, fused: [B,F,C]->[B,2F,O]."""
        b, f, c = x.shape
        z = kernel(x.reshape(b * f, c)).view(b, f, 3, -1)  # per-tap contributions
        even = z[:, :, 1]
        odd = z[:, :, 2] + F.pad(z[:, 1:, 0], (0, 0, 0, 1))
        return torch.stack([even, odd], dim=2).view(b, 2 * f, -1) + bias

    def forward(
        self, emb: torch.Tensor, skips: list[torch.Tensor], hidden: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Band gains [B, E] in [0, 1] and the new GRU hidden."""
        y, hidden = self.emb_gru(emb, hidden)
        return self.decode(y, skips), hidden

    def decode(self, y: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """The frame-local part: GRU output [N, emb] and encoder skips to gains [N, E]."""
        e0, e1, e2, e3 = skips
        y = y.reshape(y.shape[0], -1, self.channels)  # [N, 8, 64]
        y = torch.relu_(torch.addcmul(self.p3_b, e3, self.p3_s)).add_(y)
        y = torch.relu_(self.t3(y))
        y = torch.relu_(torch.addcmul(self.p2_b, e2, self.p2_s)).add_(y)
        y = torch.relu_(self._upsample(y, self.t2_k, self.t2_b))  # [B, 16, 64]
        y = torch.relu_(torch.addcmul(self.p1_b, e1, self.p1_s)).add_(y)
        y = torch.relu_(self._upsample(y, self.t1_k, self.t1_b))  # [B, 32, 64]
        y = torch.relu_(torch.addcmul(self.p0_b, e0, self.p0_s)).add_(y)
        return torch.sigmoid_(self.out(y))[:, :, 0]


class DF3DfDecoder(torch.nn.Module):
    """Deep-filter decoder: complex filter coefficients [B, nb_df, order, 2] for the low band.

    State: two GRU hiddens [B, H], and the causal pathway convolution's partial sums for
    the next ``order - 1`` frames [B, nb_df, order - 1, 2 * order].
    """

    convp_b: torch.Tensor

    def __init__(self, onnx: OnnxWeights, df_order: int, precision: str = "fp32") -> None:
        super().__init__()
        self.order = df_order
        self.df_gru = SqueezedGru(
            onnx,
            "/df_gru/linear_in/linear_in.0/Einsum_output_0",
            ["/df_gru/gru/GRU_output_0", "/df_gru/gru/GRU_1_output_0"],
            None,
            precision,
        )
        self.df_skip = GroupedLinear(onnx.input_tensor("/df_skip/Einsum_output_0", "Einsum", 1))
        self.df_out = GroupedLinear(onnx.input_tensor("/df_out/df_out.0/Einsum_output_0", "Einsum", 1))
        # pathway: grouped (order x 1) time conv over c0, then pointwise, fused to [O, taps, C]
        w_g, _ = onnx.conv("/df_convp/df_convp.1/Conv_output_0")  # [2*order, C/2, order, 1]
        w_pw, b_pw = onnx.conv("/df_convp/df_convp.2/Conv_output_0")  # [2*order, 2*order, 1, 1]
        n_out, c_half, taps, _ = w_g.shape
        per_group = n_out // 2
        dense = torch.zeros(n_out, taps, 2 * c_half)
        for g in range(2):
            rows = slice(g * per_group, (g + 1) * per_group)
            dense[rows, :, g * c_half : (g + 1) * c_half] = w_g[rows, :, :, 0].transpose(1, 2)
        fused = torch.einsum("po,otc->ptc", w_pw[:, :, 0, 0], dense)  # [O, taps (oldest first), C]
        # GEMM operand [C, taps * O], newest tap first: column block j feeds the output j frames ahead
        kernel = fused.flip(1).permute(2, 1, 0).reshape(2 * c_half, taps * n_out)
        self.convp_k = Matmul(kernel, None, precision)
        self.register_buffer("convp_b", b_pw, persistent=False)
        self.n_out = n_out

    def forward(
        self, emb: torch.Tensor, c0: torch.Tensor, hidden: list[torch.Tensor], pending: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Returns (coefs [B, nb_df, order, 2], new hidden, new pending sums)."""
        y, hidden = self.df_gru(emb, hidden)
        contrib = self.pathway_taps(c0)
        path = torch.relu_(pending[:, :, 0] + contrib[:, :, 0] + self.convp_b)  # [B, nb_df, 2*order]
        pending = torch.cat([pending[:, :, 1:] + contrib[:, :, 1:-1], contrib[:, :, -1:]], dim=2)
        return self.coefs(y, emb, path), hidden, pending

    def pathway_taps(self, c0: torch.Tensor) -> torch.Tensor:
        """Each c0 frame's contribution [N, nb_df, order, 2*order] to the pathway output
        0..order-1 frames later (before bias and ReLU)."""
        n, nb_df, _ = c0.shape
        return self.convp_k(c0.reshape(n * nb_df, -1)).view(n, nb_df, self.order, self.n_out)

    def coefs(self, y: torch.Tensor, emb: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
        """GRU output [N, H], embedding and pathway output [N, nb_df, 2*order] to coefs [N, nb_df, order, 2]."""
        n, nb_df, _ = path.shape
        y = self.df_skip(emb).add_(y)
        return torch.tanh_(self.df_out(y)).view(n, nb_df, -1).add_(path).view(n, nb_df, self.order, 2)


class DF3Network(torch.nn.Module):
    """The three DF3 networks built from the export in ``assets``."""

    def __init__(self, assets: DF3Assets, precision: str = "fp32") -> None:
        super().__init__()
        cfg = assets.config
        self.precision = precision
        self.encoder = DF3Encoder(assets.enc, cfg.lsnr_min, cfg.lsnr_max, precision)
        self.erb_decoder = DF3ErbDecoder(assets.erb_dec, precision)
        self.df_decoder = DF3DfDecoder(assets.df_dec, cfg.df_order, precision)
