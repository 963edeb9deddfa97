"""Integer ReLU: ``max(v, 0)``, exponent unchanged; backward passes the error where ``v > 0``.

Ranges: output in ``[0, 127]`` for int8 input; the error keeps its dtype, range and exponent.

A ReLU directly followed by a max pooling in a sequence (``layers.sequential``) keeps nothing:
the pooling masks the error for it (``IntMaxPool2d.masks_relu``), so the full-size output is not
held from forward to backward (VGG and LeNet-5 pool every ReLU of a stage's last convolution).
"""

from __future__ import annotations

import torch

from intrain.layers.base import IntModule, StepContext
from intrain.numeric.qtensor import QTensor


def through_relu(d: QTensor, output: torch.Tensor) -> QTensor:
    """The error ``d`` at a ReLU's output passed to its input: kept where the output is positive
    (where the input was), zero elsewhere."""
    return QTensor(d.v * output.clamp(max=1).to(d.v.dtype), d.e)


class IntReLU(IntModule):
    def __init__(self) -> None:
        super().__init__()
        self._output: torch.Tensor | None = None
        #: Set when the next layer applies this layer's mask to the error (see the module docstring).
        self.mask_applied_by_next = False

    def forward(self, x: QTensor, ctx: StepContext | None = None) -> QTensor:
        y = x.v.clamp(min=0)
        if self.training and not self.mask_applied_by_next:
            # The output itself, not a mask: y > 0 exactly where x > 0, and when the next layer
            # keeps its input for its own backward (a convolution, a linear layer) this costs
            # no memory at all.
            self._output = y
        return QTensor(y, x.e)

    def backward(self, d: QTensor, ctx: StepContext | None, need_input_grad: bool = True) -> QTensor | None:
        if self.mask_applied_by_next:
            return d
        output, self._output = self._output, None
        if output is None:
            raise RuntimeError("IntReLU.backward called without a training-mode forward")
        return through_relu(d, output)

    def clear_saved(self) -> None:
        self._output = None
