"""The cpu kernel backend: exact integer products on the fastest units the CPU has.

Paths bit-identical to the ``reference`` backend for every input (same dtypes, same values,
same error messages):

* int8 GEMM: where this CPU's ``torch._int_mm`` (int8 x int8 -> int32: oneDNN on AMX-INT8 tiles
  or VNNI dot products) measured at least twice its float32 GEMM (``calibrate``, once per machine,
  cached; on the AMX Xeon of BENCHMARKS.md 0.3-3.2 TOPS, 1.7-11x float32). There int8 products
  go to it: linear layers always, convolutions with at least ``CpuSettings.int8_gemm_min_channels``
  input and output channels (channels-last im2col; the input gradient as the convolution of
  the error, spread by the stride when it is above 1, with the flipped kernel; weight gradients
  in int32 pieces added in int64, as in the cuda backend). Exact with no look at the data: an
  int32 sum of at most 131,071 int8 products cannot wrap.
* int16 operands (DFP16) on the same int8 GEMM units, where int8 products go there: each product
  as four int8 products of the operands' halves (``kernels.int16_gemm``), combined exactly in
  int64.
* direct integer convolutions in C, where no int8 GEMM is taken: stride-1 convolutions of int8
  operands with at most ``CpuSettings.direct_conv_max_columns`` (32) products per output, i.e.
  first layers on 1 or 3 image channels (``numeric.native.conv_direct_forward`` and
  ``conv_direct_weight_grad``: int16 vector loops over zero-padded planes, int32 sums that
  provably cannot wrap, samples added in int64). Such layers are poor GEMMs (a reduction of 25 or
  27 terms) and oneDNN runs them at a few GMAC/s in float32; the kernels are 2-3x faster there
  (``benchmarks/cpu_tuning.py --only direct_conv_max_columns``).
* float units, everywhere else: on CPUs without such units, float32 GEMM and oneDNN float32
  convolution run 10-50x faster than any integer path PyTorch offers (on an AMD Zen 3: int64
  matmul below 1 GOPS, ``torch._int_mm`` about 3 GOPS, per issue 3). This path feeds float copies
  of the integer operands to those kernels and proves, for every call, from the actual operand
  values, that the float result is the exact integer sum (the proof is in ``bounds``).

``product_to_int8`` gives a forward or input-gradient product already requantised to int8 (what
the layers need) without making the int32 accumulator of the float path.

Integer ranges guaranteed (same as every backend): forward / backward-input results are int32
when both operands are int8 (|sum| <= 2**14 * K < 2**31, checked statically for K <= 131,071)
and int64 when an operand is int16; weight gradients the same with K = the batch (times Ho*Wo).
CPU tensors only.

Dense, large errors need more blocks and so more calls than heavy-tailed ones. Speed against
float32 is measured by ``benchmarks/speed.py``; results are in BENCHMARKS.md.

A backend is ``CpuBackend(CpuSettings(...))``: every tuned constant (when to take the int8
GEMM, how many float32 blocks before float64, chunk sizes, ...) is a field of the frozen
:class:`CpuSettings` it holds, each justified by ``benchmarks/cpu_tuning.py``. The exactness
limits 2**24 and 2**53 are not settings: they are the proof's (``F32_EXACT``, ``F64_EXACT``), and
a backend can only be given lower ones (:class:`FloatLimits`, which is how the tests reach the
blocked and fall-back plans on small shapes).

Modules: ``bounds`` (the proof, the bounds and the block planner), ``weight_grad`` (the float
path of convolution weight gradients), ``calibrate`` (whether the int8 GEMM pays here), ``backend`` (:class:`CpuBackend` and its other products),
``settings`` (:class:`CpuSettings`).
"""

from intrain.kernels.cpu.backend import CpuBackend, exact_to_narrow, has_amx
from intrain.kernels.cpu.bounds import F32_EXACT, F64_EXACT, FloatLimits
from intrain.kernels.cpu.settings import CpuSettings

__all__ = ["F32_EXACT", "F64_EXACT", "CpuBackend", "CpuSettings", "FloatLimits", "exact_to_narrow",
           "has_amx"]
