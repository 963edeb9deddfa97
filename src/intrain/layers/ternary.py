"""A linear or convolution layer with grouped ternary weights and residual edges (inference only).

The weight is a sum of E edges, ``W = sum_e alpha_e * 2**alpha_exp[e] * T_e`` (Kundu et al.'s
residual ternary edges): ``ternary`` [E, O, G, N] int8 in {-1, 0, +1} and ``alpha`` [E, O, G]
int16 in [0, 127] (the group layout is ``kernels.ternary``'s), one power-of-two exponent
``alpha_exp[e]`` per edge. Which group-edges are on: ``rank`` [E, O, G] int64, where -1 marks a
first edge (always on: the plain 8-2 model) and ``r >= 0`` the place of a residual edge in the
model-wide ranking of the converter; a residual edge is on when ``r < active_residuals`` (a
setting of the layer, the same number for every layer of a model: ``set_active_residuals``), so
edges are switched off and on at evaluation without converting again, and keeping the first ``m``
ranks gives exactly the model converted with a budget of ``m`` residual edges. A group-edge that
was never selected has ``alpha = 0`` and an out-of-reach rank.

Forward, integers only: each edge with any group on gives its exact int32 product with the int8
input ``x`` (``kernels.ternary``: additions only, or a dense int8 product; the same bits);
the edges are aligned to the finest edge exponent by exact left shifts in int64 (the converter
keeps every edge within ``MAX_EDGE_GAP`` bits of the finest, so ``|sum| <= E * 2**14 * K *
2**MAX_EDGE_GAP < 2**62`` for K < 2**17), an optional bias is added (below), and the sum is
requantised to int8 with nearest rounding like every product (exponent ``e_x + min alpha_exp +
shift``). Activations stay int8: an 8-2 model.

Bias (only for models converted from a run whose layers have one): ``bias`` [O] int32
(|b| < 2**15) with exponent ``bias_exp``, added to the accumulator before its rounding and
aligned at run time (the accumulator's exponent depends on the input's) by
``numeric.requant.add_bias``.
"""

from __future__ import annotations

import torch

from intrain.kernels.ternary import TERNARY_PRODUCTS, ternary_conv2d, ternary_linear
from intrain.layers.base import IntModule, StepContext
from intrain.numeric.qtensor import QTensor
from intrain.numeric.requant import add_bias, requantize

#: Largest exponent gap between a layer's coarsest and finest edge (enforced by the converter).
MAX_EDGE_GAP = 24
#: ``rank`` of a first edge (always on).
FIRST_EDGE = -1


class TernaryLayer(IntModule):
    """``kind`` "linear" (weight [O, K]) or "conv" (weight [O, C, kh, kw], ``stride``, ``padding``)
    with ``edges`` edges of groups of ``group_size``; ``product`` "adds" or "dense"."""

    def __init__(self, kind: str, weight_shape: tuple[int, ...], group_size: int, edges: int, backend,
                 product: str, has_bias: bool, stride=(1, 1), padding=(0, 0)) -> None:
        super().__init__()
        if kind not in ("linear", "conv"):
            raise ValueError(f"a ternary layer is linear or conv, not {kind!r}")
        if product not in TERNARY_PRODUCTS:
            raise ValueError(f"unknown ternary product {product!r}; choose one of {', '.join(TERNARY_PRODUCTS)}")
        if group_size < 1 or edges < 1:
            raise ValueError(f"need a group size and an edge count of at least 1, got {group_size}, {edges}")
        self.kind, self.weight_shape, self.backend, self.product = kind, tuple(weight_shape), backend, product
        self.stride, self.padding = tuple(stride), tuple(padding)
        self.out_features = weight_shape[0]
        self.fan_in = 1
        for size in weight_shape[1:]:
            self.fan_in *= size
        self.group_size = min(group_size, self.fan_in)
        groups = -(-self.fan_in // self.group_size)
        self.active_residuals = 0
        self.register_buffer("ternary", torch.zeros((edges, self.out_features, groups, self.group_size),
                                                    dtype=torch.int8))
        self.register_buffer("alpha", torch.zeros((edges, self.out_features, groups), dtype=torch.int16))
        self.register_buffer("alpha_exp", torch.zeros((edges,), dtype=torch.int64))
        self.register_buffer("rank", torch.full((edges, self.out_features, groups), FIRST_EDGE, dtype=torch.int64))
        self.register_buffer("bias", torch.zeros((self.out_features,), dtype=torch.int32) if has_bias else None)
        self.register_buffer("bias_exp", torch.zeros((), dtype=torch.int64) if has_bias else None)

    def edge_on(self) -> torch.Tensor:
        """[E, O, G] bool: the group-edges that take part in the product now."""
        return (self.rank < self.active_residuals) & (self.alpha != 0)

    def _edge_product(self, x: torch.Tensor, edge: int, alpha: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return ternary_linear(x, self.ternary[edge], alpha, self.backend, self.product)
        return ternary_conv2d(x, self.ternary[edge], alpha, self.weight_shape[2:], self.stride, self.padding,
                              self.backend, self.product)

    def forward(self, x: QTensor, ctx: StepContext | None = None) -> QTensor:
        on = self.edge_on()
        finest = self.alpha_exp.min()
        total = None
        for edge in range(self.alpha.shape[0]):
            if not bool(on[edge].any()):
                continue
            alpha = torch.where(on[edge], self.alpha[edge], torch.zeros_like(self.alpha[edge]))
            part = self._edge_product(x.v, edge, alpha).to(torch.int64) << (self.alpha_exp[edge] - finest)
            total = part if total is None else total.add_(part)
        if total is None:  # every edge off: a zero output
            total = self._edge_product(x.v, 0, torch.zeros_like(self.alpha[0])).to(torch.int64)
        e = x.e + finest
        if self.bias is not None:
            total, e = add_bias(total, e, self.bias, self.bias_exp)
        return requantize(total, e)

    def extra_repr(self) -> str:
        return (f"{self.kind}, weight={self.weight_shape}, groups of {self.group_size}, "
                f"edges={self.alpha.shape[0]}, product={self.product}, bias={self.bias is not None}")


def set_active_residuals(model: torch.nn.Module, count: int) -> None:
    """Switch on the first ``count`` residual edges of the model-wide ranking in every ternary
    layer of ``model`` (0: the plain 8-2 model)."""
    if count < 0:
        raise ValueError(f"the number of residual edges must be >= 0, got {count}")
    for layer in model.modules():
        if isinstance(layer, TernaryLayer):
            layer.active_residuals = count
