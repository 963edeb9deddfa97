"""Exact int8 matrix products through ``torch._int_mm`` (int8 x int8 -> int32), shared by the cuda
backend and the cpu backend's int8 GEMM path.

``_int_mm``'s shape rules on CUDA (more than 16 rows, a reduction length divisible by 8, a column
count divisible by 16, a row-major first and a column-major second operand) are met by zero
padding, which adds nothing to any sum, written in those layouts. The cpu backend passes ``pad=False``: on CPU ``_int_mm`` (oneDNN) takes any shape and row- or
column-major operands (``_gemm_operand``), and the padded, contiguous copies cost more than the
product on small layers (an MLP layer 784 -> 100 at batch 64, 1 thread of the Xeon of
BENCHMARKS.md with other jobs running: 79 us for the product of the transposed weight as it is,
325 us with its contiguous copy, 368 us padded; ``python benchmarks/native_speed.py`` times whole
steps). The cuda backend pads on every device, so the tests run the padding on CPU tensors too.
Integer ranges: an int32 sum of at most ``INT32_REDUCTION`` products of int8 operands (each of
magnitude <= 2**14) cannot wrap; longer reductions are cut into such pieces, added in int64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Longest reduction whose int32 sum of int8 products cannot wrap (128 * 128 * K < 2**31),
#: rounded down to a multiple of 8 so that pieces need no padding of their own.
INT32_REDUCTION = 131064
#: Rows below this are padded (CUDA ``_int_mm`` wants more than 16; a multiple of 8 is kept).
MIN_ROWS = 32
#: The padded path's column counts are multiples of this. PyTorch asks for multiples of 8, but on
#: an H200 (PyTorch 2.11.0+cu130) cuBLASLt refused every odd multiple of 8 from 40 on, in the
#: layout above, for 65,536 rows and reductions of 32 to 96 terms (DFP16's halves beside a column of
#: ones: 2 * 128 + 1 columns, padded to 264); multiples of 16 were all taken:
#: ``python benchmarks/int_mm_shapes.py --device cuda`` (BENCHMARKS.md, "cuBLASLt's int8 shapes").
COLUMN_MULTIPLE = 16


def _round_up(v: int, multiple: int) -> int:
    return -(-v // multiple) * multiple


def _gemm_operand(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is a row-major or column-major matrix with both sizes above 1, else a
    row-major copy. oneDNN reads the layout from the strides, and a matrix with a size of 1 can
    carry strides that fit both layouts: ``w.t()`` of a [2, 1] weight is [1, 2] with strides
    (1, 1), for which ``torch._int_mm`` returned garbage (PyTorch 2.13.0 on CPU; found by
    ``test_cpu_linear_matches_reference``). Such operands are vectors, so the copy is small."""
    rows, cols = t.shape
    if rows > 1 and cols > 1 and (t.stride() == (cols, 1) or t.stride() == (1, rows)):
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def mm_int32(a: torch.Tensor, b: torch.Tensor, pad: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """Exact ``a @ b`` for int8 a [M, K], b [K, N] with K <= INT32_REDUCTION, as int32 [M, N]
    (``pad``: to CUDA's shape rules, see above), written into the contiguous int32 ``out`` when
    given (without padding only)."""
    m, k = a.shape
    n = b.shape[1]
    if out is not None and (pad or out.shape != (m, n) or out.dtype != torch.int32 or not out.is_contiguous()):
        raise ValueError(f"mm_int32 writes an unpadded product into a contiguous int32 [{m}, {n}] tensor")
    if m == 0 or n == 0 or k == 0:
        return torch.zeros((m, n), dtype=torch.int32, device=a.device) if out is None else out.zero_()
    if not pad:
        return torch._int_mm(_gemm_operand(a), _gemm_operand(b), out=out)
    mp, kp, np_ = max(MIN_ROWS, _round_up(m, 8)), _round_up(k, 8), _round_up(n, COLUMN_MULTIPLE)
    a = F.pad(a, (0, kp - k, 0, mp - m)) if (mp, kp) != (m, k) else a.contiguous()
    # b is padded as b.t(), so the one copy is already column-major: cuBLASLt's int8 products take
    # a row-major a with a column-major b (its "TN" layout); with both row-major, as a contiguous
    # im2col gives them, it answered CUBLAS_STATUS_NOT_SUPPORTED for most layer shapes (LeNet-5's,
    # VGG-small-7's, ResNet-18's: H200, PyTorch 2.11.0+cu130, BENCHMARKS.md).
    bt = F.pad(b.t(), (0, kp - k, 0, np_ - n)) if (kp, np_) != (k, n) else b.t().contiguous()
    return torch._int_mm(a, bt.t())[:m, :n]


def mm_int64(a: torch.Tensor, b: torch.Tensor, piece: int = INT32_REDUCTION, pad: bool = True) -> torch.Tensor:
    """Exact ``a @ b`` for int8 a [M, K], b [K, N] and any K, as int64: int32 pieces of the
    reduction, each of at most ``piece`` <= INT32_REDUCTION terms, added in int64."""
    k = a.shape[1]
    total = None
    for k0 in range(0, max(k, 1), piece):
        part = mm_int32(a[:, k0:k0 + piece], b[k0:k0 + piece], pad).to(torch.int64)
        total = part if total is None else total.add_(part)
    return total
