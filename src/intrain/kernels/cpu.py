"""The cpu kernel backend: exact integer products on the fastest units the CPU has.

Two paths, bit-identical to the ``reference`` backend for every input (same dtypes, same values,
same error messages):

* int8 GEMM: on CPUs with AMX-INT8 tile units (Intel Xeon since Sapphire Rapids), oneDNN runs
  ``torch._int_mm`` (int8 x int8 -> int32) at 0.3-3.2 TOPS, 1.7-11x its float32 GEMM (four
  product shapes, measured on such a machine, see BENCHMARKS.md). There int8 products go to
  it: linear layers always, convolutions with at least ``CpuSettings.int8_gemm_min_channels``
  input and output channels (channels-last im2col; the input gradient of a stride-1 convolution
  as the convolution with the flipped kernel; weight gradients in int32 pieces added in int64,
  as in the cuda backend). Exact with no look at the data: an int32 sum of at most 131,071
  int8 products cannot wrap.
* float units, everywhere else: on CPUs without such units, float32 GEMM and oneDNN float32
  convolution run 10-50x faster than any integer path PyTorch offers (on an AMD Zen 3: int64
  matmul below 1 GOPS, ``torch._int_mm`` about 3 GOPS, per issue 3). This path feeds float copies
  of the integer operands to those kernels and proves, for every call, from the actual operand
  values, that the float result is the exact integer sum (below).

``product_to_int8`` gives a forward or input-gradient product already requantised to int8 (what
the layers need) without making the int32 accumulator of the float path.

Integer ranges guaranteed (same as every backend): forward / backward-input results are int32
when both operands are int8 (|sum| <= 2**14 * K < 2**31, checked statically for K <= 131,071)
and int64 when an operand is int16; weight gradients the same with K = the batch (times Ho*Wo).
CPU tensors only.

Why the float result is exact
-----------------------------
Let a reduction compute ``sum_k a_k * b_k`` with integer ``a_k, b_k`` and let
``S = sum_k |a_k * b_k|``. A float format with a p-bit significand represents every integer of
magnitude <= 2**p exactly (p = 24 for float32, 53 for float64). If ``S <= 2**p`` then

* every product ``a_k * b_k`` is an integer of magnitude <= S, so it is exact (also inside an
  FMA, which rounds once, the exact result);
* every partial sum that any summation order or blocking can form (sequential, pairwise, SIMD
  lanes, per-thread partials, split-K) is a sum of a subset of the products, hence an integer of
  magnitude <= S <= 2**p, so each addition's exact result is representable and round-to-nearest
  returns it unchanged.

So the float result equals the integer sum, whatever order the library uses, as long as it
computes a sum of products in IEEE arithmetic. That excludes transform-based convolutions
(Winograd, FFT: NNPACK, which this module switches off around its calls; oneDNN as PyTorch calls
it uses ``convolution_direct``) and reduced-precision modes (TF32/BF16 "fast math": if any of
PyTorch's float32 precision settings or oneDNN's fpmath environment variables ask for them, this
module uses float64 only, which no such mode touches).

Bounding S cheaply: ``S <= max|a| * max|b| * K`` (two ``aminmax`` passes); every call tries this
first. When it exceeds 2**24, finer bounds are computed per "grain" of the reduction (an input
channel, an output channel, a sample, a chunk of columns):

* L1: for an output element that reads row r of operand b, ``S <= max|a| * sum_k |b_kr|``
  (usually on the weights, which are small tensors);
* window (convolution forward and input gradient): ``S <= max|w| * sum_c m_c``, where ``m_c`` is
  the largest sum of |x| (or |d|) of channel c over any kernel-sized window: sparse errors with
  a few large values give small sums where the weight-side L1 bound does not;
* Cauchy-Schwarz (weight gradients): ``S <= ||a||_2 * ||b||_2``, from per-sample sums of squares.

The reduction is then split greedily into consecutive blocks of grains whose bound is <= 2**24.
Each block is one float32 call with an exact result; the block results are added in float64,
exact because every partial total is at most the full S <= 2**14 * K < 2**53 (int64 if the
bound ever exceeds 2**53). Weight gradients with dense large errors also try d = 16*dh + dl
(two halves with 16x and ~8x smaller terms, so far fewer blocks). When too many blocks would be
needed, or a single grain is too large (int16 operands with large values), the reduction runs in
float64 under the same argument with p = 53 (split again if ever needed, which takes K > 2**23
for int16), and in the last resort in the int64 reference. All bounds are computed in exact
integer arithmetic (int64, or float sums of integers proven exact the same way).

Weight gradients of narrow convolutions (at most ``grouped_max_columns`` weights per output
channel), or whose per-sample reduction is so long that a group holds one sample and whose block
plan needs more than ``grouped_min_blocks`` calls, take a shortcut: when
``max|d| * max|x| * Ho * Wo <= 2**24`` the sum over a group of
``g = floor(2**24 / (max|d| * max|x| * Ho * Wo))`` samples is exact in float32, so one batched
product over im2col columns gives exact per-group gradients, added in float64 (exact: the total
is at most 2**24 * N / g).

Dense, large errors need more blocks and so more calls than heavy-tailed ones. Speed against
float32 is measured by ``benchmarks/speed.py``; results are in BENCHMARKS.md.

A backend is ``CpuBackend(CpuSettings(...))``: every tuned constant (when to take the int8
GEMM, how many float32 blocks before float64, chunk sizes, ...) is a field of the frozen
:class:`CpuSettings` it holds, each justified by ``benchmarks/cpu_tuning.py``. The exactness
limits 2**24 and 2**53 are not settings: they are the proof's (``F32_EXACT``, ``F64_EXACT``), and
a backend can only be given lower ones (:class:`FloatLimits`, which is how the tests reach the
blocked and fall-back plans on small shapes).
"""

from __future__ import annotations

import functools
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from intrain.kernels import int8_gemm
from intrain.kernels import reference as _ref
from intrain.kernels.base import Backend
from intrain.kernels.im2col import IntPair, im2col, stack_sample_chunks, weight_grad_dtype
from intrain.kernels.int_mm import mm_int32, mm_int64
from intrain.numeric.requant import cpu_slices, requantize, requantize_chunks
from intrain.numeric.rounding import shift_round

F32_EXACT = 2**24  # float32 holds every integer of magnitude <= 2**24
F64_EXACT = 2**53  # float64 holds every integer of magnitude <= 2**53


