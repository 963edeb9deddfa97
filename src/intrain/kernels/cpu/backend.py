"""The cpu backend's products (:class:`CpuBackend`): the int8 GEMM path, the direct convolutions of
first layers, the float path's linear products and convolutions, and the products requantised
straight to int8."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from intrain.kernels import int8_gemm, int16_gemm
from intrain.kernels import reference as _ref
from intrain.kernels.base import Backend
from intrain.kernels.cpu.calibrate import int8_gemm_pays
from intrain.kernels.cpu.bounds import (Bounds, FloatLimits, L1Bound, absmax, accumulate,
                                        no_nnpack, plan_blocks, static_bound, static_f32_plan,
                                        static_f64_plan, weight_l1, window_l1)
from intrain.kernels.cpu.settings import CpuSettings
from intrain.kernels.cpu.weight_grad import float_weight_grad
from intrain.kernels.im2col import IntPair, stack_sample_chunks, weight_grad_dtype
from intrain.kernels.int_mm import INT32_REDUCTION, mm_int32, mm_int64
from intrain.kernels.cpu.chunks import requantize_chunks
from intrain.numeric import native
from intrain.numeric.accumulate import shift_operand, shift_operands
from intrain.numeric.requant import cpu_shift, cpu_slices, requantize, with_bias
from intrain.numeric.rounding import shift_round


@functools.cache
def has_amx() -> bool:
    """Whether this CPU has AMX-INT8 tile units (where oneDNN runs ``torch._int_mm`` fast)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def _check_cpu(*ts: torch.Tensor) -> None:
    for t in ts:
        if t.device.type != "cpu":
            raise ValueError(f"the cpu backend takes CPU tensors, got one on {t.device}; "
                             f"use the 'reference' or 'cuda' backend")


def _transposed(df: torch.Tensor, wf: torch.Tensor, input_hw, s, p) -> torch.Tensor:
    """Gradient wrt the input of conv2d: a transposed convolution. output_padding picks the
    input size when (H + 2p - kh) % s != 0; it lies in [0, s - 1] as conv_transpose2d needs."""
    kh, kw = wf.shape[2:]
    ho, wo = df.shape[2:]
    op = (input_hw[0] + 2 * p[0] - kh - (ho - 1) * s[0],
          input_hw[1] + 2 * p[1] - kw - (wo - 1) * s[1])
    return F.conv_transpose2d(df, wf, None, s, p, op)


def _spread(d: torch.Tensor, s: tuple[int, int], spread_hw: tuple[int, int]) -> torch.Tensor:
    """d [N, O, Ho, Wo] with its values at rows and columns 0, s, 2s, ... of a zero tensor
    [N, O, spread_hw] (channels-last, the layout the int8 GEMM's im2col reads). A stride-1
    convolution of it with the flipped kernel padded by k - 1 - p is the input gradient of the
    stride-s convolution: each input position then meets exactly the (output, tap) pairs of the
    strided convolution, and zeros elsewhere. ``spread_hw = H + 2p - k + 1`` per axis, which is
    (Ho - 1) * s + 1 plus the rows and columns the forward convolution's floor dropped."""
    n, o = d.shape[:2]
    spread = d.new_zeros((n, *spread_hw, o)).permute(0, 3, 1, 2)
    spread[:, :, ::s[0], ::s[1]] = d
    return spread


def _in_chunks(in_chunks):
    """A convolution's (N, chunks) of int8 operands in chunks of samples from the backend method
    ``in_chunks``, its first operand shifted by ``x_shift`` first (int8 products take no headroom
    shifts), or None off that path."""
    return lambda backend, args, x_shift: in_chunks(backend, shift_operand(args[0], x_shift), *args[1:])


def _on_halves_in_chunks(as_halves):
    """A convolution's (N, chunks) on the int16 halves path (``int16_gemm.conv_chunks``) from the
    backend method ``as_halves`` that gives its arguments there, or None off that path; the first
    operand is shifted by ``x_shift`` a chunk of samples at a time."""
    def in_chunks(backend, args, x_shift):
        conv = as_halves(backend, *args)
        return None if conv is None else (args[0].shape[0], int16_gemm.conv_chunks(*conv, x_shift=x_shift))
    return in_chunks


