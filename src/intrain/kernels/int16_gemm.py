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

from intrain.kernels.int8_gemm import channels_last_patches, samples_per_chunk
from intrain.kernels.int_mm import INT32_REDUCTION, mm_int32
from intrain.numeric import native
from intrain.numeric.accumulate import shift_operand

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


def _row_sums(m: torch.Tensor, rows_per_block: int = 64) -> torch.Tensor:
    """Exact int64 sums of the rows of an int16 matrix, a block of rows at a time: ``sum(dtype=
    torch.int64)`` widens its whole operand first (an 18 MiB temporary for a 512 x 4608 weight)."""
    return torch.cat([m[r:r + rows_per_block].sum(1, dtype=torch.int64)
                      for r in range(0, m.shape[0], rows_per_block)])


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


def _output_hw(x: torch.Tensor, w: torch.Tensor, s: tuple[int, int], p: tuple[int, int]) -> tuple[int, int]:
    """(Ho, Wo) of the convolution of x [N, C, H, W] and w [O, C, kh, kw]."""
    return ((x.shape[2] + 2 * p[0] - w.shape[2]) // s[0] + 1,
            (x.shape[3] + 2 * p[1] - w.shape[3]) // s[1] + 1)


def _columns(half: torch.Tensor, buffer: torch.Tensor, kh: int, kw: int, s: tuple[int, int],
             p: tuple[int, int], fill: int) -> torch.Tensor:
    """The channels-last im2col columns [rows, kh*kw*C] of the int8 ``half`` of a chunk of
    samples, padded with ``fill``, copied into the front of ``buffer``."""
    columns = buffer[:half.shape[0]]
    columns.copy_(channels_last_patches(half, kh, kw, s, p, fill))
    return columns.view(-1, kh * kw * half.shape[1])


class HalvesColumns:
    """The channels-last im2col columns [rows, kh*kw*C] of both int8 halves of chunks of an int16
    operand x [N, C, H, W] (any strides), each chunk shifted right first by ``shift`` with nearest
    rounding (``numeric.accumulate.shift_operand``): two C passes (``native.split_halves_padded``
    into padded channels-last halves, ``native.channels_last_columns``), or the PyTorch ones. The
    buffers are made for the first (largest) chunk and reused; a chunk's columns live until the
    next chunk's are made."""

    def __init__(self, x: torch.Tensor, kernel_hw: tuple[int, int], s: tuple[int, int], p: tuple[int, int],
                 step: int, shift: int) -> None:
        n, c, h, w = x.shape
        self.x, self.kernel_hw, self.s, self.p, self.step, self.shift = x, kernel_hw, s, p, step, shift
        kh, kw = kernel_hw
        ho, wo = (h + 2 * p[0] - kh) // s[0] + 1, (w + 2 * p[1] - kw) // s[1] + 1
        rows = min(step, n)
        self.columns = [torch.empty((rows, ho, wo, kh, kw, c), dtype=torch.int8) for _ in range(2)]
        self.padded = [torch.empty((rows, h + 2 * p[0], w + 2 * p[1], c), dtype=torch.int8) for _ in range(2)]

    def of(self, n0: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns of the high and the low halves of samples ``n0 .. n0 + step``."""
        chunk = self.x[n0:n0 + self.step]
        rows = chunk.shape[0]
        padded = [half[:rows] for half in self.padded]
        columns = [half[:rows] for half in self.columns]
        (kh, kw), k = self.kernel_hw, self.kernel_hw[0] * self.kernel_hw[1] * chunk.shape[1]
        if (native.split_halves_padded(chunk, self.shift, self.p, *padded)
                and all(native.channels_last_columns(half, self.kernel_hw, self.s, cols)
                        for half, cols in zip(padded, columns))):
            return columns[0].view(-1, k), columns[1].view(-1, k)
        x_hi, x_lo = split_halves(shift_operand(chunk, self.shift))
        return (_columns(x_hi, self.columns[0], kh, kw, self.s, self.p, ZERO_HI),
                _columns(x_lo, self.columns[1], kh, kw, self.s, self.p, ZERO_LO))


def conv_chunks(x: torch.Tensor, w: torch.Tensor, s: tuple[int, int], p: tuple[int, int],
                chunk_bytes: int, out: torch.Tensor | None = None, x_shift: int = 0):
    """conv2d of int16 x [N, C, H, W] (N >= 1) and w [O, C, kh, kw] with C*kh*kw at most
    ``INT32_REDUCTION``, a chunk of samples at a time: yields (first sample, exact int64
    [n, O, Ho, Wo] of the chunk). The halves' channels-last im2col columns (``int8_gemm``) times
    both halves of the weight and a column of ones side by side, combined straight into NCHW (one
    C pass) or through a channels-last copy. Each chunk is written into ``out`` [N, O, Ho, Wo]
    when given, else into one buffer that the next chunk reuses (take what a chunk holds before
    asking for the next). x's halves and their padded copies are made a chunk at a time too: for
    the whole of VGG-small-7's 128-channel 32 x 32 layers at batch 64 they were 34 MiB. With
    ``x_shift``, x's values are shifted right with nearest rounding (DFP16's headroom,
    ``numeric.accumulate.shift_operand``) a chunk at a time as they are split: the product is that
    of the shifted x, with no shifted copy of the whole of x."""
    o, c, kh, kw = w.shape
    k = c * kh * kw
    n = x.shape[0]
    ho, wo = _output_hw(x, w, s, p)
    w_rows = w.permute(0, 2, 3, 1).reshape(o, k)  # the columns' (kh, kw, C) order
    sum_w = _row_sums(w_rows).view(1, o)
    w_hi, w_lo = split_halves(w_rows)
    del w_rows
    both = torch.cat([w_hi, w_lo, torch.ones((1, k), dtype=torch.int8)]).t()  # [K, 2O + 1]
    del w_hi, w_lo  # copies of the weight (2.25 MiB each for 512 x 512 x 3 x 3): ``both`` has them
    step = samples_per_chunk(2 * ho * wo * k, chunk_bytes)
    buffer = None if out is not None else torch.empty((min(step, n), o, ho, wo), dtype=torch.int64)
    columns = HalvesColumns(x, (kh, kw), s, p, step, x_shift)
    for n0 in range(0, n, step):
        x_hi, x_lo = columns.of(n0)
        high = mm_int32(x_hi, both, pad=False)
        low = mm_int32(x_lo, both, pad=False)
        rows, cols = _offset_terms(high[:, 2 * o:], low[:, 2 * o:], sum_w, k)
        parts = (high[:, :o], high[:, o:2 * o], low[:, :o], low[:, o:2 * o])
        target = out[n0:n0 + step] if out is not None else buffer[:min(step, n - n0)]
        if not native.combine_halves(parts, rows, cols, target, hw=ho * wo):
            chunk = torch.empty((high.shape[0], o), dtype=torch.int64)
            _combine(chunk, *parts, rows, cols)
            target.copy_(chunk.view(-1, ho, wo, o).permute(0, 3, 1, 2))
        yield n0, target


def conv(x: torch.Tensor, w: torch.Tensor, s: tuple[int, int], p: tuple[int, int],
         chunk_bytes: int) -> torch.Tensor:
    """The whole exact int64 result [N, O, Ho, Wo] of ``conv_chunks``."""
    out = torch.empty((x.shape[0], w.shape[0], *_output_hw(x, w, s, p)), dtype=torch.int64)
    for _ in conv_chunks(x, w, s, p, chunk_bytes, out):
        pass
    return out


def _error_halves(errors: torch.Tensor, shift: int, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``([d_hi ; d_lo ; ones], sums)`` for the int16 errors [n, B, Ho, Wo] of a block of output
    channels shifted right by ``shift`` (nearest rounding): the int8 matrix [2B + 1, n Ho Wo] of
    their halves by channel in (sample, position) order and a row of ones, made in the front of
    the flat int8 ``buffer``, and the int64 sums [B] of the shifted errors by channel. One C pass
    (``native.split_error_rows``), or the PyTorch ones."""
    n, width, ho, wo = errors.shape
    rows = n * ho * wo
    halves = buffer[:(2 * width + 1) * rows].view(2 * width + 1, rows)
    halves[2 * width].fill_(1)
    sums = torch.zeros(width, dtype=torch.int64)
    if native.split_error_rows(errors, shift, halves[:2 * width], sums):
        return halves, sums
    errors = shift_operand(errors, shift)
    for target, half in zip((halves[:width], halves[width:2 * width]), split_halves(errors)):
        target.view(width, n, ho * wo).copy_(half.reshape(n, width, ho * wo).transpose(0, 1))
    return halves, errors.sum((0, 2, 3), dtype=torch.int64)


def conv_weight_grad(d: torch.Tensor, x: torch.Tensor, khw: tuple[int, int], s: tuple[int, int],
                     p: tuple[int, int], chunk_bytes: int, shifts: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Weight gradient of a convolution of int16 operands (N >= 1, at most ``INT32_REDUCTION``
    output positions per sample) as exact int64 [O, C, kh, kw]: both halves of a block of d's
    output channels and a row of ones, [2B + 1, rows], times each half of x's channels-last
    columns [rows, kh*kw*C]. The int32 products of successive chunks of samples are added in
    int32 while the rows they cover stay within ``INT32_REDUCTION`` (each sum then has at most
    that many terms of magnitude <= 2**14, so it cannot wrap) and combined into the int64 sums
    once per such run: combining after every chunk of one sample (VGG-small-7's 32 x 32 layers)
    cost as much as the products. The blocks of B output channels keep each int32 product near
    ``chunk_bytes`` (the products of a whole 512 x 4608 layer were 18 MiB each); a block's sum is
    reordered into the result once its last chunk is in, so no whole-layer copy in the columns'
    order is made. x's halves and columns are made a chunk of samples at a time, once per block:
    layers of several blocks (many output channels) have small inputs, and one block covers 454
    channels of 3 x 3 x 128 taps at 4 MiB. ``shifts``: right shifts of d and x with nearest
    rounding (as in ``conv_chunks``), applied to each chunk as it is split."""
    n, o, ho, wo = d.shape
    c = x.shape[1]
    kh, kw = khw
    k = c * kh * kw
    if ho * wo > INT32_REDUCTION:
        raise ValueError(f"{ho * wo} output positions per sample: at most {INT32_REDUCTION} fit one int32 product")
    grad = torch.empty((o, c, kh, kw), dtype=torch.int64)
    block = max(1, min(o, (chunk_bytes // (4 * k) - 1) // 2))  # 2B + 1 rows of k int32 each
    step = min(samples_per_chunk(2 * ho * wo * k, chunk_bytes), INT32_REDUCTION // (ho * wo))
    by_position = torch.empty((min(block, o), k), dtype=torch.int64)  # [B, kh*kw*C]: the columns' order
    columns = HalvesColumns(x, khw, s, p, step, shifts[1])
    # The int32 sums by each half of x, [2B + 1, K], and one product added into them.
    summed = [torch.empty((2 * min(block, o) + 1, k), dtype=torch.int32) for _ in range(2)]
    product = torch.empty_like(summed[0])
    halves_buffer = torch.empty((2 * min(block, o) + 1) * min(step, n) * ho * wo, dtype=torch.int8)
    for o0 in range(0, o, block):
        width = min(block, o - o0)
        sums, by_hi, by_lo = by_position[:width], summed[0][:2 * width + 1], summed[1][:2 * width + 1]
        rows, pending, combined = torch.zeros((width, 1), dtype=torch.int64), 0, False
        for n0 in range(0, n, step):
            halves, error_sums = _error_halves(d[n0:n0 + step, o0:o0 + width], shifts[0], halves_buffer)
            # [d_hi x_hi ; d_lo x_hi ; sum x_hi] and [d_hi x_lo ; d_lo x_lo ; sum x_lo]
            for half, total in zip(columns.of(n0), (by_hi, by_lo)):
                if pending == 0:
                    mm_int32(halves, half, pad=False, out=total)
                else:
                    total.add_(mm_int32(halves, half, pad=False, out=product[:2 * width + 1]))
            # Here a = d (rows o) and b = the columns, b*'s sums from the row of ones. The row term
            # 128 sum a* + 16384 K is 128 sum a.
            rows.add_(error_sums.view(width, 1), alpha=128)
            pending += halves.shape[1]
            if n0 + step >= n or pending + min(step, n - n0 - step) * ho * wo > INT32_REDUCTION:
                cols = by_hi[2 * width:].to(torch.int64).mul_(256).add_(by_lo[2 * width:]).mul_(128)
                _combine(sums, by_hi[:width], by_lo[:width], by_hi[width:2 * width], by_lo[width:2 * width],
                         rows, cols, accumulate=combined)
                rows.zero_()
                pending, combined = 0, True
        grad[o0:o0 + width] = sums.view(width, kh, kw, c).permute(0, 3, 1, 2)
    return grad