@dataclass(frozen=True)
class CpuSettings:
    """The cpu backend's tuned constants: each trades speed (or memory) against another cost
    and changes no result bit. Frozen: a backend's settings never change; make another backend
    (``dataclasses.replace(settings, ...)``) to try other values."""

    #: Whether int8 x int8 products use ``torch._int_mm`` (exact int32 accumulation) instead of
    #: float units: None = automatically (on CPUs with AMX-INT8, for wide enough layers), True =
    #: always, False = never.
    use_int8_gemm: bool | None = None
    #: ... automatically only for convolutions with at least this many input and output channels:
    #: below it the im2col copy costs more than the product saves. Measured on an AMX machine, 2
    #: threads, tensors of real training steps (throwaway script, two runs): LeNet-5 (1->6, 6->16
    #: channels) forward 3.1-4.1x slower on the int8 GEMM, input gradient 1.5-2.5x, weight gradient
    #: 1.1-2.5x; VGG-small-7's 3->128 layer forward 1.6x slower; its other layers 0.17-0.76x.
    int8_gemm_min_channels: int = 32
    #: Bytes of int8 im2col columns the int8 GEMM's convolution products build at once. Small
    #: chunks keep the temporaries small (peak memory) and in memory the allocator reuses: seven
    #: VGG-small-7 products took 339 ms in 4 MiB chunks, 336 ms in 16 MiB and 471 ms in 256 MiB
    #: ones (1 thread, a training run beside it, throwaway script).
    int8_gemm_chunk_bytes: int = 2**22
    #: More float32 blocks than this and one float64 call is cheaper (float64 GEMM runs at about
    #: half the float32 rate; float64 convolution has no oneDNN kernel and runs 5-10x slower).
    max_f32_blocks_mm: int = 3
    max_f32_blocks_conv: int = 16
    #: ... except for weight gradients, split on samples: up to N / 3 blocks (measured: float32
    #: blocks of 3-4 samples beat a float64 weight-gradient convolution, blocks of 1 do not).
    min_samples_per_block: int = 3
    #: Weight-gradient plans of at most this many float32 sample blocks run as planned; longer
    #: ones try the grouped product and the split of d (below) first. Measured on this machine, 2
    #: threads, tensors of a VGG-small-7 training step at batch 64 (throwaway script): the
    #: 128->128 layer at 32x32 took 73.9 ms in 2 blocks against 154.2 ms grouped (groups of 1
    #: sample); the 3->128 layer 3.9 ms in 5 blocks against 3.0 ms grouped; LeNet-5's first layer
    #: (batch 256) 1.4 ms in 3 blocks against 1.8 ms grouped.
    grouped_min_blocks: int = 4
    #: Weight gradients of convolutions with at most this many weights per output channel
    #: (C*kh*kw: 25 for LeNet-5's first layer, 9 or 27 for VGG's) are computed by im2col and one
    #: batched product over groups of as many samples as keep each group's sum exact in float32:
    #: oneDNN's weight-gradient kernel is slow with one or three input channels. Measured on this
    #: machine, quiet, 2 threads, tensors from a LeNet-5 training step at batch 256 (throwaway
    #: script): first layer (25 columns) 6.6-7.4 ms grouped against 9.4-13.3 ms on sample blocks;
    #: second layer (150 columns) 7.5-9.4 ms grouped against 3.0-4.9 ms on sample blocks, so it
    #: stays on the blocks.
    grouped_max_columns: int = 32
    #: ... and of wider convolutions whose groups hold at most this many samples. Measured on this
    #: machine, quiet, 2 threads, ReLU-like x and pooled (3/4 zero) d (throwaway script): groups
    #: of 1 (32x32 outputs at batch 64, 28x28 at batch 256) 1.2-1.6x faster than the block plans;
    #: groups of 4-5 (16x16, 14x14) 0.7-1.0x, so those stay on the block plans.
    grouped_max_samples: int = 1
    #: Bytes of float32 im2col columns built at once by the grouped weight gradient (small: they
    #: are the largest temporary of LeNet-5's step; 2 MiB instead of 64 took its peak tensor
    #: memory from 27.6 to 17.9 MiB at the same speed, one run each of a throwaway script using
    #: benchmarks/speed.py's peak measure).
    grouped_chunk_bytes: int = 2**21
    #: Weight gradients needing more float32 blocks than this try splitting the errors in two
    #: halves.
    split_min_blocks: int = 4
    #: Linear reductions are split on chunks of this many columns (the "grains").
    mm_grains: int = 64
    #: Bytes of float32 data a float-path convolution product works on at once: results of the
    #: forward and input-gradient products (chunks requantised to int8 are kept in int16,
    #: requantize_chunks), float copies of the weight gradient's operands. oneDNN's own
    #: temporaries grow with the batch. Chunking small products costs time: LeNet-5 at batch 256
    #: (whose first layer's oneDNN call alone takes 12 MiB for a 3.4 MiB result) measured 1.40x /
    #: 0.96x (step time / peak memory against float32) unchunked, 1.51x / 0.67x in 2 MiB chunks,
    #: 1.56x / 0.47x in 1 MiB chunks (benchmarks/speed.py, one run each), so products below this
    #: size are not chunked; on VGG-small-7's float path 4 MiB took the peak to 0.42x (0.52x at
    #: 16 MiB) at the same speed.
    float_chunk_bytes: int = 2**22


@dataclass(frozen=True)
class FloatLimits:
    """The largest integer magnitudes a cpu backend trusts float32 and float64 to hold exactly:
    ``F32_EXACT`` and ``F64_EXACT``, from the proof. Lower ones are only more conservative
    (every bound is checked against a smaller budget: more blocks, float64 and the int64
    fall-back, which is how the tests reach those plans on small shapes); higher ones are
    refused."""

    float32: int = F32_EXACT
    float64: int = F64_EXACT

    def __post_init__(self) -> None:
        if not (1 <= self.float32 <= F32_EXACT and 1 <= self.float64 <= F64_EXACT):
            raise ValueError(f"float limits must lie in [1, 2**24] and [1, 2**53], got "
                             f"{self.float32} and {self.float64}")


_STRICT_PRECISIONS = (None, "none", "ieee", "highest")


@functools.cache
def has_amx() -> bool:
    """Whether this CPU has AMX-INT8 tile units (where oneDNN runs ``torch._int_mm`` fast)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def _fp32_is_strict() -> bool:
    """True when no setting lets PyTorch/oneDNN run float32 products in reduced precision."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    mk = torch.backends.mkldnn
    for obj in (torch.backends, mk, getattr(mk, "matmul", None), getattr(mk, "conv", None)):
        if getattr(obj, "fp32_precision", None) not in _STRICT_PRECISIONS:
            return False
    for var in ("ONEDNN_DEFAULT_FPMATH_MODE", "DNNL_DEFAULT_FPMATH_MODE"):
        v = os.environ.get(var)
        if v and v.strip().lower() != "strict":
            return False
    return True


def _no_nnpack():
    # NNPACK (Winograd/FFT, inexact) is only picked for float32 forward convolutions when oneDNN
    # is not (oneDNN disabled by the user); switch it off around our calls whenever it is on.
    # The flag is process-global: a float convolution run concurrently in another thread
    # during our call would also run without NNPACK, which is harmless.
    if torch._C._get_nnpack_enabled():
        return torch.backends.nnpack.flags(enabled=False)
    return nullcontext()


