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
        positive = x.v > 0
        if self.training:
            self._positive = positive
        return QTensor(torch.where(positive, x.v, torch.zeros_like(x.v)), x.e)

    def backward(self, d: QTensor, ctx: StepContext | None, need_input_grad: bool = True) -> QTensor | None:
        positive, self._positive = self._positive, None
        if positive is None:
            raise RuntimeError("IntReLU.backward called without a training-mode forward")
        return QTensor(torch.where(positive, d.v, torch.zeros_like(d.v)), d.e)

    def clear_saved(self) -> None:
        self._positive = None
