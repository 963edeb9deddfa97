"""Integer dropout with a mask from the counter-based generator (seed, step, layer), element by
element at its position in the global batch (``StepContext.element_offset``: a data-parallel
shard draws its rows of the one-process mask).

An element is kept when its 32-bit random number is at least ``drop_threshold = round(p * 2**32)``
(fixed when the layer is built), so it is kept with probability ``keep = 1 - drop_threshold /
2**32`` exactly. Kept values are scaled by ``1 / keep``, as the float twin's ``torch.nn.Dropout``
scales them (inverted dropout), so that a training step sees the next layer's output, and in the
end the logits, at the scale evaluation gives them. The scale is exact and free: ``1 / keep`` must
be a power of two ``2**scale_bits`` (p = 0, 1/2, 3/4, ...; other p are refused), which goes into the
exponent; values keep their dtype and range. Backward passes the error through the same mask with
the same factor (``d(x * mask / keep) / dx``).

Why the scale matters although no prediction depends on it: the loss does. Without it (intrain up
to 2026-12-04, VGG-small and AlexNet, whose classifier follows a dropout) a training step saw
logits at ``1 - p`` of their evaluation scale. In a method whose update follows the gradient's
size (DFP16, ``--update sgd``) that is the float model with inverted dropout whose last layer
holds ``W / (1 - p)``: the same function, but each SGD step moves it ``(1 - p)**2`` as far (a
quarter of the float twin's rate at p = 1/2, with the same weight decay), so the classifier lagged
behind as the rate decayed (BENCHMARKS.md, "Dropout's scale").
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
        kept = 2**32 - self.drop_threshold  # kept values per 2**32 draws
        if kept & (kept - 1):
            raise ValueError(f"dropout probability {p} keeps a fraction of the values that is not a power of two; "
                             "the kept values are scaled by its inverse through the exponent, so use p = 0, 0.5, 0.75, ...")
        self.scale_bits = 32 - (kept.bit_length() - 1)
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
        return QTensor(x.v * keep, x.e + self.scale_bits)

    def backward(self, d: QTensor, ctx: StepContext | None, need_input_grad: bool = True) -> QTensor | None:
        if self._keep is None:
            return d
        keep, self._keep = self._keep, None
        return QTensor(d.v * keep.to(d.v.dtype), d.e + self.scale_bits)

    def clear_saved(self) -> None:
        self._keep = None

    def extra_repr(self) -> str:
        return f"p={self.p}"
