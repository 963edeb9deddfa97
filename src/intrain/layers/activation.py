"""Integer ReLU: ``max(v, 0)``, exponent unchanged; backward passes the error where ``v > 0``.

Ranges: output in ``[0, 127]`` for int8 input; the error keeps its dtype, range and exponent.
"""

from __future__ import annotations

import torch

from intrain.layers.base import IntModule, StepContext
from intrain.qtensor import QTensor


class IntReLU(IntModule):
    def __init__(self) -> None:
        super().__init__()
        self._positive: torch.Tensor | None = None

    def forward(self, x: QTensor, ctx: StepContext | None = None) -> QTensor:
        y = x.v.clamp(min=0)
        if self.training:
            self._positive = y.clamp(max=1)  # 1 where x > 0, else 0, in x's dtype
        return QTensor(y, x.e)

    def backward(self, d: QTensor, ctx: StepContext | None, need_input_grad: bool = True) -> QTensor | None:
        positive, self._positive = self._positive, None
        if positive is None:
            raise RuntimeError("IntReLU.backward called without a training-mode forward")
        return QTensor(d.v * positive, d.e)

    def clear_saved(self) -> None:
        self._positive = None
