"""The denoisers' int8 GEMMs: close to float32, and a row's result independent of its batch."""

from __future__ import annotations

import pytest
import torch

from enhancers.denoise.int8 import MIN_INT8_WEIGHTS, Matmul, resolve_precision

pytestmark = pytest.mark.skipif(
    resolve_precision("auto", torch.device("cpu")) != "int8", reason="no VNNI on this CPU: float32 only"
)


@pytest.mark.parametrize("packed", [True, False])  # prepacked FBGEMM, and the _int_mm fallback
def test_int8_matmul_is_close_to_float_and_batch_independent(packed: bool) -> None:
    k, n = 256, 768
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(k, n, generator=gen) / k**0.5
    bias = torch.randn(n, generator=gen)
    exact, fast = Matmul(weight, bias, "fp32"), Matmul(weight, bias, "int8")
    assert fast.int8 and fast.packed is not None
    if not packed:
        fast.packed = None
    # rows of very different levels, one all-zero row, one non-negative (post-ReLU) row
    x = torch.randn(6, k, generator=gen) * torch.tensor([1e-4, 1.0, 30.0, 0.0, 1.0, 3.0])[:, None]
    x[4] = x[4].abs()
    ref, out = exact(x), fast(x)
    err = (out - ref).norm(dim=1) / (ref - bias).norm(dim=1).clamp_min(1e-12)
    assert float(err[[0, 1, 2, 4, 5]].max()) < 0.02  # 8-bit activations and weights: about -40 dB
    torch.testing.assert_close(out[3], bias)  # a zero row gives the bias exactly
    for i in range(6):  # each row alone gives the same result as in the batch
        torch.testing.assert_close(fast(x[i : i + 1])[0], out[i], rtol=1e-6, atol=1e-6)


def test_small_weights_stay_float() -> None:
    weight = torch.randn(64, 48)
    assert weight.numel() < MIN_INT8_WEIGHTS
    assert not Matmul(weight, None, "int8").int8


def test_precision_names() -> None:
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError):
        resolve_precision("int4", torch.device("cpu"))
