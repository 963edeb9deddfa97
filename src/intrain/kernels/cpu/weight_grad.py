"""The cpu backend's float path for convolution weight gradients: sample blocks, the grouped
product, and the split of the errors (see CpuBackend.conv2d_backward_weight and bounds.py).

Weight gradients of narrow convolutions (at most ``grouped_max_columns`` weights per output
channel), or whose per-sample reduction is so long that a group holds one sample and whose block
plan needs more than ``grouped_min_blocks`` calls, take a shortcut: when
``max|d| * max|x| * Ho * Wo <= 2**24`` the sum over a group of
``g = floor(2**24 / (max|d| * max|x| * Ho * Wo))`` samples is exact in float32, so one batched
product over im2col columns gives exact per-group gradients, added in float64 (exact: the total
is at most 2**24 * N / g).
"""

from __future__ import annotations

import functools

import torch

from intrain.kernels import reference as _ref
from intrain.kernels.cpu.bounds import (Bounds, CSBound, FloatLimits, L1Bound, absmax,
                                        accumulate, fp32_is_strict, plan_blocks, rows_l1, rows_sq,
                                        static_f64_plan)
from intrain.kernels.cpu.settings import CpuSettings
from intrain.kernels.im2col import im2col


def _aten_weight_grad(df: torch.Tensor, xf: torch.Tensor, khw, s, p) -> torch.Tensor:
    o, c = df.shape[1], xf.shape[1]
    wshape = xf.new_zeros((o, c) + tuple(khw))  # only its shape is used
    return torch.ops.aten.convolution_backward(
        df, xf, wshape, None, list(s), list(p), [1, 1], False, [0, 0], 1, [False, True, False]
    )[1]


def grouped_weight_grad(d: torch.Tensor, x: torch.Tensor, khw, s, p, group: int,
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


class WeightGradPlanner:
    """Plans (dtype, sample blocks) for weight gradients against one x; the norms of x are
    computed once and shared by the plans of d and of its two halves."""

    def __init__(self, x: torch.Tensor, mx: int, limits: FloatLimits) -> None:
        self.x, self.mx, self.limits = x, mx, limits
        self._lx: torch.Tensor | None = None
        self._sx: torch.Tensor | None = None

    def lx(self) -> torch.Tensor:
        if self._lx is None:
            self._lx = rows_l1(self.x, (2, 3), self.mx, self.x.shape[2] * self.x.shape[3],
                               self.limits)
        return self._lx

    def sx(self) -> torch.Tensor:
        if self._sx is None:
            self._sx = rows_sq(self.x, self.mx, self.limits)
        return self._sx

    def plan(self, d: torch.Tensor, md: int, max_blocks: int
             ) -> tuple[int, torch.dtype | None, list[tuple[int, int]]]:
        n, _, ho, wo = d.shape
        mx, limits = self.mx, self.limits
        quick = md * mx * n * ho * wo

        def l1_bounds() -> Bounds:
            ld = rows_l1(d, (2, 3), md, ho * wo, limits)  # [N, O]
            return [L1Bound(mx, ld), L1Bound(md, self.lx())]

        def cs_bounds() -> Bounds:
            h, w = self.x.shape[2:]
            if md * md * ho * wo > limits.float64 or mx * mx * h * w > limits.float64:
                return []  # the sums of squares themselves would not be exact
            return [CSBound(rows_sq(d, md, limits), self.sx())]

        dt, blocks = plan_blocks(quick, [l1_bounds, cs_bounds], n, max_blocks, limits)
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
    res = (_aten_weight_grad(d[n0:n1].to(dt), x[n0:n1].to(dt), khw, s, p) for n0, n1 in pieces)
    return next(res) if len(pieces) == 1 else accumulate(res, quick, limits)


def float_weight_grad(d: torch.Tensor, x: torch.Tensor, khw, s, p, dtype: torch.dtype,
                      settings: CpuSettings, limits: FloatLimits) -> torch.Tensor:
    """The float path of conv2d_backward_weight (N >= 1): the grouped product, sample blocks,
    or the split of d (see CpuBackend.conv2d_backward_weight), as a ``dtype`` tensor."""
    n, o, ho, wo = d.shape
    c = x.shape[1]
    run = functools.partial(_weight_grad_run, khw=khw, s=s, p=p,
                            chunk_bytes=settings.float_chunk_bytes, limits=limits)
    static = static_f64_plan(d.dtype, x.dtype, n * ho * wo, limits)
    if static is not None:  # an int16 operand: straight to float64, no plan (bounds.static_f64_plan)
        return run(d, x, static, torch.float64, [(0, n)]).to(dtype)
    md, mx = absmax(d), absmax(x)
    per_sample = md * mx * ho * wo
    group = min(n, limits.float32 // max(per_sample, 1))
    grouped = per_sample <= limits.float32 and fp32_is_strict()
    if grouped and c * khw[0] * khw[1] <= settings.grouped_max_columns:
        return grouped_weight_grad(d, x, khw, s, p, group, settings.grouped_chunk_bytes).to(dtype)
    planner = WeightGradPlanner(x, mx, limits)
    # Many float32 blocks still beat one float64 call (no oneDNN kernel for float64) as long as
    # the blocks hold a few samples each.
    max_blocks = max(settings.max_f32_blocks_conv, n // settings.min_samples_per_block)
    plan = planner.plan(d, md, max_blocks)
    if plan[1] == torch.float32 and len(plan[2]) <= settings.grouped_min_blocks:
        return run(d, x, *plan).to(dtype)
    if grouped and group <= settings.grouped_max_samples:
        return grouped_weight_grad(d, x, khw, s, p, group, settings.grouped_chunk_bytes).to(dtype)
    if (fp32_is_strict() and md >= 16
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
