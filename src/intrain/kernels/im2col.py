"""Integer-only im2col / col2im and the argument checks shared by the kernel backends.

Everything here works on integer tensors (the reference backend feeds it int64) with pure
indexing, padding and integer additions: no floating-point tensor is ever created, so the code
runs unchanged on CPU and CUDA and passes the float-free audit. ``torch.nn.functional.unfold`` and
``fold`` are not used because they are not implemented for integer dtypes on CPU
(``"im2col_out_cpu" not implemented for 'Long'``); ``Tensor.unfold`` (a strided view) is.

Range guarantee: im2col only copies values; col2im adds at most ``kh*kw`` values per output
element, each of them an exact int64, so it is exact whenever its inputs are bounded by
``2**63 / (kh*kw)`` (the reference backend feeds it sums bounded by ``2**45``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

IntPair = int | Sequence[int]

#: Operand dtypes accepted by every backend, with the largest magnitude each can hold.
OPERAND_MAX = {torch.int8: 128, torch.int16: 32768}
INT32_MAX = 2**31 - 1


def pair(v: IntPair, name: str) -> tuple[int, int]:
    """Normalise an int or an (h, w) pair to a tuple of two Python ints."""
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(a) for a in v)
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return t  # type: ignore[return-value]


def check_operand(t: torch.Tensor, name: str, dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in OPERAND_MAX:
        raise TypeError(f"{name} must be int8 or int16, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")


def check_same_device(*ts: torch.Tensor) -> None:
    devs = {t.device for t in ts}
    if len(devs) != 1:
        raise ValueError(f"operands are on different devices: {sorted(map(str, devs))}")


def narrow_result_dtype(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.dtype:
    """Result dtype of a forward / backward-input product with reduction length ``k``.

    int8 x int8 -> int32. The bound is static (no look at the data): every term is at most
    128*128 = 2**14 in magnitude (127*127 under the |v| <= 127 contract), so
    ``|sum| <= 2**14 * k <= 2**31 - 1`` for every ``k <= 131,071``; a longer reduction raises.
    Any int16 operand -> int64: 32768*32768*k fits int64 for every k < 2**33.
    """
    if a.dtype == torch.int8 and b.dtype == torch.int8:
        if OPERAND_MAX[a.dtype] * OPERAND_MAX[b.dtype] * k > INT32_MAX:
            raise ValueError(
                f"reduction length {k} too long for an int32 result of int8 operands "
                f"(128*128*K must stay below 2**31, i.e. K <= 131071)"
            )
        return torch.int32
    if OPERAND_MAX[a.dtype] * OPERAND_MAX[b.dtype] * k >= 2**63:
        raise ValueError(f"reduction length {k} too long for an int64 result")
    return torch.int64


def weight_grad_dtype(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.dtype:
    """Result dtype of a weight gradient with reduction length ``k`` (the batch, times Ho*Wo for
    a convolution): int32 when both operands are int8 and ``2**14 * k < 2**31`` (k <= 131,071),
    else int64; reductions that could leave int64 (k >= 2**33 for int16 operands) are refused."""
    if OPERAND_MAX[a.dtype] * OPERAND_MAX[b.dtype] * k >= 2**63:
        raise ValueError(f"reduction length {k} too long for an int64 result")
    if a.dtype == b.dtype == torch.int8 and OPERAND_MAX[a.dtype] * OPERAND_MAX[b.dtype] * k <= INT32_MAX:
        return torch.int32
    return torch.int64


def conv_out_size(size: int, k: int, s: int, p: int, what: str) -> int:
    if k < 1 or s < 1 or p < 0:
        raise ValueError(f"bad {what}: kernel {k}, stride {s}, padding {p}")
    o = (size + 2 * p - k) // s + 1
    if size + 2 * p < k or o < 1:
        raise ValueError(f"{what}: input size {size} with padding {p} is smaller than kernel {k}")
    return o


def im2col(x: torch.Tensor, kernel_hw: tuple[int, int], stride: tuple[int, int],
           padding: tuple[int, int]) -> torch.Tensor:
    """Patches of ``x`` [N, C, H, W] as a strided view [N, Ho, Wo, C, kh, kw] (zero padding).

    ``patches[n, a, b, c, i, j] = x_padded[n, c, a*sh + i, b*sw + j]``, the operand of
    cross-correlation exactly as ``torch.nn.functional.conv2d`` defines it.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel_hw, stride, padding
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    patches = x.unfold(2, kh, sh).unfold(3, kw, sw)  # [N, C, Ho, Wo, kh, kw]
    return patches.permute(0, 2, 3, 1, 4, 5)


