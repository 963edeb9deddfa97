"""Exact products of int16 operands on int8 GEMM units: DFP16's products on the cpu backend where
its ``torch._int_mm`` measured at least twice float32 (AMX-INT8 and VNNI CPUs), and on the cuda
backend (the int8 tensor cores; ``mm`` only, with the backend's own im2col).

Each int16 value is split into two int8 halves around an offset of 128:

    v = 256 * hi + lo + 128,   hi = v >> 8 (arithmetic),   lo = (v & 255) - 128,

so ``hi`` lies in ``[-128, 127]`` for every int16 ``v`` and ``lo`` in ``[-128, 127]`` (the low
byte with its top bit flipped, read as a signed byte: ``int8(v) ^ -128``). Without the offset
(``lo`` the signed low byte) the 128 values 32640..32767 would need ``hi = 128``, and DFP16's
weights reach 32767. Write ``a* = a - 128 = 256 a_hi + a_lo`` and ``b*`` likewise; for a product
of K terms

    sum_k a_k b_k = sum_k a*_k b*_k + 128 sum_k a*_k + 128 sum_k b*_k + 16384 K,
    sum_k a*_k b*_k = 65536 (a_hi . b_hi) + 256 (a_hi . b_lo + a_lo . b_hi) + a_lo . b_lo.

The four int8 products have int32 sums, each exact for a reduction of at most
``INT32_REDUCTION`` terms (``|term| <= 2**14``); longer linear reductions are cut into such
pieces. ``sum_k a*_k`` comes from the same products: one column of ones beside the halves of b
(``sum_k a_hi``, ``sum_k a_lo``); ``sum_k b*_k`` is reduced from b directly, or (weight
gradients, where b is the padded im2col columns) from a row of ones beside the halves of a. Zero
padding of a convolution pads the halves with ``split(0) = (0, -128)``, so padded taps count as
``a = 0`` in every sum. Everything is combined in int64: ``|sum a b| <= K * 2**30``, and the
terms and partial totals are of the same order, far below ``2**63`` for every reduction the
kernels accept (``im2col.weight_grad_dtype`` refuses ``K >= 2**33``). ``mm`` takes tensors on any
device, the convolutions CPU tensors; the results are int64, as every backend returns for int16
operands.
"""

from __future__ import annotations

import torch

from intrain.kernels.int8_gemm import ColumnBuffer, channels_last_patches, samples_per_chunk
from intrain.kernels.int_mm import INT32_REDUCTION, mm_int32
from intrain.numeric import native

#: The halves of 0, what zero padding becomes.
ZERO_HI, ZERO_LO = 0, -128


