"""Kernel backends as objects: :class:`Backend`, whose every product is the reference one, and
:class:`ReferenceBackend`, which keeps them all.

A fast backend subclasses :class:`Backend` and overrides the products it speeds up; the others
stay the ``reference`` functions (int64, float-free, any device), so a product added here is at
once available on every backend, exact, and a backend can never lack one. The contract of every
product (shapes, integer ranges, exactness) is in :mod:`intrain.kernels`.
"""

from __future__ import annotations

import torch

from intrain.kernels import reference
from intrain.kernels.im2col import IntPair
from intrain.numeric.accumulate import shift_operands

#: The products every backend offers (methods of :class:`Backend`).
PRODUCTS = (
    "linear_forward",
    "linear_backward_input",
    "linear_backward_weight",
    "conv2d_forward",
    "conv2d_backward_input",
    "conv2d_backward_weight",
)


class Backend:
    """A kernel backend: the integer products of intrain, each defaulting to the reference one.

    Subclasses set ``name`` and override what they compute faster, bit for bit the same. A
    backend may also define ``product_to_int8(name, *args, reduce_max, shifts, rectify)`` (and
    ``product_to_int16``): ``requantize(shifted_product(name, args, shifts))`` with nearest
    rounding to int8 (int16), of the product's positive part when ``rectify``, as (values,
    shift), computed without the integer accumulator; ``requant.requantize_product`` uses it
    when present.
    """

    name: str

    def check_device(self, device: torch.device) -> None:
        """Raise ValueError when this backend cannot run on ``device`` (any device here)."""

    def linear_forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x @ w.T``: x [N, I], w [O, I] -> [N, O]."""
        return reference.linear_forward(x, w)

    def linear_backward_input(self, d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``d @ w``: d [N, O], w [O, I] -> [N, I]."""
        return reference.linear_backward_input(d, w)

    def linear_backward_weight(self, d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``d.T @ x``: d [N, O], x [N, I] -> [O, I]."""
        return reference.linear_backward_weight(d, x)

    def conv2d_forward(self, x: torch.Tensor, w: torch.Tensor, stride: IntPair = 1,
                       padding: IntPair = 0) -> torch.Tensor:
        """``conv2d(x, w, stride, padding)``: x [N, C, H, W], w [O, C, kh, kw] -> [N, O, Ho, Wo]."""
        return reference.conv2d_forward(x, w, stride, padding)

    def conv2d_backward_input(self, d: torch.Tensor, w: torch.Tensor, input_hw: IntPair,
                              stride: IntPair = 1, padding: IntPair = 0) -> torch.Tensor:
        """Gradient of conv2d with respect to its input: d [N, O, Ho, Wo] -> [N, C, H, W]."""
        return reference.conv2d_backward_input(d, w, input_hw, stride, padding)

    def conv2d_backward_weight(self, d: torch.Tensor, x: torch.Tensor, kernel_hw: IntPair,
                               stride: IntPair = 1, padding: IntPair = 0) -> torch.Tensor:
        """Gradient of conv2d with respect to its weight: d [N, O, Ho, Wo] -> [O, C, kh, kw]."""
        return reference.conv2d_backward_weight(d, x, kernel_hw, stride, padding)

    def shifted_product(self, name: str, args: tuple, shifts: tuple[int, int]) -> torch.Tensor:
        """The product ``name`` of ``args`` with its two operands first shifted right by
        ``shifts`` with nearest rounding (``numeric.accumulate``'s headroom for DFP16's int32
        accumulator). Here the whole operands are shifted first; a backend may shift them a piece
        at a time as it uses them, with the same bits."""
        return getattr(self, name)(*shift_operands(args, shifts))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ReferenceBackend(Backend):
    """Exact products in int64, float-free, on any device: the ground truth (see
    :mod:`intrain.kernels.reference`)."""

    name = "reference"
