"""Integer fully connected layer; no bias, as in NITI, unless ``bias``.

Forward: ``y = requant(x @ w.T [+ b])`` with nearest rounding (a bias: ``layers.base``); int8 in, int8 out, exponent
``e_x + e_w + shift``. Backward: the weight gradient ``d.T @ x`` is kept exact (int32 or int64,
see ``layers.base``; its reduction runs over the batch), the input error ``requant(d @ w)`` is int8 with nearest rounding.
Accumulators: ``|x @ w.T| <= 127 * 127 * in_features`` (int32 for ``in_features < 133,000``).
In a 16-bit format (DFP16) values are int16 and every product goes through the format's
accumulator (``layers.base``): reduction lengths ``in_features`` (forward), ``out_features``
(input error) and the batch (weight gradient).
"""

from __future__ import annotations

from intrain.layers.base import IntBias, StepContext, WeightedIntModule
from intrain.numeric.formats import NITI_INT8, NumberFormat
from intrain.numeric.qtensor import QTensor


class IntLinear(WeightedIntModule):
    def __init__(self, in_features: int, out_features: int, backend, fmt: NumberFormat = NITI_INT8,
                 bias: bool = False) -> None:
        super().__init__((out_features, in_features), in_features, backend, fmt)
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            self.bias = IntBias(out_features, fmt)

    def forward(self, x: QTensor, ctx: StepContext | None = None) -> QTensor:
        if self.training:
            self._saved_input = x
        return self.requantize_output("linear_forward", (x.v, self.weight), x.e + self.weight_exp, ctx,
                                      self.in_features, rectify=self.rectifies_output)

    def backward(self, d: QTensor, ctx: StepContext | None, need_input_grad: bool = True) -> QTensor | None:
        x = self._saved_input
        if x is None:
            raise RuntimeError("IntLinear.backward called without a training-mode forward")
        self.weight_grad, self.weight_grad_exp = self.accumulate("linear_backward_weight", (d.v, x.v), d.e + x.e,
                                                                 d.v.shape[0])
        self.store_bias_gradient(d)
        self._saved_input = None
        if not need_input_grad:
            return None
        return self.requantize_error("linear_backward_input", (d.v, self.weight),
                                     d.e + self.weight_exp, ctx, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
