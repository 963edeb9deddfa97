"""The integer module interface: explicit forward and backward on QTensors.

Integer layers do not use autograd: ``forward(x, ctx)`` keeps what backward needs (int8 tensors and
boolean masks only) while the module is in training mode, and ``backward(d, ctx, need_input_grad)``
returns the int8 error for the layer below and, for layers with weights, stores the exact
weight gradient in ``weight_grad`` (with its exponent in ``weight_grad_exp``) for the update, as
the kernels return it: int32 when its static bound allows (int8 operands, ``|G| <= 2**14 * K <
2**31`` for a reduction over K terms, i.e. K < 2**17), else int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from intrain.numeric import rng
from intrain.numeric.qtensor import QTensor
from intrain.numeric.requant import requantize, requantize_product
from intrain.numeric.rounding import shift_round


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


#: Roundings of the errors a weighted layer sends down (``requantize_error``).
ERROR_ROUNDINGS = ("nearest", "stochastic")

#: Low bits that an int16 master weight keeps below its int8 view.
MASTER_EXTRA_BITS = 8


class WeightedIntModule(IntModule):
    """An integer layer with an int8 weight and a fixed weight exponent, set up by ``init_weight``.

    With ``use_master_weight()`` the layer also keeps NITI's 16-bit weight accumulator: an int16
    ``weight_master`` in ``[-32767, 32767]`` with exponent ``weight_exp - 8`` takes the updates, and
    the int8 ``weight`` used by every product is its nearest-rounded upper 8 bits, clipped to
    ``[-127, 127]``, so updates smaller than one int8 step accumulate instead of being lost.
    """

    has_weight = True

    def __init__(self, weight_shape: tuple[int, ...], fan_in: int, backend) -> None:
        super().__init__()
        self.backend = backend
        self.fan_in = fan_in
        self.error_rounding = "nearest"
        self.register_buffer("weight", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("weight_exp", torch.zeros((), dtype=torch.int64))
        self.weight_grad: torch.Tensor | None = None
        self.weight_grad_exp: torch.Tensor | None = None
        self._saved_input: QTensor | None = None

    def requantize_error(self, product: str, args: tuple, e: torch.Tensor,
                         ctx: StepContext | None) -> QTensor:
        """The int8 error for the layer below, from the backend's ``product`` of ``args``:
        nearest rounding (NITI), or stochastic rounding keyed by (seed, step, layer), which keeps
        the small errors of most samples alive on average."""
        if self.error_rounding == "nearest":
            return requantize_product(self.backend, product, args, e)
        if ctx is None:
            raise ValueError("stochastic error rounding needs a StepContext")
        key = rng.derive_key(ctx.seed, ctx.step, self.layer_id, rng.STREAM_ROUNDING)
        return requantize(getattr(self.backend, product)(*args), e, mode="stochastic", key=key)

    def use_master_weight(self) -> None:
        """Start a 16-bit accumulator from the current int8 weight (exactly: ``w * 2**8``)."""
        self.register_buffer("weight_master", self.weight.to(torch.int16) << MASTER_EXTRA_BITS)

    @property
    def has_master_weight(self) -> bool:
        return getattr(self, "weight_master", None) is not None

    def refresh_weight(self) -> None:
        """Recompute the int8 weight from the int16 master (nearest rounding, clip)."""
        wide = self.weight_master.to(torch.int32)  # 32767 + 128 would wrap around in int16
        view = shift_round(wide, MASTER_EXTRA_BITS, "nearest").clamp(-127, 127)
        self.weight.copy_(view.to(torch.int8))

    @property
    def weight_q(self) -> QTensor:
        return QTensor(self.weight, self.weight_exp)

    def clear_saved(self) -> None:
        self._saved_input = None
