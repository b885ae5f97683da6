"""Int8 matrix products for the denoisers' GEMMs on the CPU, row by row independent.

A stage's weight matrix ``W`` ``[K, N]`` is quantized once to int8 with one
scale per output column; every call quantizes the activations ``x`` ``[M, K]``
with one scale per *row*, multiplies in integers and scales back.  Per-row
scales keep each stream's output independent of the other streams in the
batch (a per-tensor dynamic scale, as ``torch.ao`` dynamic quantization uses,
would let a loud stream coarsen a quiet one's arithmetic), and the integer
product is exact, so a row's result is the same whatever batch it is in.

The product runs in FBGEMM's dynamic linear on weights packed once
(``quantized::linear_dynamic``: quantization, VNNI GEMM and scaling in one
op); its per-tensor activation range is pinned to [-1, 1] by dividing each
row by its largest magnitude and appending a sentinel row, which makes it a
per-row quantization.  Where FBGEMM is missing, ``torch._int_mm`` (oneDNN)
does the product; it re-packs the weight on every call, which costs 5x once
the weights are out of cache.  Only weights of ``MIN_INT8_WEIGHTS`` or more are
quantized (GRU and dense layers); below that float32 is as fast.

Measured on one Zen 4 core: FBGEMM int8 at 16-64 rows is 3-4x the float32
GEMM's throughput with the weights in cache and more with them out of it
(NSNet2's 600-unit GRUs: 127 vs 773 us at 16 rows).

Int8 runs only where the CPU has VNNI (``avx512_vnni`` or ``avx_vnni``): without
it, x86 int8 kernels sum pairs of products in 16 bits and can saturate.
:func:`resolve_precision` turns ``"auto"`` into ``"int8"`` there and ``"fp32"``
elsewhere (and on any non-CPU device).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import torch

PRECISIONS = ("auto", "fp32", "int8")
QMAX = 127.0
# Only weights at least this large are quantized: the GRU and dense layers.  Below it (DF3's
# frequency convolutions: 128 x 128 at most, many rows) the float32 GEMM stays in cache and the
# per-call quantization ops cost as much as the int8 GEMM saves (measured: no gain at B=16, 64).
MIN_INT8_WEIGHTS = 65_536


@functools.lru_cache(maxsize=1)
def cpu_has_vnni() -> bool:
    """True when /proc/cpuinfo lists a VNNI extension (Linux x86; False anywhere else)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_vnni", "avx_vnni"})
    return False


@functools.lru_cache(maxsize=1)
def int8_matmul_works() -> bool:
    """``torch._int_mm`` exists and gives the exact integer product on this build."""
    if not hasattr(torch, "_int_mm"):
        return False
    try:
        a = torch.arange(-24, 24, dtype=torch.int8).view(3, 16)
        b = torch.arange(-40, 40, dtype=torch.int8).view(16, 5)
        return bool(torch.equal(torch._int_mm(a, b), a.int() @ b.int()))
    except RuntimeError:
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> ``"int8"`` on a VNNI CPU with a working ``_int_mm``, else ``"fp32"``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "auto":
        return "int8" if device.type == "cpu" and cpu_has_vnni() and int8_matmul_works() else "fp32"
    if precision == "int8" and (device.type != "cpu" or not int8_matmul_works()):
        raise ValueError("int8 precision needs the CPU and torch._int_mm")
    return precision


def quantize_columns(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[K, N]`` float -> (int8 ``[K, N]``, float ``[N]``), symmetric per column.

    The returned column factor is the scale divided by ``QMAX``, so that it also undoes
    the activations' ``QMAX`` (see :func:`int8_matmul`).
    """
    scale = weight.abs().amax(dim=0).clamp_min(1e-12) / QMAX
    q = torch.round(weight / scale).clamp(-QMAX, QMAX).to(torch.int8)
    return q.contiguous(), (scale / QMAX).to(torch.float32).contiguous()


class Matmul(torch.nn.Module):
    """``x @ W (+ bias)`` for ``x`` ``[M, K]``: float32, or int8 with per-row/per-column scales.

    Int8 (weights of ``MIN_INT8_WEIGHTS`` or more; smaller ones stay float32) runs FBGEMM's
    dynamic linear on prepacked weights (``torch._int_mm`` reorders the weight on every call:
    5x slower once the weights are out of cache), or ``_int_mm`` where FBGEMM is missing.  FBGEMM quantizes activations per tensor, from the tensor's range;
    each row is divided by its largest magnitude first and a sentinel row ``[-1, 1, 0...]``
    is appended, so the range is always [-1, 1]: the same per-row quantization whatever
    the batch.
    """

    weight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None
    sentinel: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, precision: str = "fp32") -> None:
        super().__init__()
        self.int8 = precision == "int8" and weight.numel() >= MIN_INT8_WEIGHTS
        self.packed: Any = None
        weight = weight.detach().float()
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous(), persistent=False)
        sentinel = torch.zeros(1, weight.shape[0])
        sentinel[0, 0], sentinel[0, -1] = -1.0, 1.0
        self.register_buffer("sentinel", sentinel, persistent=False)
        if self.int8:
            q, scale = quantize_columns(weight)
            self.register_buffer("weight", q, persistent=False)
            self.register_buffer("scale", scale, persistent=False)
            self.packed = prepack(q, scale * QMAX)
        else:
            self.register_buffer("weight", weight.contiguous(), persistent=False)
            self.register_buffer("scale", torch.ones(()), persistent=False)

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.int8:
            if self.bias is None:
                return x @ self.weight
            return torch.addmm(self.bias, x, self.weight)
        if self.packed is None:
            return int8_matmul(x, self.weight, self.scale, self.bias)
        row = x.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30)  # (linalg.vector_norm inf: 10x slower)
        unit = torch.cat([x / row, self.sentinel])
        out = torch.ops.quantized.linear_dynamic(unit, self.packed, False)[: x.shape[0]]
        if self.bias is None:
            return out.mul_(row)
        return torch.addcmul(self.bias, out, row)


def prepack(q: torch.Tensor, scale: torch.Tensor) -> Any:
    """FBGEMM's packed form of int8 ``q`` ``[K, N]`` with column scales, or None where unavailable."""
    if not cpu_has_vnni():  # u8 x s8 pairs can saturate in 16 bits without VNNI (reduce_range=False)
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensor constructors are marked deprecated
            w = torch._make_per_channel_quantized_tensor(
                q.t().contiguous(), scale.double(), torch.zeros(q.shape[1], dtype=torch.long), 0
            )
            packed = torch.ops.quantized.linear_prepack(w, None)
            probe = torch.zeros(2, q.shape[0])
            probe[0, 0], probe[1, 0] = -1.0, 1.0
            torch.ops.quantized.linear_dynamic(probe, packed, False)
        return packed
    except (RuntimeError, AttributeError):
        return None


def int8_matmul(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x`` ``[M, K]`` float times int8 ``weight`` ``[K, N]`` with column factors ``scale``
    (:func:`quantize_columns`): float ``[M, N]``.  Ten small ops; each row only sees its own scale."""
    row = x.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30)  # (linalg.vector_norm inf: 10x slower)
    q = (x * (QMAX / row)).round_().to(torch.int8)
    out = torch._int_mm(q, weight) * scale  # int32 * float -> float
    if bias is None:
        return out.mul_(row)
    return torch.addcmul(bias, out, row)
