"""Residual blocks and global average pooling: what residual networks add to the integer layers.

``IntResidual(main, shortcut)``: ``y = main(x) + shortcut(x)`` (the identity when ``shortcut`` is
None). The two branches' outputs have their own exponents; ``NumberFormat.add`` aligns them by
exact left shifts, adds exactly in int64 and rounds the sum once (nearest), see
``numeric.requant.add_aligned``. Backward: the error fans out unchanged to both branches, and the
two errors arriving at the branch point (``x`` fed both) are added the same way, rounded with
the format's error rounding (stochastic keyed by (seed, step, this block's layer id)).
In a data-parallel step both adds and the pooling's requantisations take the whole batch's
shift and "all zero" tests over all processes (``layers.base``).

``IntGlobalAvgPool2d``: ``[N, C, H, W] -> [N, C]``, the mean over the H*W positions. The int64
sum (``|sum| <= 127 * H * W``) times ``2**g`` is divided by H*W with nearest rounding (exact when
H*W is a power of two), exponent ``e - g``, then requantised to the format (nearest). With
``g = 8 + bit_length(H*W)`` guard bits the first rounding is below 2**-8 of the result's unit,
so the result is within 0.502 units of the exact mean; ``|sum| * 2**g < 2**(16 + 2 bit_length(HW))``
stays far inside int64 for any image. Backward: each position receives ``d / (H*W)``, computed
the same way (``d * 2**g`` divided by H*W, requantised).

What replaces batch normalisation: the integer batch normalisation of ``layers.norm`` (NITI
trains without any; its module docstring says why residual networks need one).
"""

from __future__ import annotations

import torch

from intrain.layers.base import IntModule, StepContext, number_layers, reduce_max, weighted_layers
from intrain.numeric import rng
from intrain.numeric.formats import NITI_INT8, NumberFormat
from intrain.numeric.qtensor import QTensor
from intrain.numeric.rounding import divide_round

#: Guard bits below the result's unit kept by the average pooling's division (see above).
AVERAGE_GUARD_BITS = 8


def _guard_bits(positions: int) -> int:
    return AVERAGE_GUARD_BITS + positions.bit_length()


class IntResidual(IntModule):
    def __init__(self, main: IntModule, shortcut: IntModule | None = None, fmt: NumberFormat = NITI_INT8) -> None:
        super().__init__()
        self.main = main
        self.shortcut = shortcut
        self.fmt = fmt
        number_layers(self)

    @property
    def has_weight(self) -> bool:
        return bool(weighted_layers(self))

    def forward(self, x: QTensor, ctx: StepContext | None = None) -> QTensor:
        main = self.main(x, ctx)
        short = x if self.shortcut is None else self.shortcut(x, ctx)
        return self.fmt.add(main, short, reduce_max=reduce_max(ctx))

    def backward(self, d: QTensor, ctx: StepContext | None, need_input_grad: bool = True) -> QTensor | None:
        d_main = self.main.backward(d, ctx, need_input_grad=need_input_grad)
        if self.shortcut is None:
            d_short = d
        else:
            d_short = self.shortcut.backward(d, ctx, need_input_grad=need_input_grad)
        if not need_input_grad:
            return None
        if self.fmt.error_rounding == "nearest":
            return self.fmt.add(d_main, d_short, reduce_max=reduce_max(ctx))
        if ctx is None:
            raise ValueError("stochastic error rounding needs a StepContext")
        key = rng.derive_key(ctx.seed, ctx.step, self.layer_id, rng.STREAM_ROUNDING)
        return self.fmt.add(d_main, d_short, mode="stochastic", key=key, offset=ctx.element_offset(d_main.v),
                            reduce_max=ctx.collective.max)

    def clear_saved(self) -> None:
        self.main.clear_saved()
        if self.shortcut is not None:
            self.shortcut.clear_saved()


class IntGlobalAvgPool2d(IntModule):
    def __init__(self, fmt: NumberFormat = NITI_INT8) -> None:
        super().__init__()
        self.fmt = fmt
        self._hw: tuple[int, int] | None = None

    def forward(self, x: QTensor, ctx: StepContext | None = None) -> QTensor:
        n, c, h, w = x.v.shape
        if self.training:
            self._hw = (h, w)
        total = x.v.to(torch.int64).sum(dim=(2, 3))
        guard = _guard_bits(h * w)
        return self.fmt.requantize(divide_round(total << guard, h * w), x.e - guard, reduce_max=reduce_max(ctx))

    def backward(self, d: QTensor, ctx: StepContext | None, need_input_grad: bool = True) -> QTensor | None:
        if self._hw is None:
            raise RuntimeError("IntGlobalAvgPool2d.backward called without a training-mode forward")
        (h, w), self._hw = self._hw, None
        if not need_input_grad:
            return None
        guard = _guard_bits(h * w)
        q = self.fmt.requantize(divide_round(d.v.to(torch.int64) << guard, h * w), d.e - guard,
                                reduce_max=reduce_max(ctx))
        return QTensor(q.v[:, :, None, None].expand(-1, -1, h, w).contiguous(), q.e)

    def clear_saved(self) -> None:
        self._hw = None
