"""The reference kernel backend: exact integer products in int64, the ground truth.

Every operand is cast to int64 and every product is an int64 ``torch.matmul`` on CPU, an int64
multiply-and-sum elsewhere (CUDA has no integer matmul); convolutions go through the integer
:func:`~intrain.kernels.im2col.im2col`. No floating-point tensor is created
anywhere, so the float-free audit (a TorchDispatchMode that fails on any float tensor) passes, and
the same code runs on CPU and CUDA. Clarity over speed: int64 matmul on CPU runs below 1 GOPS
(no SIMD int64 multiply on AVX2), so one LeNet-5 training step's kernels take about 0.16 s at
batch 64 and 0.7 s at batch 256 on one Zen 3 core, 15-20x a float32 step; the cpu backend is
the fast path, this one is the ground truth and the float-free audit path.

Operands: int8 (|v| <= 127 by contract, int8's -128 is tolerated) or int16 tensors, on one
device. Integer ranges guaranteed (K = reduction length):

* ``linear_forward``, ``linear_backward_input``, ``conv2d_forward``,
  ``conv2d_backward_input``: int32 when both operands are int8 (every term is at most
  128*128 = 2**14, so |sum| <= 2**14 * K < 2**31 for K <= 131,071, checked statically: K = I,
  O, C*kh*kw or O*kh*kw), int64 as soon as one operand is int16.
* ``linear_backward_weight``, ``conv2d_backward_weight``: the reduction runs over batch
  [* Ho * Wo]; int32 when both operands are int8 and K <= 131,071 (same bound), else int64
  (which holds it for K < 2**33 even with int16 operands).

Every int64 sum here is bounded by 2**30 * K < 2**63, so nothing wraps: the results are the exact
integer sums. Convolution semantics are exactly those of ``torch.nn.functional.conv2d``
(cross-correlation, zero padding, no dilation, no groups) and of its gradients.
"""

from __future__ import annotations

import torch

from intrain.kernels.im2col import (
    IntPair,
    check_operand,
    check_same_device,
    conv_backward_input_by,
    conv_backward_weight_by,
    conv_forward_by,
    conv_out_size,
    narrow_result_dtype,
    pair,
    weight_grad_dtype,
)

# Patch matrices are int64 (8 bytes per element); convolutions walk the batch in chunks so that
# one chunk's patch matrix stays below this many elements (256 MiB).
_CHUNK_ELEMS = 2**25


# ------------------------------------------------------------- argument checks and geometry
# (shared with the cpu backend, so that both refuse the same inputs with the same messages)

def linear_geometry(a: torch.Tensor, b: torch.Tensor, an: str, bn: str, a_dim: int,
                    b_dim: int, what: str) -> int:
    """Check two 2-d operands whose dimensions ``a_dim`` / ``b_dim`` are reduced; return K."""
    check_operand(a, an, 2)
    check_operand(b, bn, 2)
    check_same_device(a, b)
    if a.shape[a_dim] != b.shape[b_dim]:
        raise ValueError(f"{an} {tuple(a.shape)} and {bn} {tuple(b.shape)} disagree on {what}")
    return a.shape[a_dim]


def conv_forward_geometry(x, w, stride, padding):
    check_operand(x, "x", 4)
    check_operand(w, "w", 4)
    check_same_device(x, w)
    s, p = pair(stride, "stride"), pair(padding, "padding")
    n, c, h, wd = x.shape
    o, cw, kh, kw = w.shape
    if c != cw:
        raise ValueError(f"x has {c} channels but w expects {cw}")
    ho = conv_out_size(h, kh, s[0], p[0], "conv2d height")
    wo = conv_out_size(wd, kw, s[1], p[1], "conv2d width")
    out_dtype = narrow_result_dtype(x, w, c * kh * kw)
    return s, p, tuple(x.shape), tuple(w.shape), (ho, wo), out_dtype


def conv_backward_input_geometry(d, w, input_hw, stride, padding):
    check_operand(d, "d", 4)
    check_operand(w, "w", 4)
    check_same_device(d, w)
    s, p = pair(stride, "stride"), pair(padding, "padding")
    h, wd = pair(input_hw, "input_hw")
    n, o, ho, wo = d.shape
    ow, c, kh, kw = w.shape
    if o != ow:
        raise ValueError(f"d has {o} channels but w has {ow} output channels")
    eho = conv_out_size(h, kh, s[0], p[0], "conv2d height")
    ewo = conv_out_size(wd, kw, s[1], p[1], "conv2d width")
    if (ho, wo) != (eho, ewo):
        raise ValueError(f"d spatial size {(ho, wo)} does not match input_hw {(h, wd)}: "
                         f"expected {(eho, ewo)}")
    out_dtype = narrow_result_dtype(d, w, o * kh * kw)
    return s, p, tuple(d.shape), tuple(w.shape), (h, wd), out_dtype


def conv_backward_weight_geometry(d, x, kernel_hw, stride, padding):
    check_operand(d, "d", 4)
    check_operand(x, "x", 4)
    check_same_device(d, x)
    s, p = pair(stride, "stride"), pair(padding, "padding")
    kh, kw = pair(kernel_hw, "kernel_hw")
    n, o, ho, wo = d.shape
    nx, c, h, wd = x.shape
    if n != nx:
        raise ValueError(f"d has batch {n} but x has batch {nx}")
    eho = conv_out_size(h, kh, s[0], p[0], "conv2d height")
    ewo = conv_out_size(wd, kw, s[1], p[1], "conv2d width")
    if (ho, wo) != (eho, ewo):
        raise ValueError(f"d spatial size {(ho, wo)} does not match x {(h, wd)}: "
                         f"expected {(eho, ewo)}")
    weight_grad_dtype(d, x, n * ho * wo)  # refuses reductions too long for int64
    return s, p, tuple(d.shape), tuple(x.shape), (kh, kw)


