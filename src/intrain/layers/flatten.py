"""Flatten all but the batch dimension; values and exponents pass through unchanged."""

from __future__ import annotations

from intrain.layers.base import IntModule, StepContext
from intrain.numeric.qtensor import QTensor


class IntFlatten(IntModule):
    def __init__(self) -> None:
        super().__init__()
        self._shape = None

    def forward(self, x: QTensor, ctx: StepContext | None = None) -> QTensor:
        if self.training:
            self._shape = x.v.shape
        return QTensor(x.v.flatten(1), x.e)  # not reshape(n, -1): ambiguous for an empty shard

    def backward(self, d: QTensor, ctx: StepContext | None, need_input_grad: bool = True) -> QTensor | None:
        return QTensor(d.v.reshape(self._shape), d.e)
