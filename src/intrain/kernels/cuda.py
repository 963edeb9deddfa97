"""The cuda kernel backend: int8 x int8 products with int32 accumulation (``torch._int_mm``).

On a CUDA device ``torch._int_mm`` runs on the int8 tensor cores (cuBLASLt); convolutions are
im2col (an int8 copy) followed by one such product per chunk of the batch, and the input gradient
scatters the int32 product back with the integer :func:`~intrain.kernels.im2col.col2im`. No float
tensor is involved, so exactness needs no bound on the data, only on the reduction length.

The same code runs on any device (on CPU ``torch._int_mm`` runs at about 3 GOPS on an AMD Zen 3,
and at 0.3-3.2 TOPS on CPUs with AMX-INT8, where the cpu backend uses it too), which is how its
bit-exactness against ``reference`` is tested on machines without a GPU. ``_int_mm``'s
shape rules on CUDA (more than 16 rows, a reduction length and a column count divisible by 8)
are met by zero padding, which adds nothing to any sum; every call pads, on every device, so
the padding is tested too.

Integer ranges guaranteed (same as every backend): forward / backward-input results are int32
for int8 operands (|sum| <= 2**14 * K < 2**31, checked statically for K <= 131,071, so the int32
accumulator never wraps; the input gradient's col2im adds the kh*kw terms of one reduction of
length O*kh*kw, under the same bound); weight gradients (reduction N*Ho*Wo or N) are cut into
pieces of at most ``INT32_REDUCTION`` terms, each exact in int32, added in int64, and returned in
int32 when the whole reduction is at most 131,071 terms (same bound), else in int64.
Operands that are not both int8 (int16) go to the ``reference`` backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from intrain.kernels import FUNCTIONS
from intrain.kernels import reference as _ref
from intrain.kernels.im2col import (IntPair, conv_backward_input_by, conv_backward_weight_by,
                                    conv_forward_by, weight_grad_dtype)

__all__ = list(FUNCTIONS)

name = "cuda"

#: Longest reduction whose int32 sum of int8 products cannot wrap (128 * 128 * K < 2**31),
#: rounded down to a multiple of 8 so that pieces need no padding of their own.
INT32_REDUCTION = 131064
#: Rows below this are padded (CUDA ``_int_mm`` wants more than 16; a multiple of 8 is kept).
MIN_ROWS = 32
#: Bytes of im2col columns (int8, or int32 for the input gradient) built at once by a convolution.
CHUNK_BYTES = 2**28


def _round_up(v: int, multiple: int) -> int:
    return -(-v // multiple) * multiple


def _both_int8(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype == torch.int8


def _mm_int32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b`` for int8 a [M, K], b [K, N] with K <= INT32_REDUCTION, as int32 [M, N]."""
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros((m, n), dtype=torch.int32, device=a.device)
    mp, kp, np_ = max(MIN_ROWS, _round_up(m, 8)), _round_up(k, 8), _round_up(n, 8)
    a = F.pad(a, (0, kp - k, 0, mp - m)) if (mp, kp) != (m, k) else a
    b = F.pad(b, (0, np_ - n, 0, kp - k)) if (kp, np_) != (k, n) else b
    return torch._int_mm(a.contiguous(), b.contiguous())[:m, :n]


def _mm_int64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b`` for int8 a [M, K], b [K, N] and any K, as int64: int32 pieces of the
    reduction, each of at most INT32_REDUCTION terms, added in int64."""
    k = a.shape[1]
    total = None
    for k0 in range(0, max(k, 1), INT32_REDUCTION):
        part = _mm_int32(a[:, k0:k0 + INT32_REDUCTION], b[k0:k0 + INT32_REDUCTION]).to(torch.int64)
        total = part if total is None else total.add_(part)
    return total


def _samples_per_chunk(rows_per_sample: int, bytes_per_row: int) -> int:
    """Samples per chunk so that one chunk's column matrix stays below CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // max(1, rows_per_sample * bytes_per_row))


# ----------------------------------------------------------------------------------- linear