def _check_cpu(*ts: torch.Tensor) -> None:
    for t in ts:
        if t.device.type != "cpu":
            raise ValueError(f"the cpu backend takes CPU tensors, got one on {t.device}; "
                             f"use the 'reference' or 'cuda' backend")


def _absmax(t: torch.Tensor) -> int:
    """max |t| as a Python int (handles int8's -128 without overflow)."""
    if t.numel() == 0:
        return 0
    mn, mx = torch.aminmax(t)
    return max(-int(mn), int(mx))


def _rows_sq(t: torch.Tensor, amax: int, limits: FloatLimits) -> torch.Tensor:
    """Exact sums of squares of an integer tensor [N, R, ...] over its trailing dimensions, as
    int64 [N, R]: batched dot products of float copies of a slice of samples at a time, exact in
    float32 when ``amax**2 * count <= 2**24`` (otherwise computed in float64)."""
    n, r = t.shape[:2]
    count = t[0, 0].numel() if n and r else 0
    dt = torch.float64 if amax * amax * count > limits.float32 else torch.float32
    sums = []
    for rows in cpu_slices(t):
        v = _as_float(t[rows], dt).reshape(-1, 1, count)
        sums.append(torch.bmm(v, v.transpose(1, 2)).reshape(-1, r))
    return torch.cat(sums).to(torch.int64)


def _rows_l1(t: torch.Tensor, dims: Sequence[int], amax: int, count: int,
             limits: FloatLimits) -> torch.Tensor:
    """Exact L1 norms of an integer tensor over ``dims``, as int64, from float copies of a slice
    of samples at a time (a copy of the whole tensor costs more in page faults than the
    arithmetic: 9.5 ms against 1.9 ms for a [64, 128, 32, 32] tensor, measured).

    ``count`` terms of magnitude <= ``amax`` per norm: the float32 sum is exact when
    ``amax * count <= 2**24`` (same argument as above, all terms >= 0); otherwise use float64.
    """
    dt = torch.float64 if amax * count > limits.float32 else torch.float32
    norms = [_as_float(t[rows], dt).abs_().sum(dim=tuple(dims)) for rows in cpu_slices(t)]
    return torch.cat(norms).to(torch.int64)


