"""Products of int8 activations with grouped ternary weights (one residual edge at a time).

One edge of a layer with O outputs and fan-in K is a ternary tensor ``t`` [O, G, N] (int8, values
in {-1, 0, +1}; group g of output o covers the fan-in positions ``g*N .. g*N+N-1`` in the order of
the weight flattened to [O, K]: for a convolution (C, kh, kw); the last group is padded when N
does not divide K, and what the padding holds is ignored) and integer scales ``alpha`` [O, G]
(int16 storage, ``|alpha| <= 127``).
The weight it stands for is ``w[o, i] = alpha[o, g(i)] * t[o, i]``, so its product with an int8
input ``x`` is, per output and sample,

    y[o] = sum_g alpha[o, g] * S[o, g],    S[o, g] = sum_{i in g, t=+1} x_i - sum_{i in g, t=-1} x_i

Two ways to compute it, the same integers (both are the exact sum):

* ``adds``: the group sums ``S`` by gathering the inputs at the +1 and at the -1 positions and
  adding them (additions and subtractions only, no multiplication), then one multiplication by
  ``alpha`` per group and output. ``|S| <= 127 * N``; ``|alpha * S| <= 127 * 127 * N``.
* ``dense``: one int8 product with the effective weight ``alpha * t`` (|v| <= 127: an ordinary int8
  weight) through a kernel backend (``linear_forward`` / ``conv2d_forward``), which may use int8
  matrix units (AMX) that have no ternary counterpart.

Either way ``|y| <= 127 * 127 * K``, held in int32 for K <= 131,071 (the backends' bound): the
result is int32, exact, and bit-identical across products and backends. No float tensor is
made (the float-free audits cover this module).
"""

from __future__ import annotations

import torch

from intrain.kernels.im2col import im2col

#: How a ternary product is computed (see the module docstring).
TERNARY_PRODUCTS = ("adds", "dense")

#: The adds product gathers [rows, O, K] int32 inputs; it walks the rows in chunks of about this
#: many gathered elements (64 MiB) so that a large convolution does not need it all at once.
_GATHER_ELEMS = 2**24


def check_edge(t: torch.Tensor, alpha: torch.Tensor, fan_in: int) -> None:
    """Refuse operands that break the contract above (shapes, dtypes, value ranges)."""
    if t.dim() != 3 or t.dtype != torch.int8:
        raise ValueError(f"ternary weights must be int8 [O, G, N], got {t.dtype} {tuple(t.shape)}")
    if alpha.shape != t.shape[:2] or alpha.dtype != torch.int16:
        raise ValueError(f"alpha must be int16 {tuple(t.shape[:2])}, got {alpha.dtype} {tuple(alpha.shape)}")
    if t.shape[1] * t.shape[2] < fan_in or (t.shape[1] - 1) * t.shape[2] >= fan_in:
        raise ValueError(f"{t.shape[1]} groups of {t.shape[2]} do not cover a fan-in of {fan_in}")
    if alpha.numel() and int(alpha.abs().max()) > 127:
        raise ValueError("alpha must lie in [-127, 127]")


def effective_weight(t: torch.Tensor, alpha: torch.Tensor, fan_in: int) -> torch.Tensor:
    """``alpha * t`` as an int8 weight [O, K] (the group padding cut off)."""
    w = alpha.to(torch.int8)[:, :, None] * t
    return w.reshape(t.shape[0], -1)[:, :fan_in]


def _sign_index(t: torch.Tensor, fan_in: int, sign: int) -> torch.Tensor:
    """[O, G, N] int64: the fan-in index of each position of ``t`` equal to ``sign``, else
    ``fan_in`` (the index of an appended zero input); the padding of the last group is ignored,
    as ``effective_weight`` ignores it."""
    o, g, n = t.shape
    index = torch.arange(g * n, device=t.device, dtype=torch.int64).reshape(1, g, n).expand(o, g, n)
    return torch.where((t == sign) & (index < fan_in), index, torch.full_like(index, fan_in))


def group_sums(patches: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``S`` [M, O, G] int32 for input rows ``patches`` [M, K] (int8) by additions only."""
    m, k = patches.shape
    o, g, n = t.shape
    plus, minus = _sign_index(t, k, 1).reshape(-1), _sign_index(t, k, -1).reshape(-1)
    wide = torch.cat([patches.to(torch.int32), patches.new_zeros((m, 1), dtype=torch.int32)], dim=1)
    step = max(1, _GATHER_ELEMS // max(1, o * g * n))
    out = torch.empty((m, o, g), dtype=torch.int32, device=patches.device)
    for r in range(0, m, step):
        rows = wide[r:r + step]
        gathered_plus = rows[:, plus].reshape(-1, o, g, n).sum(dim=3, dtype=torch.int32)
        gathered_minus = rows[:, minus].reshape(-1, o, g, n).sum(dim=3, dtype=torch.int32)
        out[r:r + step] = gathered_plus - gathered_minus
    return out


def _adds_rows(patches: torch.Tensor, t: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """[M, O] int32: ``sum_g alpha * S`` (one multiplication per group and output)."""
    return (group_sums(patches, t) * alpha.to(torch.int32)).sum(dim=2, dtype=torch.int32)


def ternary_linear(x: torch.Tensor, t: torch.Tensor, alpha: torch.Tensor, backend, product: str) -> torch.Tensor:
    """``x @ (alpha * t).T``: x [B, K] int8 -> [B, O] int32, exact (see the module docstring)."""
    k = x.shape[1]
    check_edge(t, alpha, k)
    if product == "dense":
        return backend.linear_forward(x, effective_weight(t, alpha, k))
    if product == "adds":
        return _adds_rows(x, t, alpha)
    raise ValueError(f"unknown ternary product {product!r}; choose one of {', '.join(TERNARY_PRODUCTS)}")


def ternary_conv2d(x: torch.Tensor, t: torch.Tensor, alpha: torch.Tensor, kernel_hw: tuple[int, int],
                   stride: tuple[int, int], padding: tuple[int, int], backend, product: str) -> torch.Tensor:
    """``conv2d(x, alpha * t)``: x [B, C, H, W] int8 -> [B, O, Ho, Wo] int32, exact."""
    kh, kw = kernel_hw
    k = x.shape[1] * kh * kw
    check_edge(t, alpha, k)
    if product == "dense":
        w = effective_weight(t, alpha, k).reshape(t.shape[0], x.shape[1], kh, kw)
        return backend.conv2d_forward(x, w, stride, padding)
    if product == "adds":
        patches = im2col(x, kernel_hw, stride, padding)  # [B, Ho, Wo, C, kh, kw]
        b, ho, wo = patches.shape[:3]
        rows = _adds_rows(patches.reshape(-1, k), t, alpha)
        return rows.reshape(b, ho, wo, -1).permute(0, 3, 1, 2)
    raise ValueError(f"unknown ternary product {product!r}; choose one of {', '.join(TERNARY_PRODUCTS)}")