def split_halves(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)``, int8 tensors of ``v``'s shape with ``v = 256 * hi + lo + 128`` for int16
    ``v`` (module docstring). The cast to int8 keeps the low byte (two's complement)."""
    hi = (v >> 8).to(torch.int8)
    lo = v.to(torch.int8).bitwise_xor_(-128)
    return hi, lo


def _combine(out: torch.Tensor, hh: torch.Tensor, cross_1: torch.Tensor, cross_2: torch.Tensor,
             ll: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, accumulate: bool = False) -> None:
    """``out (+)= 65536 hh + 256 (cross_1 + cross_2) + ll + rows + cols`` in int64 (``out`` int64
    [M, N]; the four products int32 views of its shape; ``rows`` [M, 1] and ``cols`` [1, N] int64,
    the offset's terms): one C pass (``native.combine_halves``), or six PyTorch ones."""
    if out.is_contiguous() and native.combine_halves((hh, cross_1, cross_2, ll), rows, cols, out,
                                                     accumulate=accumulate):
        return
    if accumulate:
        out.add_(hh, alpha=65536)
    else:
        out.copy_(hh).mul_(65536)
    out.add_(cross_1, alpha=256).add_(cross_2, alpha=256).add_(ll).add_(rows).add_(cols)


def _offset_terms(sum_a_hi: torch.Tensor, sum_a_lo: torch.Tensor, sum_b: torch.Tensor, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The offset's terms ``(128 sum a* + 16384 K, 128 sum b*)`` as int64, from the per-row sums
    of a's halves and the per-column sums of b (b itself, not b*)."""
    rows = sum_a_hi.to(torch.int64).mul_(256).add_(sum_a_lo).mul_(128).add_(16384 * k)
    cols = (sum_b - 128 * k).mul_(128)
    return rows, cols


def mm(a: torch.Tensor, b: torch.Tensor, pad: bool = False) -> torch.Tensor:
    """Exact ``a @ b`` for int16 a [M, K], b [K, N] (any strides) on any device, as int64 [M, N];
    reductions longer than ``INT32_REDUCTION`` in pieces. ``pad``: the int8 products padded to
    CUDA's shape rules (``int_mm.mm_int32``), which the cuda backend needs."""
    m, k = a.shape
    n = b.shape[1]
    out = torch.empty((m, n), dtype=torch.int64, device=a.device)
    a_hi, a_lo = split_halves(a)
    b_hi, b_lo = split_halves(b)
    for k0 in range(0, max(k, 1), INT32_REDUCTION):
        piece = slice(k0, k0 + INT32_REDUCTION)
        ones = torch.ones((b_hi[piece].shape[0], 1), dtype=torch.int8, device=a.device)
        both = torch.cat([b_hi[piece], b_lo[piece], ones], dim=1)  # [K', 2N + 1]
        high = mm_int32(a_hi[:, piece], both, pad=pad)  # [a_hi b_hi | a_hi b_lo | sum a_hi]
        low = mm_int32(a_lo[:, piece], both, pad=pad)   # [a_lo b_hi | a_lo b_lo | sum a_lo]
        rows, cols = _offset_terms(high[:, 2 * n:], low[:, 2 * n:],
                                   b[piece].sum(0, dtype=torch.int64, keepdim=True), ones.shape[0])
        _combine(out, high[:, :n], high[:, n:2 * n], low[:, :n], low[:, n:2 * n], rows, cols,
                 accumulate=k0 > 0)
    return out


def conv(x: torch.Tensor, w: torch.Tensor, s: tuple[int, int], p: tuple[int, int],
         chunk_bytes: int) -> torch.Tensor:
    """conv2d of int16 x [N, C, H, W] (N >= 1) and w [O, C, kh, kw] with C*kh*kw at most
    ``INT32_REDUCTION``, as exact int64 [N, O, Ho, Wo]: the halves' channels-last im2col columns
    (``int8_gemm``), a chunk of samples at a time, times both halves of the weight and a column
    of ones side by side, combined straight into the NCHW result (one C pass) or through a
    channels-last chunk."""
    o, c, kh, kw = w.shape
    k = c * kh * kw
    x_hi, x_lo = split_halves(x)
    w_rows = w.permute(0, 2, 3, 1).reshape(o, k)  # the columns' (kh, kw, C) order
    w_hi, w_lo = split_halves(w_rows)
    both = torch.cat([w_hi, w_lo, torch.ones((1, k), dtype=torch.int8)]).t()  # [K, 2O + 1]
    sum_w = w_rows.sum(1, dtype=torch.int64).view(1, o)
    patches_hi = channels_last_patches(x_hi, kh, kw, s, p, ZERO_HI)
    patches_lo = channels_last_patches(x_lo, kh, kw, s, p, ZERO_LO)
    n, ho, wo = patches_hi.shape[:3]
    out = torch.empty((n, o, ho, wo), dtype=torch.int64)
    step = samples_per_chunk(2 * ho * wo * k, chunk_bytes)
    columns_hi, columns_lo = ColumnBuffer(patches_hi, step), ColumnBuffer(patches_lo, step)
    for n0 in range(0, n, step):
        high = mm_int32(columns_hi.of(n0), both, pad=False)
        low = mm_int32(columns_lo.of(n0), both, pad=False)
        rows, cols = _offset_terms(high[:, 2 * o:], low[:, 2 * o:], sum_w, k)
        parts = (high[:, :o], high[:, o:2 * o], low[:, :o], low[:, o:2 * o])
        target = out[n0:n0 + step]
        if not native.combine_halves(parts, rows, cols, target, hw=ho * wo):
            chunk = torch.empty((high.shape[0], o), dtype=torch.int64)
            _combine(chunk, *parts, rows, cols)
            target.copy_(chunk.view(-1, ho, wo, o).permute(0, 3, 1, 2))
    return out


def conv_weight_grad(d: torch.Tensor, x: torch.Tensor, khw: tuple[int, int], s: tuple[int, int],
                     p: tuple[int, int], chunk_bytes: int) -> torch.Tensor:
    """Weight gradient of a convolution of int16 operands (N >= 1) as exact int64 [O, C, kh, kw]:
    both halves of d and a row of ones as [2O + 1, rows] times each half of x's channels-last
    columns [rows, kh*kw*C], at most ``INT32_REDUCTION`` rows per product, the pieces added in
    int64."""
    n, o, ho, wo = d.shape
    c = x.shape[1]
    kh, kw = khw
    k = c * kh * kw
    by_position = torch.empty((o, k), dtype=torch.int64)  # [O, kh*kw*C]: the columns' order
    d_hi, d_lo = split_halves(d)
    x_hi, x_lo = split_halves(x)
    patches_hi = channels_last_patches(x_hi, kh, kw, s, p, ZERO_HI)
    patches_lo = channels_last_patches(x_lo, kh, kw, s, p, ZERO_LO)
    step = min(samples_per_chunk(2 * ho * wo * k, chunk_bytes), max(1, INT32_REDUCTION // (ho * wo)))
    columns_hi, columns_lo = ColumnBuffer(patches_hi, step), ColumnBuffer(patches_lo, step)
    for n0 in range(0, n, step):
        errors = d[n0:n0 + step]
        rows_here = errors.shape[0] * ho * wo
        halves = torch.cat([d_hi[n0:n0 + step].transpose(0, 1).reshape(o, -1),
                            d_lo[n0:n0 + step].transpose(0, 1).reshape(o, -1),
                            torch.ones((1, rows_here), dtype=torch.int8)])  # [2O + 1, rows]
        by_hi = mm_int32(halves, columns_hi.of(n0), pad=False)  # [d_hi x_hi ; d_lo x_hi ; sum x_hi]
        by_lo = mm_int32(halves, columns_lo.of(n0), pad=False)  # [d_hi x_lo ; d_lo x_lo ; sum x_lo]
        # Here a = d (rows o) and b = the columns, b*'s sums from the row of ones. The row term
        # 128 sum a* + 16384 K is 128 sum a, and a = d is at hand.
        rows = errors.sum((0, 2, 3), dtype=torch.int64).view(o, 1).mul_(128)
        cols = by_hi[2 * o:].to(torch.int64).mul_(256).add_(by_lo[2 * o:]).mul_(128)
        _combine(by_position, by_hi[:o], by_lo[:o], by_hi[o:2 * o], by_lo[o:2 * o], rows, cols,
                 accumulate=n0 > 0)
    return by_position.view(o, kh, kw, c).permute(0, 3, 1, 2).contiguous()