def _as_float(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """A new float copy of the integer tensor ``t`` (callers scale it in place)."""
    if t.is_floating_point():
        raise TypeError("expected an integer tensor")
    return t.to(dt)


# ------------------------------------------------------------------------------ block plans

def _cum(cost: torch.Tensor) -> np.ndarray:
    """[G, R] -> [G + 1, R] running sums over grains, starting at 0 (int64 numpy, exact)."""
    c = cost.to(torch.int64).numpy()
    out = np.zeros((c.shape[0] + 1,) + c.shape[1:], dtype=np.int64)
    np.cumsum(c, axis=0, out=out[1:])
    return out


class L1Bound:
    """S of a block [s, e) <= scale * max_r sum_{g in [s, e)} cost[g, r].

    Used with ``scale`` = max |a| over one operand and ``cost[g, r]`` = L1 norm over grain g of
    the other operand's part read by output r: S = sum |a_k b_k| <= max|a| * sum |b_k|.
    (int64 sums: at most 2**15 * K < 2**48. The test scale * v <= budget is done as
    v <= budget // scale, which is equivalent for integers and cannot overflow.)
    """

    def __init__(self, scale: int, cost: torch.Tensor) -> None:
        self.scale, self.cum = scale, _cum(cost)

    def longest(self, s: int, budget: int) -> int:
        """Largest m such that the block [s, s + m) satisfies the bound (0 if none)."""
        if self.scale == 0:
            return self.cum.shape[0] - 1 - s
        v = (self.cum[s + 1:] - self.cum[s]).max(axis=1)  # non-decreasing in the block end
        return int(np.searchsorted(v, budget // self.scale, side="right"))


class CSBound:
    """S of a block [s, e) <= sqrt(max_r sum_g sq_a[g, r] * max_q sum_g sq_b[g, q]).

    Cauchy-Schwarz: sum |a_k b_k| <= ||a||_2 ||b||_2, with ``sq_a[g, r]`` = sum of squares over
    grain g of the part of operand a that output row r reads (likewise b). Tested in integers as
    A * B <= budget**2, i.e. A <= budget**2 // B; only for budgets with budget**2 < 2**62 and
    totals of squares below 2**62 (always so for int8 data: 2**14 * K).
    """

    def __init__(self, sq_a: torch.Tensor, sq_b: torch.Tensor) -> None:
        # Checked in float64 (rounding is irrelevant at this margin) before any int64 cumsum.
        self.usable = all(float(t.to(torch.float64).sum(0).max()) < 2.0**61
                          for t in (sq_a, sq_b) if t.numel())
        if self.usable:
            self.cum_a, self.cum_b = _cum(sq_a), _cum(sq_b)

    def longest(self, s: int, budget: int) -> int:
        b2 = budget * budget
        if b2 >= 2**62 or not self.usable:
            return 0
        a = (self.cum_a[s + 1:] - self.cum_a[s]).max(axis=1)
        b = (self.cum_b[s + 1:] - self.cum_b[s]).max(axis=1)
        ok = (b == 0) | (a <= b2 // np.maximum(b, 1))  # true on a prefix: a, b non-decreasing
        return int(ok.sum())


Bounds = list  # of L1Bound / CSBound


def _greedy_blocks(bounds: Bounds, n_grains: int, budget: int, max_blocks: int | None
                   ) -> list[tuple[int, int]] | None:
    """Split grains 0..G-1 into consecutive blocks each satisfying some bound <= budget.

    Every bound is non-decreasing in the block end e, so the admissible ends from s form a
    prefix and the longest admissible block is the longest over the bounds.
    Returns None when a single grain exceeds the budget or more than max_blocks are needed.
    """
    blocks: list[tuple[int, int]] = []
    s = 0
    while s < n_grains:
        m = max(b.longest(s, budget) for b in bounds)
        if m == 0:
            return None
        blocks.append((s, s + m))
        s += m
        if max_blocks is not None and len(blocks) > max_blocks and s < n_grains:
            return None
    return blocks


def _plan(quick: int, bound_fns: Sequence[Callable[[], Bounds]], n_grains: int,
          max_f32_blocks: int, limits: FloatLimits
          ) -> tuple[torch.dtype | None, list[tuple[int, int]]]:
    """Choose (float dtype, blocks of grains); dtype None means: use the int64 reference.

    ``quick`` is max|a| * max|b| * K >= S. ``bound_fns`` produce finer bounds, computed lazily in
    order (cheapest first) while the float32 plan still needs more than one block. Bounds from a
    ``bound_fns`` entry after the first are only used for float32 plans (they may use float32
    products, which are only trusted in strict mode).
    """
    whole = [(0, n_grains)]
    strict = _fp32_is_strict()
    if strict and quick <= limits.float32:
        return torch.float32, whole
    if not strict and quick <= limits.float64:
        return torch.float64, whole
    first: Bounds = bound_fns[0]()
    bounds = first
    if strict:
        best = None
        for i, fn in enumerate(bound_fns):
            if i:
                bounds = bounds + fn()
            blocks = _greedy_blocks(bounds, n_grains, limits.float32, max_f32_blocks)
            if blocks is not None:
                best = blocks
                if len(blocks) == 1:
                    break
        if best is not None:
            return torch.float32, best
    if quick <= limits.float64:
        return torch.float64, whole
    blocks = _greedy_blocks(first, n_grains, limits.float64, None)
    if blocks is not None:
        return torch.float64, blocks
    return None, whole


def _accumulate(results, quick: int, limits: FloatLimits) -> torch.Tensor:
    """Sum block results, each exact. In float64 when ``quick`` (>= S, which bounds every partial
    sum of block results) is <= 2**53, as always for int8 operands; in int64 otherwise."""
    wide = torch.float64 if quick <= limits.float64 else torch.int64
    acc = None
    for r in results:
        acc = r.to(wide) if acc is None else acc.add_(r.to(wide) if wide == torch.int64 else r)
    return acc


# ----------------------------------------------------------------------- conv2d bounds

def _weight_l1(w: torch.Tensor) -> torch.Tensor:
    """[O, C] int64: sum over the kernel window of |w[o, c]| (weights are small: int32 is fine)."""
    return w.to(torch.int32).abs().sum(dim=(2, 3), dtype=torch.int64)


def _window_l1(t: torch.Tensor, window: tuple[int, int], amax: int, limits: FloatLimits
               ) -> torch.Tensor:
    """[C, 1] int64: for each channel c of an integer tensor [N, C, H, W], the largest sum of
    |t[n, c]| over any window of ``window`` consecutive rows and columns (fewer where the map is
    smaller), over all samples n; computed a slice of samples at a time in floats.

    Every convolution window, clipped to the map (the padding adds zeros), and every set of
    output positions that one input position meets in a transposed convolution lies inside such
    a window, so this bounds the activation side of a channel's terms. The float sums are exact:
    ``amax * window area <= 2**24`` terms of one sign (float64 otherwise).
    """
    dt = torch.float64 if amax * window[0] * window[1] > limits.float32 else torch.float32
    largest = None
    for rows in cpu_slices(t):
        sums = _as_float(t[rows], dt).abs_()
        # Box sums as shifted additions along each axis (faster here than avg_pool2d).
        for axis, k in ((2, window[0]), (3, window[1])):
            k = min(k, sums.shape[axis])
            length = sums.shape[axis] - k + 1
            box = sums.narrow(axis, 0, length).clone()
            for i in range(1, k):
                box += sums.narrow(axis, i, length)
            sums = box
        part = sums.amax(dim=(0, 2, 3))
        largest = part if largest is None else torch.maximum(largest, part)
    return largest.to(torch.int64).unsqueeze(1)


def _transposed(df: torch.Tensor, wf: torch.Tensor, input_hw, s, p) -> torch.Tensor:
    """Gradient wrt the input of conv2d: a transposed convolution. output_padding picks the
    input size when (H + 2p - kh) % s != 0; it lies in [0, s - 1] as conv_transpose2d needs."""
    kh, kw = wf.shape[2:]
    ho, wo = df.shape[2:]
    op = (input_hw[0] + 2 * p[0] - kh - (ho - 1) * s[0],
          input_hw[1] + 2 * p[1] - kw - (wo - 1) * s[1])
    return F.conv_transpose2d(df, wf, None, s, p, op)


# ------------------------------------------------------------------ conv2d weight gradient

def _weight_grad(df: torch.Tensor, xf: torch.Tensor, khw, s, p) -> torch.Tensor:
    o, c = df.shape[1], xf.shape[1]
    wshape = xf.new_zeros((o, c) + tuple(khw))  # only its shape is used
    return torch.ops.aten.convolution_backward(
        df, xf, wshape, None, list(s), list(p), [1, 1], False, [0, 0], 1, [False, True, False]
    )[1]


def _weight_grad_grouped(d: torch.Tensor, x: torch.Tensor, khw, s, p, group: int,
                         chunk_bytes: int) -> torch.Tensor:
    """Weight gradient as batched products over groups of ``group`` consecutive samples: im2col
    of x [G, C*kh*kw, group*L] against d [G, O, group*L] gives float32 per-group gradients
    [G, O, C*kh*kw], summed in float64 (a last, short group is padded with zero samples). The
    integer operands are converted to float32 and the im2col copy made for a chunk of groups at
    a time (columns of at most ``chunk_bytes``), so no float copy of the whole batch exists.

    Exact when every group's sum is: S_g <= max|d| * max|x| * group * L <= 2**24 (the caller
    chooses ``group`` so), and then the float64 total is exact too (|total| <= 2**24 * G < 2**53).
    """
    n, o, ho, wo = d.shape
    c = x.shape[1]
    columns = c * khw[0] * khw[1]
    length = group * ho * wo
    per_chunk = max(1, chunk_bytes // (4 * columns * length)) * group
    total = torch.zeros((o, columns), dtype=torch.float64)
    for start in range(0, n, per_chunk):
        x_chunk = x[start:start + per_chunk].to(torch.float32)
        d_chunk = d[start:start + per_chunk].to(torch.float32)
        missing = -x_chunk.shape[0] % group
        if missing:
            x_chunk = torch.cat([x_chunk, x_chunk.new_zeros((missing,) + x_chunk.shape[1:])])
            d_chunk = torch.cat([d_chunk, d_chunk.new_zeros((missing,) + d_chunk.shape[1:])])
        groups = d_chunk.shape[0] // group
        # Patches of x as a strided view [n, Ho, Wo, C, kh, kw], copied into [G, C*kh*kw,
        # group*Ho*Wo] (positions innermost): much faster than F.unfold, which loops over samples.
        patches = im2col(x_chunk, tuple(khw), tuple(s), tuple(p))
        cols = (patches.reshape(groups, group, ho, wo, c, *khw).permute(0, 4, 5, 6, 1, 2, 3)
                .reshape(groups, columns, length))
        dg = d_chunk.reshape(groups, group, o, ho * wo).transpose(1, 2).reshape(groups, o, length)
        total += torch.bmm(dg, cols.transpose(1, 2)).sum(0, dtype=torch.float64)
    return total.reshape(o, c, *khw)


class _WeightGradPlanner:
    """Plans (dtype, sample blocks) for weight gradients against one x; the norms of x are
    computed once and shared by the plans of d and of its two halves."""

    def __init__(self, x: torch.Tensor, mx: int, limits: FloatLimits) -> None:
        self.x, self.mx, self.limits = x, mx, limits
        self._lx: torch.Tensor | None = None
        self._sx: torch.Tensor | None = None

    def lx(self) -> torch.Tensor:
        if self._lx is None:
            self._lx = _rows_l1(self.x, (2, 3), self.mx, self.x.shape[2] * self.x.shape[3],
                                self.limits)
        return self._lx

    def sx(self) -> torch.Tensor:
        if self._sx is None:
            self._sx = _rows_sq(self.x, self.mx, self.limits)
        return self._sx

    def plan(self, d: torch.Tensor, md: int, max_blocks: int
             ) -> tuple[int, torch.dtype | None, list[tuple[int, int]]]:
        n, _, ho, wo = d.shape
        mx, limits = self.mx, self.limits
        quick = md * mx * n * ho * wo

        def l1_bounds() -> Bounds:
            ld = _rows_l1(d, (2, 3), md, ho * wo, limits)  # [N, O]
            return [L1Bound(mx, ld), L1Bound(md, self.lx())]

        def cs_bounds() -> Bounds:
            h, w = self.x.shape[2:]
            if md * md * ho * wo > limits.float64 or mx * mx * h * w > limits.float64:
                return []  # the sums of squares themselves would not be exact
            return [CSBound(_rows_sq(d, md, limits), self.sx())]

        dt, blocks = _plan(quick, [l1_bounds, cs_bounds], n, max_blocks, limits)
        return quick, dt, blocks


def _weight_grad_run(d, x, quick, dt, blocks, khw, s, p, chunk_bytes: int, limits: FloatLimits
                     ) -> torch.Tensor:
    """Exact weight gradient (float64 or int64 tensor holding the integer result), the float
    copies of the operands made one block of samples at a time. Blocks are cut further to at
    most ``chunk_bytes`` of float copies (a part of an exact block is exact: its bound is a
    sum over fewer samples)."""
    per_sample = 4 * (d[0].numel() + x[0].numel()) if d.shape[0] else 1
    step = max(1, chunk_bytes // per_sample)
    pieces = [(a, min(a + step, n1)) for n0, n1 in blocks for a in range(n0, n1, step)]
    res = (_weight_grad(d[n0:n1].to(dt), x[n0:n1].to(dt), khw, s, p) for n0, n1 in pieces)
    return next(res) if len(pieces) == 1 else _accumulate(res, quick, limits)


def _float_weight_grad(d: torch.Tensor, x: torch.Tensor, khw, s, p, dtype: torch.dtype,
                       settings: CpuSettings, limits: FloatLimits) -> torch.Tensor:
    """The float path of conv2d_backward_weight (N >= 1): the grouped product, sample blocks,
    or the split of d (see CpuBackend.conv2d_backward_weight), as a ``dtype`` tensor."""
    n, o, ho, wo = d.shape
    c = x.shape[1]
    md, mx = _absmax(d), _absmax(x)
    per_sample = md * mx * ho * wo
    group = min(n, limits.float32 // max(per_sample, 1))
    grouped = per_sample <= limits.float32 and _fp32_is_strict()
    if grouped and c * khw[0] * khw[1] <= settings.grouped_max_columns:
        return _weight_grad_grouped(d, x, khw, s, p, group, settings.grouped_chunk_bytes).to(dtype)
    planner = _WeightGradPlanner(x, mx, limits)
    # Many float32 blocks still beat one float64 call (no oneDNN kernel for float64) as long as
    # the blocks hold a few samples each.
    max_blocks = max(settings.max_f32_blocks_conv, n // settings.min_samples_per_block)
    plan = planner.plan(d, md, max_blocks)
    run = functools.partial(_weight_grad_run, khw=khw, s=s, p=p,
                            chunk_bytes=settings.float_chunk_bytes, limits=limits)
    if plan[1] == torch.float32 and len(plan[2]) <= settings.grouped_min_blocks:
        return run(d, x, *plan).to(dtype)
    if grouped and group <= settings.grouped_max_samples:
        return _weight_grad_grouped(d, x, khw, s, p, group, settings.grouped_chunk_bytes).to(dtype)
    if (_fp32_is_strict() and md >= 16
            and (plan[1] != torch.float32 or len(plan[2]) > settings.split_min_blocks)):
        dl = torch.fmod(d, 16)  # d - 16 * trunc(d / 16), same sign as d, |dl| <= min(|d|, 15)
        dh = (d - dl) >> 4  # trunc(d / 16): d - dl is a multiple of 16, so the shift is exact
        plan_h = planner.plan(dh, md // 16, max_blocks)
        plan_l = planner.plan(dl, min(md, 15), max_blocks)
        if plan_h[1] == plan_l[1] == torch.float32 and (
                plan[1] != torch.float32 or len(plan_h[2]) + len(plan_l[2]) < len(plan[2])):
            gh = run(dh, x, *plan_h).to(torch.int64)
            gl = run(dl, x, *plan_l).to(torch.int64)
            return gh.mul_(16).add_(gl).to(dtype)
    if plan[1] is None:
        return _ref.conv2d_backward_weight(d, x, khw, s, p)
    return run(d, x, *plan).to(dtype)


# ------------------------------------------------------------------------------ the backend

class CpuBackend(Backend):
    """Exact integer products on CPU tensors, on the int8 GEMM or the float units (see the
    module docstring), with the tuned constants of ``settings`` and the exactness limits of
    ``limits`` (default: the proof's, 2**24 and 2**53)."""

    name = "cpu"

    def __init__(self, settings: CpuSettings | None = None,
                 limits: FloatLimits | None = None) -> None:
        if settings is not None and not isinstance(settings, CpuSettings):
            raise TypeError(f"the cpu backend takes CpuSettings, not {type(settings).__name__}")
        if limits is not None and not isinstance(limits, FloatLimits):
            raise TypeError(f"the cpu backend takes FloatLimits, not {type(limits).__name__}")
        self.settings = CpuSettings() if settings is None else settings
        self.limits = FloatLimits() if limits is None else limits

    def __repr__(self) -> str:
        return f"CpuBackend({self.settings!r}, {self.limits!r})"

    def check_device(self, device: torch.device) -> None:
        if device.type != "cpu":
            raise ValueError(f"the cpu backend runs on CPU tensors only, not on {device}; "
                             f"use 'reference' or 'cuda'")

    def _int8_gemm(self, a: torch.Tensor, b: torch.Tensor, channels: int | None = None) -> bool:
        """True when this int8 x int8 product goes to ``torch._int_mm`` (``channels``: the
        smaller channel count of a convolution). On CPUs with AMX-INT8 (Intel Xeon since
        Sapphire Rapids) oneDNN runs it at 0.3-3.2 TOPS, 1.7-11x its float32 GEMM (see
        BENCHMARKS.md); elsewhere (AMD Zen 3: about 3 GOPS) the float path wins."""
        if a.dtype != torch.int8 or b.dtype != torch.int8:
            return False
        if self.settings.use_int8_gemm is not None:
            return self.settings.use_int8_gemm
        return has_amx() and (channels is None
                               or channels >= self.settings.int8_gemm_min_channels)

    # ------------------------------------------------------------------------------- linear

    def _mm_exact(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Exact ``a @ b`` for integer a [M, K], b [K, R] (any strides): a float tensor holding
        the exact integer results, or an int64 tensor."""
        k = a.shape[1]
        ma, mb = _absmax(a), _absmax(b)
        n_grains = min(k, self.settings.mm_grains)
        edges = [(i * k) // n_grains for i in range(n_grains + 1)]

        def parts() -> Bounds:
            # cost_b[g, j] = sum_{k in grain g} |b[k, j]|, bounds S for outputs in column j;
            # cost_a[g, i] = sum_{k in grain g} |a[i, k]|, bounds S for outputs in row i.
            a32, b32 = a.to(torch.int32).abs(), b.to(torch.int32).abs()
            cost_a = torch.stack([a32[:, e0:e1].sum(1, dtype=torch.int64)
                                  for e0, e1 in zip(edges, edges[1:])])
            cost_b = torch.stack([b32[e0:e1].sum(0, dtype=torch.int64)
                                  for e0, e1 in zip(edges, edges[1:])])
            return [L1Bound(ma, cost_b), L1Bound(mb, cost_a)]

        dt, blocks = _plan(ma * mb * k, [parts], n_grains, self.settings.max_f32_blocks_mm,
                           self.limits)
        if dt is None:
            return torch.matmul(a.to(torch.int64), b.to(torch.int64))
        if len(blocks) == 1:
            return torch.matmul(a.to(dt), b.to(dt))
        res = (torch.matmul(a[:, edges[g0]:edges[g1]].to(dt), b[edges[g0]:edges[g1]].to(dt))
               for g0, g1 in blocks)
        return _accumulate(res, ma * mb * k, self.limits)

    def _linear_forward_exact(self, x: torch.Tensor, w: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.dtype]:
        k = _ref.linear_geometry(x, w, "x", "w", 1, 1, "I")
        _check_cpu(x, w)
        if self._int8_gemm(x, w):
            return mm_int32(x, w.t()), torch.int32
        return self._mm_exact(x, w.t()), _ref.narrow_result_dtype(x, w, k)

    def linear_forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x @ w.T``: x [N, I], w [O, I] -> [N, O] (int32 for int8 operands, else int64)."""
        exact, out_dtype = self._linear_forward_exact(x, w)
        return exact.to(out_dtype)

    def _linear_backward_input_exact(self, d: torch.Tensor, w: torch.Tensor
                                     ) -> tuple[torch.Tensor, torch.dtype]:
        k = _ref.linear_geometry(d, w, "d", "w", 1, 0, "O")
        _check_cpu(d, w)
        if self._int8_gemm(d, w):
            return mm_int32(d, w), torch.int32
        return self._mm_exact(d, w), _ref.narrow_result_dtype(d, w, k)

    def linear_backward_input(self, d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``d @ w``: d [N, O], w [O, I] -> [N, I] (int32 for int8 operands, else int64)."""
        exact, out_dtype = self._linear_backward_input_exact(d, w)
        return exact.to(out_dtype)

    def linear_backward_weight(self, d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``d.T @ x``: d [N, O], x [N, I] -> [O, I] (int32 for int8 operands and N <= 131,071,
        else int64)."""
        k = _ref.linear_geometry(d, x, "d", "x", 0, 0, "N")
        dtype = weight_grad_dtype(d, x, k)
        _check_cpu(d, x)
        if self._int8_gemm(d, x):
            return mm_int64(d.t(), x).to(dtype)
        return self._mm_exact(d.t(), x).to(dtype)

    # ------------------------------------------------------------------------------- conv2d

    def _forward_in_chunks(self, x: torch.Tensor, w: torch.Tensor, stride: IntPair = 1,
                           padding: IntPair = 0):
        """(N, chunks) of conv2d_forward for requantize_chunks, or None: one call suffices, or
        the operands are int16, or the reference fall-back is needed."""
        s, p, (n, c, _, _), (o, _, _, _), (ho, wo), out_dtype = _ref.conv_forward_geometry(
            x, w, stride, padding)
        _check_cpu(x, w)
        if out_dtype != torch.int32 or n == 0:
            return None
        conv = self._forward_as_int8_gemm(x, w, stride, padding)
        if conv is not None:
            return n, ((n0, part.permute(0, 3, 1, 2))
                       for n0, part in int8_gemm.conv_chunks(*conv))
        step = self._float_samples_per_chunk(o * ho * wo)
        if step >= n:
            return None  # one float call; its result is requantised directly (exact_to_int8)
        plan = self._forward_float_plan(x, w)
        if plan[0] is None:
            return None
        return n, ((n0, self._forward_float_run(x[n0:n0 + step], w, s, p, *plan))
                   for n0 in range(0, n, step))

    def _backward_input_in_chunks(self, d: torch.Tensor, w: torch.Tensor, input_hw: IntPair,
                                  stride: IntPair = 1, padding: IntPair = 0):
        """(N, chunks) of conv2d_backward_input for requantize_chunks, or None (as above)."""
        s, p, (n, o, _, _), (_, c, _, _), hw, out_dtype = _ref.conv_backward_input_geometry(
            d, w, input_hw, stride, padding)
        _check_cpu(d, w)
        if out_dtype != torch.int32 or n == 0:
            return None
        conv = self._backward_input_as_int8_gemm(d, w, input_hw, stride, padding)
        if conv is not None:
            return n, ((n0, part.permute(0, 3, 1, 2))
                       for n0, part in int8_gemm.conv_chunks(*conv))
        step = self._float_samples_per_chunk(c * hw[0] * hw[1])
        if step >= n:
            return None
        plan = self._backward_input_float_plan(d, w)
        if plan[0] is None:
            return None
        return n, ((n0, self._backward_input_float_run(d[n0:n0 + step], w, hw, s, p, *plan))
                   for n0 in range(0, n, step))

    def _forward_as_int8_gemm(self, x: torch.Tensor, w: torch.Tensor, stride: IntPair = 1,
                              padding: IntPair = 0) -> tuple | None:
        """Arguments of int8_gemm.conv that compute conv2d_forward, or None off that path."""
        s, p, (n, c, _, _), (o, _, _, _), _, _ = _ref.conv_forward_geometry(x, w, stride, padding)
        if n and self._int8_gemm(x, w, min(c, o)):
            return x, w, s, p, self.settings.int8_gemm_chunk_bytes
        return None

    def _backward_input_as_int8_gemm(self, d: torch.Tensor, w: torch.Tensor, input_hw: IntPair,
                                     stride: IntPair = 1, padding: IntPair = 0) -> tuple | None:
        """Arguments of int8_gemm.conv that compute conv2d_backward_input, or None off that
        path. With stride 1 the input gradient is the convolution of d with the kernel flipped
        and its channel axes swapped, padded by k - 1 - p: no scatter-add (col2im) is needed."""
        s, p, (n, o, _, _), (_, c, kh, kw), _, _ = _ref.conv_backward_input_geometry(
            d, w, input_hw, stride, padding)
        if n and s == (1, 1) and p[0] < kh and p[1] < kw and self._int8_gemm(d, w, min(c, o)):
            return (d, w.transpose(0, 1).flip(2, 3), s, (kh - 1 - p[0], kw - 1 - p[1]),
                    self.settings.int8_gemm_chunk_bytes)
        return None

    def conv2d_forward(self, x: torch.Tensor, w: torch.Tensor, stride: IntPair = 1,
                       padding: IntPair = 0) -> torch.Tensor:
        """``conv2d(x, w, stride, padding)``: x [N, C, H, W], w [O, C, kh, kw] -> [N, O, Ho, Wo]
        (int32 for int8 operands, else int64)."""
        exact, out_dtype = self._conv2d_forward_exact(x, w, stride, padding)
        return exact.to(out_dtype).contiguous()

    def _conv2d_forward_exact(self, x: torch.Tensor, w: torch.Tensor, stride: IntPair,
                              padding: IntPair) -> tuple[torch.Tensor, torch.dtype]:
        """conv2d_forward as (float or int32/int64 tensor holding the exact results, result
        dtype)."""
        s, p, (n, c, h, wd), (o, _, kh, kw), (ho, wo), out_dtype = _ref.conv_forward_geometry(
            x, w, stride, padding)
        _check_cpu(x, w)
        conv = self._forward_as_int8_gemm(x, w, stride, padding)
        if conv is not None:
            return int8_gemm.conv(*conv).permute(0, 3, 1, 2), out_dtype
        plan = self._forward_float_plan(x, w)
        if plan[0] is None or n == 0:
            return _ref.conv2d_forward(x, w, s, p), out_dtype
        run = functools.partial(self._forward_float_run, w=w, s=s, p=p, dt=plan[0],
                                blocks=plan[1], quick=plan[2])
        return self._in_sample_chunks(run, x, o * ho * wo), out_dtype

    def _forward_float_plan(self, x: torch.Tensor, w: torch.Tensor
                            ) -> tuple[torch.dtype | None, list[tuple[int, int]], int]:
        """(float dtype, blocks of input channels, quick bound) of a forward convolution, valid
        for every subset of the samples. Blocks (if any) are groups of input channels; the
        bounds of a group are max|x| * max_o sum_{c in group, i, j} |w[o, c, i, j]| and
        max|w| * sum_{c in group} (largest sum of |x[n, c]| over a kh x kw window), see
        _window_l1."""
        c, (kh, kw) = x.shape[1], w.shape[2:]
        mx, mw = _absmax(x), _absmax(w)
        quick = mx * mw * c * kh * kw
        limits = self.limits
        dt, blocks = _plan(quick, [lambda: [L1Bound(mx, _weight_l1(w).t())],
                                   lambda: [L1Bound(mw, _window_l1(x, (kh, kw), mx, limits))]],
                           c, self.settings.max_f32_blocks_conv, limits)
        return dt, blocks, quick

    def _float_samples_per_chunk(self, outputs_per_sample: int) -> int:
        return max(1, self.settings.float_chunk_bytes // (4 * max(1, outputs_per_sample)))

    def _in_sample_chunks(self, run, operand: torch.Tensor, outputs_per_sample: int
                          ) -> torch.Tensor:
        """``run(operand)`` computed on chunks of samples with at most float_chunk_bytes of
        float32 results each, written into one result tensor: oneDNN's own temporaries stay
        those of a chunk."""
        n, step = operand.shape[0], self._float_samples_per_chunk(outputs_per_sample)
        if step >= n:
            return run(operand)
        return stack_sample_chunks(n, ((n0, run(operand[n0:n0 + step]))
                                       for n0 in range(0, n, step)))

    def _forward_float_run(self, x, w, s, p, dt, blocks, quick) -> torch.Tensor:
        xf = x.to(dt)
        with _no_nnpack():
            if len(blocks) == 1:
                return F.conv2d(xf, w.to(dt), None, s, p)
            res = (F.conv2d(xf[:, c0:c1], w[:, c0:c1].to(dt), None, s, p) for c0, c1 in blocks)
            return _accumulate(res, quick, self.limits)

    def conv2d_backward_input(self, d: torch.Tensor, w: torch.Tensor, input_hw: IntPair,
                              stride: IntPair = 1, padding: IntPair = 0) -> torch.Tensor:
        """Gradient of conv2d with respect to its input: d [N, O, Ho, Wo], w [O, C, kh, kw] ->
        [N, C, H, W] (int32 for int8 operands, else int64)."""
        exact, out_dtype = self._conv2d_backward_input_exact(d, w, input_hw, stride, padding)
        return exact.to(out_dtype).contiguous()

    def _conv2d_backward_input_exact(self, d: torch.Tensor, w: torch.Tensor, input_hw: IntPair,
                                     stride: IntPair, padding: IntPair
                                     ) -> tuple[torch.Tensor, torch.dtype]:
        """conv2d_backward_input as (float or int32/int64 tensor of exact results, result
        dtype)."""
        s, p, (n, o, ho, wo), (_, c, kh, kw), hw, out_dtype = _ref.conv_backward_input_geometry(
            d, w, input_hw, stride, padding)
        _check_cpu(d, w)
        conv = self._backward_input_as_int8_gemm(d, w, input_hw, stride, padding)
        if conv is not None:
            return int8_gemm.conv(*conv).permute(0, 3, 1, 2), out_dtype
        plan = self._backward_input_float_plan(d, w)
        if plan[0] is None or n == 0:
            return _ref.conv2d_backward_input(d, w, hw, s, p), out_dtype
        run = functools.partial(self._backward_input_float_run, w=w, hw=hw, s=s, p=p,
                                dt=plan[0], blocks=plan[1], quick=plan[2])
        return self._in_sample_chunks(run, d, c * hw[0] * hw[1]), out_dtype

    def _backward_input_float_plan(self, d: torch.Tensor, w: torch.Tensor
                                   ) -> tuple[torch.dtype | None, list[tuple[int, int]], int]:
        """(float dtype, blocks of output channels, quick bound) of an input gradient, valid for
        every subset of the samples. The bounds of a group of output channels are
        max|d| * max_c sum_{o in group, i, j} |w[o, c, i, j]| and max|w| * sum_{o in group}
        (largest sum of |d[n, o]| over a kh x kw window): the output positions that one input
        position meets lie in such a window (see _window_l1)."""
        o, (kh, kw) = d.shape[1], w.shape[2:]
        md, mw = _absmax(d), _absmax(w)
        quick = md * mw * o * kh * kw
        limits = self.limits
        dt, blocks = _plan(quick, [lambda: [L1Bound(mw, _window_l1(d, (kh, kw), md, limits))],
                                   lambda: [L1Bound(md, _weight_l1(w))]],
                           o, self.settings.max_f32_blocks_conv, limits)
        return dt, blocks, quick

    def _backward_input_float_run(self, d, w, hw, s, p, dt, blocks, quick) -> torch.Tensor:
        df = d.to(dt)
        if len(blocks) == 1:
            return _transposed(df, w.to(dt), hw, s, p)
        res = (_transposed(df[:, o0:o1], w[o0:o1].to(dt), hw, s, p) for o0, o1 in blocks)
        return _accumulate(res, quick, self.limits)

    def conv2d_backward_weight(self, d: torch.Tensor, x: torch.Tensor, kernel_hw: IntPair,
                               stride: IntPair = 1, padding: IntPair = 0) -> torch.Tensor:
        """Gradient of conv2d with respect to its weight: d [N, O, Ho, Wo], x [N, C, H, W] ->
        [O, C, kh, kw], int32 for int8 operands and a reduction N*Ho*Wo of at most 131,071
        terms, else int64.

        The reduction runs over (n, ho, wo). Blocks (if any) are groups of samples, with the
        bounds max|x| * max_o sum_{n in group} ||d[n, o]||_1, max|d| * max_c sum_{n in group}
        ||x[n, c]||_1 and (Cauchy-Schwarz) sqrt(max_o sum_n ||d[n, o]||_2^2 * max_c sum_n
        ||x[n, c]||_2^2): for a fixed (o, c, i, j) each input pixel meets at most one output
        pixel (stride >= 1), so the x-terms of one output are a subset of x[n, c]'s pixels (the
        padding adds zeros).

        Splitting d: when dense, large errors and activations need many sample blocks, d is
        split as d = 16*dh + dl with dh = trunc(d / 16), |dh| <= |d|/16, |dl| <= min(|d|, 15),
        and the gradient is 16*G(dh, x) + G(dl, x): two cheaper plans, usually far fewer calls.
        All of it is integer-valued float arithmetic on exact values (division by 16 and trunc
        are exact).
        """
        s, p, (n, o, ho, wo), (_, c, h, wd), khw = _ref.conv_backward_weight_geometry(
            d, x, kernel_hw, stride, padding)
        _check_cpu(d, x)
        dtype = weight_grad_dtype(d, x, n * ho * wo)
        if n == 0:
            return _ref.conv2d_backward_weight(d, x, khw, s, p)
        if self._int8_gemm(d, x, min(c, o)):
            return int8_gemm.conv_weight_grad(d, x, khw, s, p,
                                              self.settings.int8_gemm_chunk_bytes)
        return _float_weight_grad(d, x, khw, s, p, dtype, self.settings, self.limits)

    # ----------------------------------------------------------------- requantised products

    _EXACT_PRODUCTS = {
        "linear_forward": _linear_forward_exact,
        "linear_backward_input": _linear_backward_input_exact,
        "conv2d_forward": _conv2d_forward_exact,
        "conv2d_backward_input": _conv2d_backward_input_exact,
    }

    _CONVS_IN_CHUNKS = {
        "conv2d_forward": _forward_in_chunks,
        "conv2d_backward_input": _backward_input_in_chunks,
    }

    def product_to_int8(self, name: str, *args) -> tuple[torch.Tensor, torch.Tensor]:
        """``requantize(<name>(*args))`` with nearest rounding to int8, as (int8 values, shift
        as a 0-d int64 tensor): bit-identical to requantising the int32/int64 accumulator, but
        without making it: on the float path from the exact float product (a tensor-sized
        4-byte temporary and two passes over it fewer); convolutions of int8 operands a chunk of
        samples at a time, kept in int16 until the shift is known (requantize_chunks: half the
        memory of the int32 result, and float temporaries of one chunk only)."""
        if name not in self._EXACT_PRODUCTS:
            raise ValueError(f"product_to_int8 takes one of {', '.join(self._EXACT_PRODUCTS)}, "
                             f"not {name!r}")
        in_chunks = self._CONVS_IN_CHUNKS.get(name)
        chunked = in_chunks(self, *args) if in_chunks is not None else None
        if chunked is not None:
            return requantize_chunks(*chunked)
        exact, _ = self._EXACT_PRODUCTS[name](self, *args)
        return exact_to_int8(exact)


def exact_to_int8(exact: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-rounding requantisation to int8 of a tensor holding exact integers: float32
    (|v| <= 2**24), float64 (|v| <= 2**53) or any integer dtype, a slice of samples at a time.
    Consumes ``exact`` (it is scaled in place).

    With ``b`` = bit length of max |y| and ``s = max(b - 7, 0)``: for s = 0 every |y| <= 127
    and the values are cast as they are. Otherwise ``t = trunc(y * 2**(1 - s))`` (scaling by a
    power of two is exact in floats, and the cast truncates) is |y| / 2**(s-1) rounded down in
    magnitude, below 2**8 (int16), and nearest rounding of y / 2**s with ties away from zero is
    ``sign(t) * floor((|t| + 1) / 2)``, because floor((z + 1) / 2) = floor((floor(z) + 1) / 2)
    for z >= 0: one more nearest shift of t, by 1. The clip to [-127, 127] follows as in
    ``requantize``. Integer tensors go to ``requantize`` itself.
    """
    if not exact.is_floating_point():
        q = requantize(exact, torch.zeros((), dtype=torch.int64))
        return q.v, q.e
    if exact.numel() == 0:
        return exact.to(torch.int8), torch.zeros((), dtype=torch.int64)
    low, high = torch.aminmax(exact)
    shift = max(int(max(-low, high)).bit_length() - 7, 0)
    if shift == 0:
        return exact.to(torch.int8), torch.zeros((), dtype=torch.int64)
    values = torch.empty(exact.shape, dtype=torch.int8)
    for rows in cpu_slices(exact):
        halves = exact[rows].mul_(2.0 ** (1 - shift)).to(torch.int16)
        values[rows] = shift_round(halves, 1, "nearest").clamp_(-127, 127)
    return values, torch.tensor(shift, dtype=torch.int64)
