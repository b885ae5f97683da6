"""Potter's square-root RLS update for many small complex matrices, in real arithmetic.

A complex ``K x K`` matrix per (stream, bin) is stored as real tensors of
shape ``[N, 2, K, K, F]``: plane 0 the real part, plane 1 the imaginary part,
the bin axis innermost.  Every op below then runs over long contiguous runs
of bins with the stream, plane and tap axes outside, which vectorises on a
CPU; complex ``bmm`` on 10x10 matrices and complex broadcasting ops measured
1.5-2x slower per stream at 16 streams and more.  Vectors (``w``, ``z``) are
``[N, 2, K, F]``.

With ``P = S S^H`` (the inverse weighted correlation of the prediction window)
one RLS step for window ``w`` and scaled power ``c`` is

    z = S^H w,   P w = S z,   a = 1 / (c + |z|^2),
    S <- S - gamma (S z) z^H  with  gamma = a / (1 + sqrt(c a)),

which keeps ``P`` positive semi-definite in float32 by construction.
"""

from __future__ import annotations

import functools

import torch

# Streams x bins up to which the matrix-vector products use one broadcast product.
SMALL_BATCH = 256


def conj_transpose_times(root: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``z = S^H w``: ``z_i = sum_j conj(S_ji) w_j``, as planes ``[N, 2, K, F]``."""
    # Re z pairs (Sr, Si) with (wr, wi); Im z pairs them with (wi, -wr).
    return _accumulate(root, _pairs(w, "conj"), row_major=True)


def times(root: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``S z``: ``(Sz)_i = sum_j S_ij z_j``, as planes ``[N, 2, K, F]``."""
    # Re pairs (Sr, Si) with (zr, -zi); Im pairs them with (zi, zr).
    return _accumulate(root, _pairs(z, "plain"), row_major=False)


# Plane order and signs of the products above: pairs[:, out, plane] = sign * x[:, _ORDER[out, plane]].
_ORDER = torch.tensor([[0, 1], [1, 0]])
_CONJ_SIGNS = torch.tensor([[1.0, 1.0], [1.0, -1.0]]).view(1, 2, 2, 1, 1)
_PLAIN_SIGNS = torch.tensor([[1.0, -1.0], [1.0, 1.0]]).view(1, 2, 2, 1, 1)
_TURN_SIGNS = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)


@functools.lru_cache(maxsize=16)
def _on(name: str, device: torch.device) -> torch.Tensor:
    """The constant ``name`` on ``device`` (copied there once)."""
    constants = {"order": _ORDER, "conj": _CONJ_SIGNS, "plain": _PLAIN_SIGNS, "turn": _TURN_SIGNS}
    return constants[name].to(device)


def _pairs(x: torch.Tensor, signs: str) -> torch.Tensor:
    """``[N, 2, K, F]`` -> ``[N, out, plane, K, F]`` (one gather and one multiply)."""
    return x[:, _on("order", x.device)] * _on(signs, x.device)


def turned(x: torch.Tensor) -> torch.Tensor:
    """``-i x`` in planes: ``(xr, xi) -> (xi, -xr)``."""
    return x.flip(1) * _on("turn", x.device)


def _accumulate(root: torch.Tensor, pairs: torch.Tensor, row_major: bool) -> torch.Tensor:
    """``out[n, o, i, f] = sum_{p, j} M[n, p, i, j, f] pairs[n, o, p, j, f]`` with ``M = S^T`` if row_major.

    One in-place multiply-add per tap over ``[N, 2, 2, K, F]``: no temporary
    the size of ``S``.  Small batches (one or a few streams) use one broadcast
    product instead: fewer ops, and the temporary still fits in cache.
    """
    n, _, taps, _, bins = root.shape
    if n * bins <= SMALL_BATCH:
        matrix = root if row_major else root.transpose(2, 3)  # [N, plane, j, i, F]
        return (matrix.unsqueeze(1) * pairs.unsqueeze(4)).sum((2, 3))
    acc = torch.zeros(n, 2, 2, taps, bins, dtype=root.dtype, device=root.device)
    # Views made once (the per-tap slicing would cost as much as the arithmetic).
    parts = root.unsqueeze(1).unbind(3 if row_major else 4)  # each [N, 1, plane, K(i), F]
    weights = pairs.unsqueeze(4).unbind(3)  # each [N, out, plane, 1, F]
    for part, weight in zip(parts, weights):
        acc.addcmul_(part, weight)
    return acc.sum(2)


def rank_one_downdate(root: torch.Tensor, left: torch.Tensor, z: torch.Tensor) -> None:
    """``S <- S - left z^H`` in place (``left``, ``z`` planes ``[N, 2, K, F]``)."""
    # left z^H = (lr zr^T + li zi^T) + i (li zr^T - lr zi^T)
    with_zr = left.unsqueeze(3)  # (lr, li) against zr
    with_zi = turned(left).unsqueeze(3)  # (li, -lr) against zi
    root.addcmul_(with_zr, z[:, 0].unsqueeze(1).unsqueeze(2), value=-1.0)
    root.addcmul_(with_zi, z[:, 1].unsqueeze(1).unsqueeze(2), value=-1.0)


def squared_norm(x: torch.Tensor) -> torch.Tensor:
    """``|z|^2`` of planes ``[N, 2, K, F]`` -> ``[N, F]``."""
    return x.square().sum((1, 2))
