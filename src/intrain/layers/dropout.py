"""Integer dropout with a mask from the counter-based generator (seed, step, layer), element by
element at its position in the global batch (``StepContext.element_offset``: a data-parallel
shard draws its rows of the one-process mask).

An element is kept when its 32-bit random number is at least ``drop_threshold = round(p * 2**32)``
(fixed when the layer is built). Kept values are not rescaled: every integer layer after it is
bias-free and requantises by its own maximum, so a constant factor changes no prediction, and the
exponent stays. Values keep their dtype and range; backward passes the error through the same mask.
"""

from __future__ import annotations

import torch

from intrain.numeric import rng
from intrain.layers.base import IntModule, StepContext
from intrain.numeric.qtensor import QTensor


class IntDropout(IntModule):
    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.drop_threshold = round(p * 2**32)
        self._keep: torch.Tensor | None = None

    def forward(self, x: QTensor, ctx: StepContext | None = None) -> QTensor:
        if not self.training or self.drop_threshold == 0:
            return x
        if ctx is None:
            raise ValueError("IntDropout in training mode needs a StepContext for its random mask")
        key = rng.derive_key(ctx.seed, ctx.step, self.layer_id, rng.STREAM_DROPOUT)
        draws = rng.uint32(key, x.v.shape, x.v.device, ctx.element_offset(x.v))
        keep = (draws >= self.drop_threshold).to(x.v.dtype)
        self._keep = keep
        return QTensor(x.v * keep, x.e)

    def backward(self, d: QTensor, ctx: StepContext | None, need_input_grad: bool = True) -> QTensor | None:
        if self._keep is None:
            return d
        keep, self._keep = self._keep, None
        return QTensor(d.v * keep.to(d.v.dtype), d.e)

    def clear_saved(self) -> None:
        self._keep = None

    def extra_repr(self) -> str:
        return f"p={self.p}"
