"""Integer 2-d convolution, zero padding, any stride; no bias, as in NITI, unless ``bias``.

Forward: ``y = requant(conv2d(x, w) [+ b])`` with nearest rounding (a bias: ``layers.base``); int8 in, int8 out, exponent
``e_x + e_w + shift``. Backward: the weight gradient is kept exact (int32 or int64, see
``layers.base``; its reduction runs over batch and output positions); the input error is the transposed convolution requantised to int8
with nearest rounding. Accumulators: ``|conv2d(x, w)| <= 127 * 127 * C * kh * kw`` (int32).
In a 16-bit format (DFP16) values are int16 and every product goes through the format's
accumulator (``layers.base``): reduction lengths ``C * kh * kw`` (forward), at most ``O * kh * kw``
(input error) and ``N * Ho * Wo`` (weight gradient).
"""

from __future__ import annotations

from intrain.kernels.im2col import weight_grad_dtype
from intrain.layers.base import IntBias, StepContext, WeightedIntModule
from intrain.numeric.formats import NITI_INT8, NumberFormat
from intrain.numeric.qtensor import QTensor


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class IntConv2d(WeightedIntModule):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, backend, stride=1, padding=0,
                 fmt: NumberFormat = NITI_INT8, bias: bool = False) -> None:
        kh, kw = _pair(kernel_size)
        super().__init__((out_channels, in_channels, kh, kw), in_channels * kh * kw, backend, fmt)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (kh, kw)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        if bias:
            self.bias = IntBias(out_channels, fmt)

    def forward(self, x: QTensor, ctx: StepContext | None = None) -> QTensor:
        if self.training:
            self._saved_input = x
        return self.requantize_output("conv2d_forward", (x.v, self.weight, self.stride, self.padding),
                                      x.e + self.weight_exp, ctx, self.fan_in, rectify=self.rectifies_output)

    def backward(self, d: QTensor, ctx: StepContext | None, need_input_grad: bool = True) -> QTensor | None:
        x = self._saved_input
        if x is None:
            raise RuntimeError("IntConv2d.backward called without a training-mode forward")
        self._saved_input = None
        n, _, ho, wo = d.v.shape
        wg_terms = n * ho * wo
        # The two products are independent (the error's rounding key is the layer's, not an
        # order), so the one with the smaller result runs first and the larger result is never
        # alive beside the other's temporaries: a DFP16 step's peak memory lay in the input error
        # of VGG's 512-channel layers, beside their 18 MiB int64 weight gradients.
        wg_bytes = self.weight.numel() * weight_grad_dtype(d.v, x.v, wg_terms).itemsize
        error_first = need_input_grad and x.v.numel() * x.v.element_size() < wg_bytes
        error = self._input_error(d, x, ctx) if error_first else None
        self.weight_grad, self.weight_grad_exp = self.accumulate(
            "conv2d_backward_weight", (d.v, x.v, self.kernel_size, self.stride, self.padding), d.e + x.e, wg_terms)
        self.store_bias_gradient(d)
        if need_input_grad and not error_first:
            error = self._input_error(d, x, ctx)
        return error

    def _input_error(self, d: QTensor, x: QTensor, ctx: StepContext | None) -> QTensor:
        args = (d.v, self.weight, tuple(x.v.shape[-2:]), self.stride, self.padding)
        # each input element receives at most O * kh * kw terms
        terms = self.out_channels * self.kernel_size[0] * self.kernel_size[1]
        return self.requantize_error("conv2d_backward_input", args, d.e + self.weight_exp, ctx, terms)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")
