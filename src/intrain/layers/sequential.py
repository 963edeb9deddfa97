"""A sequence of integer layers with explicit backward.

Backward runs from the last layer down to the first layer that has a weight; that layer computes
its weight gradient only (no error below it is needed), so the first layer skips error
back-propagation, and the layers before it (input-side reshapes) are not visited. A ReLU followed
by a max pooling hands its mask to the pooling (``layers.pooling``), so it keeps nothing. A
convolution or linear layer directly followed by a ReLU is told so (``relu_follows``): in a format
with ``relu_scale="positive"`` it rounds its product's positive part, so the ReLU's output takes
the whole 8-bit range (``numeric.formats``); the ReLU then changes nothing in forward and still
masks the error in backward (where the rounded output is positive).
"""

from __future__ import annotations

import torch

from intrain.layers.activation import IntReLU
from intrain.layers.base import IntModule, StepContext, number_layers, weighted_layers
from intrain.layers.conv import IntConv2d
from intrain.layers.linear import IntLinear
from intrain.layers.pooling import IntMaxPool2d
from intrain.numeric.qtensor import QTensor


class IntSequential(IntModule):
    def __init__(self, *layers: IntModule) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)
        number_layers(self)
        for before, after in zip(layers, layers[1:]):
            if isinstance(before, (IntConv2d, IntLinear)) and isinstance(after, IntReLU):
                before.relu_follows = True
            if isinstance(before, IntReLU) and isinstance(after, IntMaxPool2d):
                # the pooling masks the error for the ReLU, which then keeps nothing (same bits,
                # ``layers.pooling``); valid because backward here visits them one after the other
                before.mask_applied_by_next = after.masks_relu = True

    @property
    def has_weight(self) -> bool:
        """A nested sequence counts as weighted when a layer inside it is, so that backward visits it."""
        return bool(weighted_layers(self))

    def forward(self, x: QTensor, ctx: StepContext | None = None) -> QTensor:
        for layer in self.layers:
            x = layer(x, ctx)
        return x

    def backward(self, d: QTensor, ctx: StepContext | None = None, need_input_grad: bool = False) -> QTensor | None:
        first_weighted = next((i for i, layer in enumerate(self.layers) if layer.has_weight), 0)
        for index in range(len(self.layers) - 1, first_weighted - 1, -1):
            is_bottom = index == first_weighted and not need_input_grad
            layer = self.layers[index]
            d = layer.backward(d, ctx, need_input_grad=not is_bottom)
            if ctx is not None and ctx.gradient_ready is not None and layer.has_weight:
                ctx.gradient_ready(layer)
        return d

    def clear_saved(self) -> None:
        for layer in self.layers:
            layer.clear_saved()

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> IntModule:
        return self.layers[index]