def linear_forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T``: x [N, I], w [O, I] -> [N, O] (int32 for int8 operands, else int64)."""
    _ref.narrow_result_dtype(x, w, _ref.linear_geometry(x, w, "x", "w", 1, 1, "I"))
    if not _both_int8(x, w):
        return _ref.linear_forward(x, w)
    return _mm_int32(x, w.t())


def linear_backward_input(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``d @ w``: d [N, O], w [O, I] -> [N, I] (int32 for int8 operands, else int64)."""
    _ref.narrow_result_dtype(d, w, _ref.linear_geometry(d, w, "d", "w", 1, 0, "O"))
    if not _both_int8(d, w):
        return _ref.linear_backward_input(d, w)
    return _mm_int32(d, w)


def linear_backward_weight(d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``d.T @ x``: d [N, O], x [N, I] -> [O, I] (int32 for int8 operands and N <= 131,071,
    else int64)."""
    k = _ref.linear_geometry(d, x, "d", "x", 0, 0, "N")
    dtype = weight_grad_dtype(d, x, k)
    if not _both_int8(d, x):
        return _ref.linear_backward_weight(d, x)
    return _mm_int64(d.t(), x).to(dtype)


# ----------------------------------------------------------------------------------- conv2d

def conv2d_forward(x: torch.Tensor, w: torch.Tensor, stride: IntPair = 1,
                   padding: IntPair = 0) -> torch.Tensor:
    """``conv2d(x, w, stride, padding)``: x [N, C, H, W], w [O, C, kh, kw] -> [N, O, Ho, Wo]
    (int32 for int8 operands, else int64)."""
    s, p, (n, c, _, _), (o, _, kh, kw), (ho, wo), _ = _ref.conv_forward_geometry(x, w, stride, padding)
    if not _both_int8(x, w) or n == 0:
        return _ref.conv2d_forward(x, w, s, p)
    step = _samples_per_chunk(ho * wo, c * kh * kw)
    return conv_forward_by(_mm_int32, x, w, s, p, (ho, wo), step).contiguous()


def conv2d_backward_input(d: torch.Tensor, w: torch.Tensor, input_hw: IntPair,
                          stride: IntPair = 1, padding: IntPair = 0) -> torch.Tensor:
    """Gradient of conv2d with respect to its input: d [N, O, Ho, Wo], w [O, C, kh, kw] ->
    [N, C, H, W] (int32 for int8 operands, else int64)."""
    s, p, (n, o, ho, wo), (_, c, kh, kw), hw, _ = _ref.conv_backward_input_geometry(
        d, w, input_hw, stride, padding)
    if not _both_int8(d, w) or n == 0:
        return _ref.conv2d_backward_input(d, w, hw, s, p)
    k = c * kh * kw
    step = _samples_per_chunk(ho * wo, 4 * k)  # the int32 columns are the largest tensor
    return conv_backward_input_by(_mm_int32, d, w.reshape(o, k), (kh, kw), hw, s, p, step).contiguous()


def conv2d_backward_weight(d: torch.Tensor, x: torch.Tensor, kernel_hw: IntPair,
                           stride: IntPair = 1, padding: IntPair = 0) -> torch.Tensor:
    """Gradient of conv2d with respect to its weight: d [N, O, Ho, Wo], x [N, C, H, W] ->
    [O, C, kh, kw], int32 for a reduction N*Ho*Wo of at most 131,071 terms, else int64 (the
    reduction is cut into int32-exact pieces added in int64)."""
    s, p, (n, o, ho, wo), (_, c, _, _), (kh, kw) = _ref.conv_backward_weight_geometry(
        d, x, kernel_hw, stride, padding)
    if not _both_int8(d, x) or n == 0:
        return _ref.conv2d_backward_weight(d, x, (kh, kw), s, p)
    step = _samples_per_chunk(ho * wo, c * kh * kw)
    g = conv_backward_weight_by(_mm_int64, d, x, (kh, kw), s, p, step)
    return g.to(weight_grad_dtype(d, x, n * ho * wo))
