"""The cuda kernel backend: int8 x int8 products with int32 accumulation (``torch._int_mm``).

On a CUDA device ``torch._int_mm`` runs on the int8 tensor cores (cuBLASLt); convolutions are
im2col (an int8 copy) followed by one such product per chunk of the batch, and the input gradient
scatters the int32 product back with the integer :func:`~intrain.kernels.im2col.col2im`. No float
tensor is involved, so exactness needs no bound on the data, only on the reduction length.

The same code runs on any device (on CPU ``torch._int_mm`` runs at about 3 GOPS on an AMD Zen 3,
and at 0.3-3.2 TOPS on CPUs with AMX-INT8, where the cpu backend uses it too), which is how its
bit-exactness against ``reference`` is tested on machines without a GPU. ``_int_mm``'s
shape rules on CUDA are met by zero padding on every device (:mod:`intrain.kernels.int_mm`), so
the padding is tested too.

Integer ranges guaranteed (same as every backend): forward / backward-input results are int32
for int8 operands (|sum| <= 2**14 * K < 2**31, checked statically for K <= 131,071, so the int32
accumulator never wraps; the input gradient's col2im adds the kh*kw terms of one reduction of
length O*kh*kw, under the same bound); weight gradients (reduction N*Ho*Wo or N) are cut into
pieces of at most ``INT32_REDUCTION`` terms, each exact in int32, added in int64, and returned in
int32 when the whole reduction is at most 131,071 terms (same bound), else in int64.
Products of two int16 operands (DFP16) run on the same int8 products, four per product, of the
operands' int8 halves (``int16_gemm.mm``: exact int32 pieces combined in int64, every int16 value
included), with the same im2col and col2im. Other mixes (int8 with int16) go to the ``reference``
backend, exact by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from intrain.kernels import int16_gemm
from intrain.kernels import reference as _ref
from intrain.kernels.base import Backend
from intrain.kernels.im2col import (IntPair, conv_backward_input_by, conv_backward_weight_by,
                                    conv_forward_by, weight_grad_dtype)
from intrain.kernels.int_mm import INT32_REDUCTION, mm_int32, mm_int64


@dataclass(frozen=True)
class CudaSettings:
    """The cuda backend's tuned constants (frozen: a backend's settings never change)."""

    #: Bytes of im2col columns (int8, or int32 for the input gradient) built at once by a
    #: convolution: larger chunks mean fewer and larger products, and more memory. Not measured
    #: on a GPU yet (none has been lent to this project): a cap on the temporaries.
    chunk_bytes: int = 2**28


def _both_int8(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype == torch.int8


def _both_int16(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype == torch.int16


def _mm_int16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return int16_gemm.mm(a, b, pad=True)


class CudaBackend(Backend):
    """int8 products through ``torch._int_mm`` on any device (see the module docstring).

    ``int32_terms``: the longest piece of a weight-gradient reduction summed in int32, at most
    ``INT32_REDUCTION`` (the longest that cannot wrap); lower it only to test the addition of
    many pieces in int64.
    """

    name = "cuda"

    def __init__(self, settings: CudaSettings | None = None, *,
                 int32_terms: int = INT32_REDUCTION) -> None:
        if settings is not None and not isinstance(settings, CudaSettings):
            raise TypeError(f"the cuda backend takes CudaSettings, not {type(settings).__name__}")
        if not 1 <= int32_terms <= INT32_REDUCTION:
            raise ValueError(f"int32_terms must lie in [1, {INT32_REDUCTION}], got {int32_terms}")
        self.settings = CudaSettings() if settings is None else settings
        self.int32_terms = int32_terms

    def __repr__(self) -> str:
        return f"CudaBackend({self.settings!r}, int32_terms={self.int32_terms})"

    def _samples_per_chunk(self, rows_per_sample: int, bytes_per_row: int) -> int:
        """Samples per chunk so that one chunk's column matrix stays below chunk_bytes."""
        return max(1, self.settings.chunk_bytes // max(1, rows_per_sample * bytes_per_row))

    def _mm_int64(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return mm_int64(a, b, self.int32_terms)

    # ------------------------------------------------------------------------------- linear

    def linear_forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x @ w.T``: x [N, I], w [O, I] -> [N, O] (int32 for int8 operands, else int64)."""
        _ref.narrow_result_dtype(x, w, _ref.linear_geometry(x, w, "x", "w", 1, 1, "I"))
        if _both_int16(x, w):
            return _mm_int16(x, w.t())
        if not _both_int8(x, w):
            return _ref.linear_forward(x, w)
        return mm_int32(x, w.t())

    def linear_backward_input(self, d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``d @ w``: d [N, O], w [O, I] -> [N, I] (int32 for int8 operands, else int64)."""
        _ref.narrow_result_dtype(d, w, _ref.linear_geometry(d, w, "d", "w", 1, 0, "O"))
        if _both_int16(d, w):
            return _mm_int16(d, w)
        if not _both_int8(d, w):
            return _ref.linear_backward_input(d, w)
        return mm_int32(d, w)

    def linear_backward_weight(self, d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``d.T @ x``: d [N, O], x [N, I] -> [O, I] (int32 for int8 operands and N <= 131,071,
        else int64)."""
        k = _ref.linear_geometry(d, x, "d", "x", 0, 0, "N")
        dtype = weight_grad_dtype(d, x, k)
        if _both_int16(d, x):
            return _mm_int16(d.t(), x)
        if not _both_int8(d, x):
            return _ref.linear_backward_weight(d, x)
        return self._mm_int64(d.t(), x).to(dtype)

    # ------------------------------------------------------------------------------- conv2d

    def conv2d_forward(self, x: torch.Tensor, w: torch.Tensor, stride: IntPair = 1,
                       padding: IntPair = 0) -> torch.Tensor:
        """``conv2d(x, w, stride, padding)``: x [N, C, H, W], w [O, C, kh, kw] -> [N, O, Ho, Wo]
        (int32 for int8 operands, else int64)."""
        s, p, (n, c, _, _), (o, _, kh, kw), (ho, wo), _ = _ref.conv_forward_geometry(
            x, w, stride, padding)
        if n == 0 or not (_both_int8(x, w) or _both_int16(x, w)):
            return _ref.conv2d_forward(x, w, s, p)
        step = self._samples_per_chunk(ho * wo, c * kh * kw * x.element_size())
        mm = mm_int32 if _both_int8(x, w) else _mm_int16
        return conv_forward_by(mm, x, w, s, p, (ho, wo), step).contiguous()

    def conv2d_backward_input(self, d: torch.Tensor, w: torch.Tensor, input_hw: IntPair,
                              stride: IntPair = 1, padding: IntPair = 0) -> torch.Tensor:
        """Gradient of conv2d with respect to its input: d [N, O, Ho, Wo], w [O, C, kh, kw] ->
        [N, C, H, W] (int32 for int8 operands, else int64)."""
        s, p, (n, o, ho, wo), (_, c, kh, kw), hw, _ = _ref.conv_backward_input_geometry(
            d, w, input_hw, stride, padding)
        if n == 0 or not (_both_int8(d, w) or _both_int16(d, w)):
            return _ref.conv2d_backward_input(d, w, hw, s, p)
        k = c * kh * kw
        mm, result_bytes = (mm_int32, 4) if _both_int8(d, w) else (_mm_int16, 8)
        step = self._samples_per_chunk(ho * wo, result_bytes * k)  # the product's columns are the largest tensor
        return conv_backward_input_by(mm, d, w.reshape(o, k), (kh, kw), hw, s, p, step).contiguous()

    def conv2d_backward_weight(self, d: torch.Tensor, x: torch.Tensor, kernel_hw: IntPair,
                               stride: IntPair = 1, padding: IntPair = 0) -> torch.Tensor:
        """Gradient of conv2d with respect to its weight: d [N, O, Ho, Wo], x [N, C, H, W] ->
        [O, C, kh, kw], int32 for a reduction N*Ho*Wo of at most 131,071 terms, else int64 (the
        reduction is cut into int32-exact pieces added in int64)."""
        s, p, (n, o, ho, wo), (_, c, _, _), (kh, kw) = _ref.conv_backward_weight_geometry(
            d, x, kernel_hw, stride, padding)
        if n == 0 or not (_both_int8(d, x) or _both_int16(d, x)):
            return _ref.conv2d_backward_weight(d, x, (kh, kw), s, p)
        step = self._samples_per_chunk(ho * wo, c * kh * kw * x.element_size())
        mm = self._mm_int64 if _both_int8(d, x) else _mm_int16
        g = conv_backward_weight_by(mm, d, x, (kh, kw), s, p, step)
        return g.to(weight_grad_dtype(d, x, n * ho * wo))
