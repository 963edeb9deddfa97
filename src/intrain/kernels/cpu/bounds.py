"""The cpu backend's float path: why its float results are exact, and the block planner.

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
(Winograd, FFT: NNPACK, which the backend switches off around its calls; oneDNN as PyTorch calls
it uses ``convolution_direct``) and reduced-precision modes (TF32/BF16 "fast math": if any of
PyTorch's float32 precision settings or oneDNN's fpmath environment variables ask for them, the
backend uses float64 only, which no such mode touches: ``fp32_is_strict``).

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
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from intrain.numeric.requant import cpu_slices

F32_EXACT = 2**24  # float32 holds every integer of magnitude <= 2**24
F64_EXACT = 2**53  # float64 holds every integer of magnitude <= 2**53


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


def fp32_is_strict() -> bool:
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


def no_nnpack():
    # NNPACK (Winograd/FFT, inexact) is only picked for float32 forward convolutions when oneDNN
    # is not (oneDNN disabled by the user); switch it off around our calls whenever it is on.
    # The flag is process-global: a float convolution run concurrently in another thread
    # during our call would also run without NNPACK, which is harmless.
    if torch._C._get_nnpack_enabled():
        return torch.backends.nnpack.flags(enabled=False)
    return nullcontext()


def magnitude_limit(dtype: torch.dtype) -> int:
    """The largest magnitude an integer ``dtype`` holds (int8: 128, for its -128)."""
    return -torch.iinfo(dtype).min


def static_bound(a_dtype: torch.dtype, b_dtype: torch.dtype, terms: int) -> int:
    """``max|a| max|b| terms`` from the integer dtypes alone: the most any sum of ``terms``
    products of such operands can reach in magnitude (int8 x int8: ``128 * 128 * terms``)."""
    return magnitude_limit(a_dtype) * magnitude_limit(b_dtype) * terms


def static_f32_plan(a_dtype: torch.dtype, b_dtype: torch.dtype, terms: int, limits: FloatLimits) -> int | None:
    """The bound ``S <= max|a| max|b| terms`` from the dtypes alone when it is small enough for one
    float32 product (and float32 products are strict), else None. It needs no pass over the
    operands: at int8 x int8, ``128 * 128 * terms <= 2**24`` for every reduction of up to 1,024
    terms, so an MLP's or LeNet-5's products skip the two maxima a data-dependent plan reads
    (``python benchmarks/native_speed.py``, BENCHMARKS.md)."""
    bound = static_bound(a_dtype, b_dtype, terms)
    return bound if bound <= limits.float32 and fp32_is_strict() else None


def static_f64_plan(a_dtype: torch.dtype, b_dtype: torch.dtype, terms: int, limits: FloatLimits) -> int | None:
    """For a product with an int16 operand (DFP16), the bound ``S <= max|a| max|b| terms`` from
    the dtypes alone when one float64 product holds it exactly (int16 x int16: up to 2**23 terms),
    else None. Such products rarely fit float32 blocks (one term can reach 2**30), so reading the
    operands' maxima and sums to plan blocks mostly ends in float64 anyway; on LeNet-5's small
    convolutions the plan cost more than the float64 product (``python benchmarks/speed.py --model
    lenet5 --batch 64 --arith dfp16``, BENCHMARKS.md)."""
    if torch.int16 not in (a_dtype, b_dtype):
        return None
    bound = static_bound(a_dtype, b_dtype, terms)
    return bound if bound <= limits.float64 else None


def absmax(t: torch.Tensor) -> int:
    """max |t| as a Python int (handles int8's -128 without overflow)."""
    if t.numel() == 0:
        return 0
    mn, mx = torch.aminmax(t)
    return max(-int(mn), int(mx))


def rows_sq(t: torch.Tensor, amax: int, limits: FloatLimits) -> torch.Tensor:
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


def rows_l1(t: torch.Tensor, dims: Sequence[int], amax: int, count: int,
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


def greedy_blocks(bounds: Bounds, n_grains: int, budget: int, max_blocks: int | None
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


def plan_blocks(quick: int, bound_fns: Sequence[Callable[[], Bounds]], n_grains: int,
                max_f32_blocks: int, limits: FloatLimits
                ) -> tuple[torch.dtype | None, list[tuple[int, int]]]:
    """Choose (float dtype, blocks of grains); dtype None means: use the int64 reference.

    ``quick`` is max|a| * max|b| * K >= S. ``bound_fns`` produce finer bounds, computed lazily in
    order (cheapest first) while the float32 plan still needs more than one block. Bounds from a
    ``bound_fns`` entry after the first are only used for float32 plans (they may use float32
    products, which are only trusted in strict mode).
    """
    whole = [(0, n_grains)]
    strict = fp32_is_strict()
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
            blocks = greedy_blocks(bounds, n_grains, limits.float32, max_f32_blocks)
            if blocks is not None:
                best = blocks
                if len(blocks) == 1:
                    break
        if best is not None:
            return torch.float32, best
    if quick <= limits.float64:
        return torch.float64, whole
    blocks = greedy_blocks(first, n_grains, limits.float64, None)
    if blocks is not None:
        return torch.float64, blocks
    return None, whole


def accumulate(results, quick: int, limits: FloatLimits) -> torch.Tensor:
    """Sum block results, each exact. In float64 when ``quick`` (>= S, which bounds every partial
    sum of block results) is <= 2**53, as always for int8 operands; in int64 otherwise."""
    wide = torch.float64 if quick <= limits.float64 else torch.int64
    acc = None
    for r in results:
        acc = r.to(wide) if acc is None else acc.add_(r.to(wide) if wide == torch.int64 else r)
    return acc


# ----------------------------------------------------------------------- conv2d bounds

def weight_l1(w: torch.Tensor) -> torch.Tensor:
    """[O, C] int64: sum over the kernel window of |w[o, c]| (weights are small: int32 is fine)."""
    return w.to(torch.int32).abs().sum(dim=(2, 3), dtype=torch.int64)


def window_l1(t: torch.Tensor, window: tuple[int, int], amax: int, limits: FloatLimits
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
