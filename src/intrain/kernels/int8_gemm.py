"""Convolution products of int8 tensors on CPU through ``torch._int_mm`` (the cpu backend's int8
GEMM path, for CPUs whose oneDNN runs it on AMX-INT8 units).

Channels-last im2col: each row of the column matrix is kh*kw runs of C contiguous channels, a
cheap copy, made a chunk of samples at a time. Integer ranges: every product is int8 x int8 with
int32 accumulation over at most 131,071 terms of magnitude <= 2**14 (the kernel geometry checks
the length), so no sum wraps; weight gradients add int32 pieces of at most ``INT32_REDUCTION``
rows, in int32 when the whole reduction is at most 131,071 terms, else in int64. CPU tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from intrain.kernels.im2col import stack_sample_chunks, weight_grad_dtype
from intrain.kernels.int_mm import INT32_REDUCTION, mm_int32


def samples_per_chunk(bytes_per_sample: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // max(1, bytes_per_sample))


def channels_last_patches(x: torch.Tensor, kh: int, kw: int, s: tuple[int, int], p: tuple[int, int],
             fill: int = 0) -> torch.Tensor:
    """Patches of x [N, C, H, W] as a strided view [N, Ho, Wo, kh, kw, C] over its channels-last
    copy padded with ``fill`` (zero, or what stands for zero in ``int16_gemm``'s halves): rows of
    columns in (kh, kw, C) order are runs of C contiguous values."""
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, p[1], p[1], p[0], p[0]), value=fill)  # [N, H', W', C]
    return padded.unfold(1, kh, s[0]).unfold(2, kw, s[1]).permute(0, 1, 2, 4, 5, 3)


class ColumnBuffer:
    """The im2col columns of one chunk of samples at a time, [rows, kh*kw*C], copied into one
    buffer allocated for the first (largest) chunk and reused by the others: a fresh
    chunk-sized tensor per chunk cost several times the copy itself in page faults (4 MiB
    chunks: 0.5-2 ms against 0.26 ms into a reused buffer, a throwaway measurement on the AMX
    Xeon with other jobs beside it). A chunk's columns live until the next chunk's are made."""

    def __init__(self, patches: torch.Tensor, step: int) -> None:
        self.patches, self.step = patches, step
        self.buffer = torch.empty((min(step, patches.shape[0]),) + patches.shape[1:],
                                  dtype=patches.dtype)

    def of(self, n0: int) -> torch.Tensor:
        chunk = self.patches[n0:n0 + self.step]
        cols = self.buffer[:chunk.shape[0]]
        cols.copy_(chunk)
        kh, kw, c = cols.shape[-3:]
        return cols.view(-1, kh * kw * c)


def conv_chunks(x: torch.Tensor, w: torch.Tensor, s: tuple[int, int], p: tuple[int, int],
                chunk_bytes: int):
    """conv2d of int8 x [N, C, H, W] (N >= 1) and w [O, C, kh, kw], a chunk of samples (at most
    ``chunk_bytes`` of im2col columns) at a time: yields (first sample, exact int32
    [n, Ho, Wo, O]) (channels last), by im2col of channels-last patches and ``torch._int_mm``.
    Exact: an int32 sum of at most C*kh*kw <= 131,071 terms of magnitude <= 2**14 cannot wrap
    (the geometry checks the length)."""
    o, c, kh, kw = w.shape
    k = c * kh * kw
    patches = channels_last_patches(x, kh, kw, s, p)
    ho, wo = patches.shape[1:3]
    wm = w.permute(0, 2, 3, 1).reshape(o, k).t()  # [kh*kw*C, O], the patches' order
    step = samples_per_chunk(ho * wo * k, chunk_bytes)
    columns = ColumnBuffer(patches, step)
    for n0 in range(0, x.shape[0], step):
        product = mm_int32(columns.of(n0), wm, pad=False)
        yield n0, product.view(-1, ho, wo, o)


def conv(x: torch.Tensor, w: torch.Tensor, s: tuple[int, int], p: tuple[int, int],
         chunk_bytes: int) -> torch.Tensor:
    """The whole int32 result [N, Ho, Wo, O] of conv_chunks."""
    return stack_sample_chunks(x.shape[0], conv_chunks(x, w, s, p, chunk_bytes))


def conv_weight_grad(d: torch.Tensor, x: torch.Tensor, khw: tuple[int, int],
                     s: tuple[int, int], p: tuple[int, int], chunk_bytes: int) -> torch.Tensor:
    """Weight gradient of a convolution of int8 operands (N >= 1) as [O, C, kh, kw] in
    weight_grad_dtype: d as [O, rows] times the channels-last columns of x [rows, kh*kw*C] by
    ``torch._int_mm``, a chunk of samples and a block of output channels at a time (temporaries
    of about ``chunk_bytes``). Every piece is exact in int32 (at most INT32_REDUCTION rows); the
    pieces are added into the result in its dtype: int32 only when the whole reduction N*Ho*Wo
    is at most 131,071 terms, so that every running total, a sum of at most that many products
    of magnitude <= 2**14, stays below 2**31."""
    n, o, ho, wo = d.shape
    c = x.shape[1]
    kh, kw = khw
    k = c * kh * kw
    grad = torch.zeros((o, c, kh, kw), dtype=weight_grad_dtype(d, x, n * ho * wo))
    by_position = grad.permute(0, 2, 3, 1)  # [O, kh, kw, C]: the columns' order
    patches = channels_last_patches(x, kh, kw, s, p)
    step = min(samples_per_chunk(ho * wo * k, chunk_bytes), max(1, INT32_REDUCTION // (ho * wo)))
    block = max(8, chunk_bytes // (4 * k) // 8 * 8)  # output channels per piece
    columns = ColumnBuffer(patches, step)
    for n0 in range(0, n, step):
        cols = columns.of(n0)
        errors = d[n0:n0 + step].transpose(0, 1).reshape(o, -1)  # rows in the order of cols
        for o0 in range(0, o, block):
            piece = mm_int32(errors[o0:o0 + block], cols, pad=False).view(-1, kh, kw, c)
            by_position[o0:o0 + block] += piece
    return grad