class CpuBackend(Backend):
    """Exact integer products on CPU tensors, on the int8 GEMM or the float units (see
    :mod:`intrain.kernels.cpu`), with the tuned constants of ``settings`` and the exactness limits of
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
        smaller channel count of a convolution). Automatically when this machine's int8 GEMM
        measured at least twice its float32 GEMM (``calibrate``: AMX-INT8 and VNNI CPUs; not
        AMD Zen 3, where it runs at about 3 GOPS) and the layer is wide enough."""
        if a.dtype != torch.int8 or b.dtype != torch.int8:
            return False
        return self._int8_units(channels)

    def _int8_units(self, channels: int | None) -> bool:
        """Whether products of a layer with ``channels`` (None: a linear layer) go to the int8
        GEMM units, for int8 operands or int16 ones split into int8 halves."""
        if self.settings.use_int8_gemm is not None:
            return self.settings.use_int8_gemm
        return ((channels is None or channels >= self.settings.int8_gemm_min_channels)
                and int8_gemm_pays())

    def _int16_halves(self, a: torch.Tensor, b: torch.Tensor, channels: int | None = None,
                      terms: int | None = None) -> bool:
        """True when this int16 x int16 product goes to the int8 GEMM as four products of int8
        halves (``int16_gemm``): where int8 products go there (four of them cost what two float32
        products do at the 2x speed-up ``auto`` asks for, about one float64 product, the float
        path's exact fall-back for such operands) and a convolution's reduction (``terms``) is
        one int32 piece."""
        if a.dtype != torch.int16 or b.dtype != torch.int16:
            return False
        if terms is not None and terms > INT32_REDUCTION:
            return False
        return self._int8_units(channels)

    # ------------------------------------------------------------------------------- linear

    def _mm_exact(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Exact ``a @ b`` for integer a [M, K], b [K, R] (any strides): a float tensor holding
        the exact integer results, or an int64 tensor."""
        k = a.shape[1]
        if k == 0:  # an empty reduction (a weight gradient of an empty data-parallel shard)
            return torch.zeros((a.shape[0], b.shape[1]), dtype=torch.int64)
        if static_f32_plan(a.dtype, b.dtype, k, self.limits) is not None:
            return torch.matmul(a.to(torch.float32), b.to(torch.float32))
        if static_f64_plan(a.dtype, b.dtype, k, self.limits) is not None:
            return torch.matmul(a.to(torch.float64), b.to(torch.float64))
        ma, mb = absmax(a), absmax(b)
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

        dt, blocks = plan_blocks(ma * mb * k, [parts], n_grains,
                                 self.settings.max_f32_blocks_mm, self.limits)
        if dt is None:
            return torch.matmul(a.to(torch.int64), b.to(torch.int64))
        if len(blocks) == 1:
            return torch.matmul(a.to(dt), b.to(dt))
        res = (torch.matmul(a[:, edges[g0]:edges[g1]].to(dt), b[edges[g0]:edges[g1]].to(dt))
               for g0, g1 in blocks)
        return accumulate(res, ma * mb * k, self.limits)

    def _weight_product_exact(self, a: torch.Tensor, w: torch.Tensor, rhs: torch.Tensor, k: int
                              ) -> tuple[torch.Tensor, torch.dtype]:
        """``a @ rhs`` exactly, ``rhs`` being ``w`` or its transpose, a reduction over ``k`` terms,
        with the dtype the result is to take: through the int8 GEMM when it applies to (a, w)."""
        _check_cpu(a, w)
        out_dtype = _ref.narrow_result_dtype(a, w, k)  # refuses int8 reductions int32 cannot hold
        if self._int8_gemm(a, w):
            return mm_int32(a, rhs, pad=False), out_dtype
        if self._int16_halves(a, w):
            return int16_gemm.mm(a, rhs), out_dtype
        return self._mm_exact(a, rhs), out_dtype

    def _linear_forward_exact(self, x: torch.Tensor, w: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.dtype]:
        k = _ref.linear_geometry(x, w, "x", "w", 1, 1, "I")
        return self._weight_product_exact(x, w, w.t(), k)

    def linear_forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x @ w.T``: x [N, I], w [O, I] -> [N, O] (int32 for int8 operands, else int64)."""
        exact, out_dtype = self._linear_forward_exact(x, w)
        return exact.to(out_dtype)

    def _linear_backward_input_exact(self, d: torch.Tensor, w: torch.Tensor
                                     ) -> tuple[torch.Tensor, torch.dtype]:
        k = _ref.linear_geometry(d, w, "d", "w", 1, 0, "O")
        return self._weight_product_exact(d, w, w, k)

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
            if k <= INT32_REDUCTION:  # one int32 product, no int64 copy of it and back
                return mm_int32(d.t(), x, pad=False)
            return mm_int64(d.t(), x, pad=False).to(dtype)
        if self._int16_halves(d, x):
            return int16_gemm.mm(d.t(), x)
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
            return None  # one call; its result is requantised directly (exact_to_narrow)
        if self._direct(x, w, s, p):
            buffer = torch.empty((step, o, ho, wo), dtype=torch.int32)  # each chunk is kept before the next
            return n, ((n0, native.conv_direct_forward(x[n0:n0 + step], w, p, buffer[:min(step, n - n0)]))
                       for n0 in range(0, n, step))
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

    def _direct(self, x: torch.Tensor, other: torch.Tensor, stride: IntPair, padding: IntPair,
                kernel_hw: IntPair | None = None) -> bool:
        """Whether a convolution of input ``x`` with ``other`` (its weight, or for a weight gradient
        its errors, with ``kernel_hw``), where no int8 GEMM is taken, runs on the C kernels for few
        input channels (``native.conv_direct_forward``): stride 1 and at most
        ``direct_conv_max_columns`` products per output, besides what the kernels need."""
        khw = tuple(other.shape[2:]) if kernel_hw is None else kernel_hw
        return (stride == (1, 1) and x.shape[1] * khw[0] * khw[1] <= self.settings.direct_conv_max_columns
                and native.direct_conv_applies(x, other, khw, padding))

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
        and its channel axes swapped, padded by k - 1 - p: no scatter-add (col2im) is needed.
        With stride s > 1 it is the same convolution of d spread out by s (``_spread``): the
        zeros between add nothing to any sum, so it stays exact (s*s times the products of the
        true reduction, on units that run int8 products several times faster than float)."""
        s, p, (n, o, _, _), (_, c, kh, kw), hw, _ = _ref.conv_backward_input_geometry(
            d, w, input_hw, stride, padding)
        if n and p[0] < kh and p[1] < kw and self._int8_gemm(d, w, min(c, o)):
            return self._input_gradient_as_convolution(d, w, hw, s, p)
        return None

    def _forward_as_halves(self, x: torch.Tensor, w: torch.Tensor, stride: IntPair = 1,
                           padding: IntPair = 0) -> tuple | None:
        """Arguments of int16_gemm.conv that compute conv2d_forward of int16 operands, or None
        off that path."""
        s, p, (n, c, _, _), (o, _, kh, kw), _, _ = _ref.conv_forward_geometry(x, w, stride, padding)
        if n and self._int16_halves(x, w, min(c, o), c * kh * kw):
            return x, w, s, p, self.settings.int8_gemm_chunk_bytes
        return None

    def _backward_input_as_halves(self, d: torch.Tensor, w: torch.Tensor, input_hw: IntPair,
                                  stride: IntPair = 1, padding: IntPair = 0) -> tuple | None:
        """Arguments of int16_gemm.conv that compute conv2d_backward_input of int16 operands (the
        same convolution as ``_backward_input_as_int8_gemm``), or None off that path."""
        s, p, (n, o, _, _), (_, c, kh, kw), hw, _ = _ref.conv_backward_input_geometry(
            d, w, input_hw, stride, padding)
        if n and p[0] < kh and p[1] < kw and self._int16_halves(d, w, min(c, o), o * kh * kw):
            return self._input_gradient_as_convolution(d, w, hw, s, p)
        return None

    def _input_gradient_as_convolution(self, d: torch.Tensor, w: torch.Tensor, hw: IntPair,
                                       s: IntPair, p: IntPair) -> tuple:
        """(d spread by the stride, flipped kernel with swapped channel axes, stride 1, padding,
        chunk bytes): a convolution that is the input gradient (``_backward_input_as_int8_gemm``)."""
        kh, kw = w.shape[2:]
        if s != (1, 1):
            d = _spread(d, s, (hw[0] + 2 * p[0] - kh + 1, hw[1] + 2 * p[1] - kw + 1))
        return (d, w.transpose(0, 1).flip(2, 3), (1, 1), (kh - 1 - p[0], kw - 1 - p[1]),
                self.settings.int8_gemm_chunk_bytes)

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
        conv = self._forward_as_halves(x, w, stride, padding)
        if conv is not None:
            return int16_gemm.conv(*conv), out_dtype
        if self._direct(x, w, s, p):
            return native.conv_direct_forward(x, w, p), out_dtype
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
        window_l1."""
        c, (kh, kw) = x.shape[1], w.shape[2:]
        static = static_f32_plan(x.dtype, w.dtype, c * kh * kw, self.limits)
        if static is not None:
            return torch.float32, [(0, c)], static
        static = static_f64_plan(x.dtype, w.dtype, c * kh * kw, self.limits)
        if static is not None:
            return torch.float64, [(0, c)], static
        mx, mw = absmax(x), absmax(w)
        quick = mx * mw * c * kh * kw
        limits = self.limits
        dt, blocks = plan_blocks(
            quick, [lambda: [L1Bound(mx, weight_l1(w).t())],
                    lambda: [L1Bound(mw, window_l1(x, (kh, kw), mx, limits))]],
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
        with no_nnpack():
            if len(blocks) == 1:
                return F.conv2d(xf, w.to(dt), None, s, p)
            res = (F.conv2d(xf[:, c0:c1], w[:, c0:c1].to(dt), None, s, p) for c0, c1 in blocks)
            return accumulate(res, quick, self.limits)

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
        conv = self._backward_input_as_halves(d, w, input_hw, stride, padding)
        if conv is not None:
            return int16_gemm.conv(*conv), out_dtype
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
        position meets lie in such a window (see window_l1)."""
        o, (kh, kw) = d.shape[1], w.shape[2:]
        static = static_f32_plan(d.dtype, w.dtype, o * kh * kw, self.limits)
        if static is not None:
            return torch.float32, [(0, o)], static
        static = static_f64_plan(d.dtype, w.dtype, o * kh * kw, self.limits)
        if static is not None:
            return torch.float64, [(0, o)], static
        md, mw = absmax(d), absmax(w)
        quick = md * mw * o * kh * kw
        limits = self.limits
        dt, blocks = plan_blocks(
            quick, [lambda: [L1Bound(mw, window_l1(d, (kh, kw), md, limits))],
                    lambda: [L1Bound(md, weight_l1(w))]],
            o, self.settings.max_f32_blocks_conv, limits)
        return dt, blocks, quick

    def _backward_input_float_run(self, d, w, hw, s, p, dt, blocks, quick) -> torch.Tensor:
        df = d.to(dt)
        if len(blocks) == 1:
            return _transposed(df, w.to(dt), hw, s, p)
        res = (_transposed(df[:, o0:o1], w[o0:o1].to(dt), hw, s, p) for o0, o1 in blocks)
        return accumulate(res, quick, self.limits)

    def shifted_product(self, name: str, args: tuple, shifts: tuple[int, int]) -> torch.Tensor:
        """``Backend.shifted_product``; a convolution's weight gradient on the int16 halves path
        shifts d and x a chunk of samples at a time as it splits them (``int16_gemm``): shifted
        copies of both whole operands were 16 MiB each at VGG-small-7's 128-channel layers."""
        if name == "conv2d_backward_weight":
            return self._conv2d_backward_weight(*args, shifts=shifts)
        return super().shifted_product(name, args, shifts)

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
        return self._conv2d_backward_weight(d, x, kernel_hw, stride, padding)

    def _conv2d_backward_weight(self, d: torch.Tensor, x: torch.Tensor, kernel_hw: IntPair,
                                stride: IntPair = 1, padding: IntPair = 0,
                                shifts: tuple[int, int] = (0, 0)) -> torch.Tensor:
        s, p, (n, o, ho, wo), (_, c, h, wd), khw = _ref.conv_backward_weight_geometry(
            d, x, kernel_hw, stride, padding)
        _check_cpu(d, x)
        if n and self._int16_halves(d, x, min(c, o), ho * wo):
            return int16_gemm.conv_weight_grad(d, x, khw, s, p, self.settings.int8_gemm_chunk_bytes, shifts)
        d, x = shift_operands((d, x), shifts)
        dtype = weight_grad_dtype(d, x, n * ho * wo)
        if n == 0:
            return _ref.conv2d_backward_weight(d, x, khw, s, p)
        if self._int8_gemm(d, x, min(c, o)):
            return int8_gemm.conv_weight_grad(d, x, khw, s, p,
                                              self.settings.int8_gemm_chunk_bytes)
        if self._direct(x, d, s, p, khw):
            return native.conv_direct_weight_grad(d, x, khw, p).to(dtype)
        return float_weight_grad(d, x, khw, s, p, dtype, self.settings, self.limits)

    # ----------------------------------------------------------------- requantised products

    _EXACT_PRODUCTS = {
        "linear_forward": _linear_forward_exact,
        "linear_backward_input": _linear_backward_input_exact,
        "conv2d_forward": _conv2d_forward_exact,
        "conv2d_backward_input": _conv2d_backward_input_exact,
    }

    #: Result bits -> the convolutions whose requantised result is made a chunk of samples at a
    #: time, as (N, chunks) for requantize_chunks, or None off their path.
    _CONVS_IN_CHUNKS = {
        8: {"conv2d_forward": _in_chunks(_forward_in_chunks),
            "conv2d_backward_input": _in_chunks(_backward_input_in_chunks)},
        16: {"conv2d_forward": _on_halves_in_chunks(_forward_as_halves),
             "conv2d_backward_input": _on_halves_in_chunks(_backward_input_as_halves)},
    }

    def product_to_int8(self, name: str, *args, reduce_max=None, shifts: tuple[int, int] = (0, 0),
                        rectify: bool = False, bias: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """``requantize(shifted_product(name, args, shifts))`` with nearest rounding to int8, as
        (int8 values, shift as a 0-d int64 tensor): bit-identical to requantising the int32/int64
        accumulator, but without making it: on the float path from the exact float product (a
        tensor-sized 4-byte temporary and two passes over it fewer); convolutions of int8 operands a chunk of
        samples at a time, kept in int16 until the shift is known (requantize_chunks: half the
        memory of the int32 result, and float temporaries of one chunk only). ``reduce_max``:
        for a shard of a batch, the shift is the whole batch's (``numeric.requant``). ``bias``
        (``numeric.requant.requantize_product``) is added to each chunk, widened to int64 (a
        chunk-sized copy), before anything is rounded."""
        return self._product_to_narrow(name, args, 8, reduce_max, shifts, rectify, bias)

    def product_to_int16(self, name: str, *args, reduce_max=None, shifts: tuple[int, int] = (0, 0),
                         rectify: bool = False, bias: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """``requantize(shifted_product(name, args, shifts))`` with nearest rounding to int16, as
        (int16 values, shift as a 0-d int64 tensor), bit-identical to requantising the int64
        accumulator: convolutions of int16 operands on the halves path a chunk of samples at a
        time, each kept in int32 until the shift is known (``requantize_chunks``: half the memory
        of the int64 result), every other product from its exact result (a float one without an
        int64 copy); on the halves path the first operand's headroom shift is applied a chunk at a
        time too (no shifted copy of a whole activation or error). ``reduce_max``, ``bias``: as in
        ``product_to_int8``."""
        return self._product_to_narrow(name, args, 16, reduce_max, shifts, rectify, bias)

    def _product_to_narrow(self, name: str, args: tuple, bits: int, reduce_max, shifts: tuple[int, int],
                           rectify: bool, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self._EXACT_PRODUCTS:
            raise ValueError(f"product_to_int{bits} takes one of {', '.join(self._EXACT_PRODUCTS)}, "
                             f"not {name!r}")
        # The second operand of these products is a weight, small: shifted whole, once.
        args = shift_operands(args, (0, shifts[1]))
        in_chunks = self._CONVS_IN_CHUNKS[bits].get(name)
        chunked = in_chunks(self, args, shifts[0]) if in_chunks is not None else None
        if chunked is not None:
            n, chunks = chunked
            if bias is not None:
                bound = product_bound(name, *args[:2])
                chunks = ((n0, exact_with_bias(part, bias, bound)) for n0, part in chunks)
            if rectify:  # each chunk is the backend's own buffer (or its biased copy), consumed by the rounding
                chunks = ((n0, part.clamp_(min=0)) for n0, part in chunks)
            return requantize_chunks(n, chunks, reduce_max=reduce_max, bits=bits)
        exact, _ = self._EXACT_PRODUCTS[name](self, *shift_operands(args, (shifts[0], 0)))
        if bias is not None:
            exact = exact_with_bias(exact, bias, product_bound(name, *args[:2]))
        return exact_to_narrow(exact.clamp_(min=0) if rectify else exact, reduce_max, bits=bits)


#: Largest magnitude up to which a float type holds every integer exactly.
_EXACT_FLOAT = {torch.float32: 2**24, torch.float64: 2**53}


def product_bound(name: str, operand: torch.Tensor, weight: torch.Tensor) -> int:
    """An upper bound on the magnitude of every entry of the product ``name`` (one of
    ``_EXACT_PRODUCTS``) of the integer tensors ``operand`` and ``weight`` ([O, I] or
    [O, C, kh, kw]), from their types alone (``bounds.static_bound``): a forward entry sums over
    all of one output channel's weights (I, or C*kh*kw terms), an input error's entry over at
    most all of one input channel's (O, or O*kh*kw: fewer where the stride skips some). A headroom
    shift of ``operand`` only lowers the true maximum."""
    terms = weight.numel() // weight.shape[0 if name.endswith("forward") else 1]
    return static_bound(operand.dtype, weight.dtype, terms)


def exact_with_bias(exact: torch.Tensor, bias: torch.Tensor, bound: int | None = None) -> torch.Tensor:
    """``numeric.requant.with_bias`` for this backend's exact products, which may be integers held
    in float32 or float64: in place in the float type when ``max|exact| + max|bias|`` is within
    the integers it holds exactly (an aligned bias has at most 16 significant bits, so it is exact
    there too), else in int64; ``bound``: ``product_bound`` of the product, which spares the pass
    that measures ``max|exact|`` wherever it leaves the room (every int8 product held in int32 or
    in float32 up to 1,024 terms, every 16-bit one held in float64). In place, a 16-bit product
    requantised whole makes no int64 copy (64 MiB at VGG-small-7's widest DFP16 layer, batch 64:
    ``python benchmarks/speed.py --model vgg-small-7 --batch 64 --arith dfp16``, peak memory)."""
    return with_bias(exact, bias, _EXACT_FLOAT[exact.dtype] if exact.is_floating_point() else None, bound)


def exact_to_narrow(exact: torch.Tensor, reduce_max=None, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-rounding requantisation to int8 (or, with ``bits=16``, to int16: DFP16) of a tensor
    holding exact integers: float32 (|v| <= 2**24), float64 (|v| <= 2**53) or any integer dtype,
    a slice of samples at a time. Consumes ``exact`` (it is scaled in place).

    With ``b`` = bit length of max |y| and ``s = max(b - (bits - 1), 0)``: for s = 0 every |y|
    fits the result and the values are cast as they are. Otherwise ``t = trunc(y * 2**(1 - s))``
    (scaling by a power of two is exact in floats, and the cast truncates) is |y| / 2**(s-1)
    rounded down in magnitude, below 2**bits (int16, or int32 for 16 bits), and nearest rounding
    of y / 2**s with ties away from zero is ``sign(t) * floor((|t| + 1) / 2)``, because
    floor((z + 1) / 2) = floor((floor(z) + 1) / 2) for z >= 0: one more nearest shift of t, by 1.
    The clip to the symmetric range follows as in ``requantize``. Integer tensors go to
    ``requantize`` itself. ``reduce_max``: for a shard of a batch, b is the whole batch's
    (``numeric.requant``); an empty shard still takes part.
    """
    if not exact.is_floating_point():
        q = requantize(exact, torch.zeros((), dtype=torch.int64), bits=bits, reduce_max=reduce_max)
        return q.v, q.e
    result, halved = {8: (torch.int8, torch.int16), 16: (torch.int16, torch.int32)}[bits]
    limit = 2 ** (bits - 1) - 1
    shift = cpu_shift(exact, bits, reduce_max)
    values = native.round_shift(exact, shift, "nearest", limit, result)  # one C pass, same bits
    if values is not None:
        return values, torch.tensor(shift, dtype=torch.int64)
    if shift == 0:
        return exact.to(result), torch.zeros((), dtype=torch.int64)
    values = torch.empty(exact.shape, dtype=result)
    for rows in cpu_slices(exact):
        halves = exact[rows].mul_(2.0 ** (1 - shift)).to(halved)
        values[rows] = shift_round(halves, 1, "nearest").clamp_(-limit, limit)
    return values, torch.tensor(shift, dtype=torch.int64)
