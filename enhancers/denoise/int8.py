"""Int8 matrix products for the denoisers' GEMMs on the CPU, row by row independent.

A stage's weight matrix ``W`` ``[K, N]`` is quantized once to int8 with one
scale per output column; every call quantizes the activations ``x`` ``[M, K]``
with one scale per *row* (symmetric, 127 levels), multiplies in int32
(``torch._int_mm``: oneDNN's VNNI kernels, 4-5x the float32 GEMM's
throughput at 16-64 rows on one core) and scales back.  Per-row scales keep
each stream's output independent of the other streams in the batch (a
per-tensor dynamic scale, as ``torch.ao`` dynamic quantization uses, would let
a loud stream coarsen a quiet one's arithmetic), and the integer product is
exact, so a row's result is the same whatever batch it is in.

Int8 runs only where the CPU has VNNI (``avx512_vnni`` or ``avx_vnni``): without
it, x86 int8 kernels sum pairs of products in 16 bits and can saturate.
:func:`resolve_precision` turns ``"auto"`` into ``"int8"`` there and ``"fp32"``
elsewhere (and on any non-CPU device).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "int8")
QMAX = 127.0


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
    """``[K, N]`` float -> (int8 ``[K, N]``, float scale ``[N]``), symmetric per column."""
    scale = weight.abs().amax(dim=0).clamp_min(1e-12) / QMAX
    q = torch.round(weight / scale).clamp(-QMAX, QMAX).to(torch.int8)
    return q.contiguous(), scale.to(torch.float32).contiguous()


class Matmul(torch.nn.Module):
    """``x @ W (+ bias)`` for ``x`` ``[M, K]``: float32, or int8 with per-row/per-column scales."""

    weight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, precision: str = "fp32") -> None:
        super().__init__()
        self.int8 = precision == "int8"
        if self.int8:
            q, scale = quantize_columns(weight.detach().float())
            self.register_buffer("weight", q, persistent=False)
            self.register_buffer("scale", scale, persistent=False)
        else:
            self.register_buffer("weight", weight.detach().contiguous(), persistent=False)
            self.register_buffer("scale", torch.ones(()), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous(), persistent=False)

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.int8:
            if self.bias is None:
                return x @ self.weight
            return torch.addmm(self.bias, x, self.weight)
        return int8_matmul(x, self.weight, self.scale, self.bias)


def int8_matmul(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x`` ``[M, K]`` float times int8 ``weight`` ``[K, N]`` with column ``scale``: float ``[M, N]``."""
    row = x.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30)  # (linalg.vector_norm inf: 10x slower)
    q = torch.round(x * (QMAX / row)).to(torch.int8)
    out = torch._int_mm(q, weight).to(torch.float32)
    out.mul_(row * (1.0 / QMAX))
    if bias is None:
        return out.mul_(scale)
    return torch.addcmul(bias, out, scale)