def _i64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64)


def _mm64(a: torch.Tensor, b: torch.Tensor, elementwise: bool | None = None) -> torch.Tensor:
    """Exact int64 ``a @ b`` for a [M, K], b [K, R].

    ``torch.matmul`` on int64 is implemented on CPU only (CUDA has no integer GEMM, pytorch
    issue #44428), so elsewhere (or when ``elementwise`` is set, for tests) the product is an
    int64 broadcast multiply and sum, in chunks of at most ``_CHUNK_ELEMS`` products.
    """
    if elementwise is None:
        elementwise = a.device.type != "cpu"
    if not elementwise:
        return torch.matmul(a, b)
    m, k = a.shape
    r = b.shape[1]
    out = torch.zeros((m, r), dtype=torch.int64, device=a.device)
    cols = max(1, min(r, _CHUNK_ELEMS // max(1, k)))
    rows = max(1, _CHUNK_ELEMS // max(1, k * cols))
    for j in range(0, r, cols):
        bj = b[:, j:j + cols].unsqueeze(0)  # [1, K, c]
        for i in range(0, m, rows):
            out[i:i + rows, j:j + cols] = (a[i:i + rows].unsqueeze(2) * bj).sum(1)
    return out


# ----------------------------------------------------------------------------------- linear

def linear_forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T``: x [N, I], w [O, I] -> [N, O] (int32 for int8 operands, else int64)."""
    k = linear_geometry(x, w, "x", "w", 1, 1, "I")
    out_dtype = narrow_result_dtype(x, w, k)
    return _mm64(_i64(x), _i64(w).t()).to(out_dtype)


def linear_backward_input(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``d @ w``: d [N, O], w [O, I] -> [N, I] (int32 for int8 operands, else int64)."""
    k = linear_geometry(d, w, "d", "w", 1, 0, "O")
    out_dtype = narrow_result_dtype(d, w, k)
    return _mm64(_i64(d), _i64(w)).to(out_dtype)


def linear_backward_weight(d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``d.T @ x``: d [N, O], x [N, I] -> [O, I] (int32 for int8 operands and N <= 131,071,
    else int64)."""
    k = linear_geometry(d, x, "d", "x", 0, 0, "N")
    return _mm64(_i64(d).t(), _i64(x)).to(weight_grad_dtype(d, x, k))


# ----------------------------------------------------------------------------------- conv2d

def _chunk(n_rows_per_sample: int, k: int) -> int:
    return max(1, _CHUNK_ELEMS // max(1, n_rows_per_sample * k))


def conv2d_forward(x: torch.Tensor, w: torch.Tensor, stride: IntPair = 1,
                   padding: IntPair = 0) -> torch.Tensor:
    """``conv2d(x, w, stride, padding)``: x [N, C, H, W], w [O, C, kh, kw] -> [N, O, Ho, Wo].

    int32 for int8 operands (K = C*kh*kw <= 131,071), else int64.
    """
    s, p, (n, c, h, wd), (o, _, kh, kw), (ho, wo), out_dtype = conv_forward_geometry(
        x, w, stride, padding)
    if n == 0:
        return torch.zeros((0, o, ho, wo), dtype=out_dtype, device=x.device)
    y = conv_forward_by(_mm64, _i64(x), _i64(w), s, p, (ho, wo), _chunk(ho * wo, c * kh * kw))
    return y.to(out_dtype).contiguous()


def conv2d_backward_input(d: torch.Tensor, w: torch.Tensor, input_hw: IntPair,
                          stride: IntPair = 1, padding: IntPair = 0) -> torch.Tensor:
    """Gradient of conv2d with respect to its input (a transposed convolution).

    d [N, O, Ho, Wo], w [O, C, kh, kw], input_hw = (H, W) of the forward input -> [N, C, H, W],
    int32 for int8 operands (reduction length bounded by O*kh*kw <= 131,071), else int64.
    Rows/columns of the input that no window reached (when (H + 2p - kh) % s != 0) get zero.
    """
    s, p, (n, o, ho, wo), (_, c, kh, kw), (h, wd), out_dtype = conv_backward_input_geometry(
        d, w, input_hw, stride, padding)
    if n == 0:
        return torch.zeros((0, c, h, wd), dtype=out_dtype, device=d.device)
    k = c * kh * kw
    wm = _i64(w).reshape(o, k).t().contiguous().t()  # [O, K], column-major: faster matmul
    g = conv_backward_input_by(_mm64, _i64(d), wm, (kh, kw), (h, wd), s, p, _chunk(ho * wo, k))
    return g.to(out_dtype).contiguous()


def conv2d_backward_weight(d: torch.Tensor, x: torch.Tensor, kernel_hw: IntPair,
                           stride: IntPair = 1, padding: IntPair = 0) -> torch.Tensor:
    """Gradient of conv2d with respect to its weight: d [N, O, Ho, Wo], x [N, C, H, W] ->
    [O, C, kh, kw], int32 for int8 operands when the reduction N*Ho*Wo is at most 131,071 terms,
    else int64."""
    s, p, (n, o, ho, wo), (_, c, h, wd), (kh, kw) = conv_backward_weight_geometry(
        d, x, kernel_hw, stride, padding)
    dtype = weight_grad_dtype(d, x, n * ho * wo)
    if n == 0:
        return torch.zeros((o, c, kh, kw), dtype=dtype, device=d.device)
    g = conv_backward_weight_by(_mm64, _i64(d), _i64(x), (kh, kw), s, p, _chunk(ho * wo, c * kh * kw))
    return g.to(dtype)
