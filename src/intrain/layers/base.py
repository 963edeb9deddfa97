"""The integer module interface: explicit forward and backward on QTensors.

Integer layers do not use autograd: ``forward(x, ctx)`` keeps what backward needs (int8 tensors and
boolean masks only) while the module is in training mode, and ``backward(d, ctx, need_input_grad)``
returns the int8 error for the layer below and, for layers with weights, stores the exact int64
weight gradient in ``weight_grad`` (with its exponent in ``weight_grad_exp``) for the update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from intrain.qtensor import QTensor


@dataclass(frozen=True)
class StepContext:
    """What a training step's random numbers are keyed by: the run's seed and the global step."""

    seed: int
    step: int


class IntModule(torch.nn.Module):
    """Base class of integer layers. ``layer_id`` is assigned by the container (for random keys)."""

    has_weight = False

    def __init__(self) -> None:
        super().__init__()
        self.layer_id = 0

    def forward(self, x: QTensor, ctx: StepContext | None = None) -> QTensor:
        raise NotImplementedError

    def backward(self, d: QTensor, ctx: StepContext | None, need_input_grad: bool = True) -> QTensor | None:
        raise NotImplementedError

    def clear_saved(self) -> None:
        """Drop tensors kept for backward."""


class WeightedIntModule(IntModule):
    """An integer layer with an int8 weight and a fixed weight exponent, set up by ``init_weight``."""

    has_weight = True

    def __init__(self, weight_shape: tuple[int, ...], fan_in: int, backend) -> None:
        super().__init__()
        self.backend = backend
        self.fan_in = fan_in
        self.register_buffer("weight", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("weight_exp", torch.zeros((), dtype=torch.int64))
        self.weight_grad: torch.Tensor | None = None
        self.weight_grad_exp: torch.Tensor | None = None
        self._saved_input: QTensor | None = None

    @property
    def weight_q(self) -> QTensor:
        return QTensor(self.weight, self.weight_exp)

    def clear_saved(self) -> None:
        self._saved_input = None