def col2im(cols: torch.Tensor, input_hw: tuple[int, int], stride: tuple[int, int],
           padding: tuple[int, int]) -> torch.Tensor:
    """Adjoint of :func:`im2col`: scatter-add ``cols`` [N, Ho, Wo, C, kh, kw] into [N, C, H, W].

    One strided slice-add per kernel offset (kh*kw of them); positions that fall in the padding
    are dropped, rows/columns that no window reaches (when (H + 2p - kh) % s != 0) stay zero.
    """
    n, ho, wo, c, kh, kw = cols.shape
    (h, w), (sh, sw), (ph, pw) = input_hw, stride, padding
    out = cols.new_zeros((n, c, h + 2 * ph, w + 2 * pw))
    for i in range(kh):
        for j in range(kw):
            out[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] += (
                cols[:, :, :, :, i, j].permute(0, 3, 1, 2)
            )
    return out[:, :, ph:ph + h, pw:pw + w]


def stack_sample_chunks(n: int, chunks) -> torch.Tensor:
    """One tensor [n, ...] from (first sample, part) pairs covering samples 0..n-1; each part is
    written in as it comes, so only one is alive beside the result."""
    out = None
    for n0, part in chunks:
        if out is None:
            out = part.new_empty((n,) + part.shape[1:])
        out[n0:n0 + part.shape[0]] = part
    return out


# The three convolution products as im2col + one matrix product per chunk of the batch, shared by
# the backends that multiply integers directly (reference: int64 matmul, cuda: int8 _int_mm).
# ``mm(a, b)`` must return the exact ``a @ b``; ``step`` is the number of samples per chunk.

def conv_forward_by(mm, x: torch.Tensor, w: torch.Tensor, stride, padding, output_hw,
                    step: int) -> torch.Tensor:
    """``conv2d(x, w)`` [N, O, Ho, Wo] (N >= 1) in ``mm``'s result dtype."""
    o, c, kh, kw = w.shape
    k = c * kh * kw
    wm = w.reshape(o, k).t()  # [K, O]
    outs = [mm(im2col(x[n0:n0 + step], (kh, kw), stride, padding).reshape(-1, k), wm)
            .reshape(-1, *output_hw, o) for n0 in range(0, x.shape[0], step)]
    y = torch.cat(outs) if len(outs) > 1 else outs[0]
    return y.permute(0, 3, 1, 2)


def conv_backward_input_by(mm, d: torch.Tensor, wm: torch.Tensor, kernel_hw, input_hw, stride,
                           padding, step: int) -> torch.Tensor:
    """Input gradient [N, C, H, W] (N >= 1) from ``wm`` = the weight as an [O, C*kh*kw] matrix."""
    o, ho, wo = d.shape[1:]
    kh, kw = kernel_hw
    c = wm.shape[1] // (kh * kw)
    outs = []
    for n0 in range(0, d.shape[0], step):
        dm = d[n0:n0 + step].permute(0, 2, 3, 1).reshape(-1, o)  # [n*Ho*Wo, O]
        outs.append(col2im(mm(dm, wm).reshape(-1, ho, wo, c, kh, kw), input_hw, stride, padding))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def conv_backward_weight_by(mm, d: torch.Tensor, x: torch.Tensor, kernel_hw, stride, padding,
                            step: int) -> torch.Tensor:
    """Weight gradient [O, C, kh, kw] (N >= 1), the per-chunk products added in ``mm``'s dtype."""
    o = d.shape[1]
    c = x.shape[1]
    kh, kw = kernel_hw
    k = c * kh * kw
    g = None
    for n0 in range(0, d.shape[0], step):
        # [K, rows] @ [rows, O]: the faster orientation of the int64 CPU matmul (~2.5x).
        cols_t = im2col(x[n0:n0 + step], (kh, kw), stride, padding).permute(3, 4, 5, 0, 1, 2).reshape(k, -1)
        dm = d[n0:n0 + step].permute(0, 2, 3, 1).reshape(-1, o)  # [n*Ho*Wo, O]
        part = mm(cols_t, dm)  # [K, O]
        g = part if g is None else g.add_(part)
    return g.t().reshape(o, c, kh, kw)
