"""The integer weight update (no learning rate) and its ``mu`` schedule.

For each layer with an exact int64 gradient ``G``: ``b = bit_length(max |G|)``; ``G`` is shifted
right by ``max(b - mu, 0)`` with pseudo-stochastic rounding, so the update ``g`` has at most ``mu``
bits (``|g| <= 2**mu``), and ``w <- clip(w - g, -127, 127)`` stays int8. The weight exponent never
changes. ``mu`` plays the part of the learning rate and follows a per-epoch schedule.
"""

from __future__ import annotations

import torch

from intrain.layers.sequential import IntSequential
from intrain.rounding import max_bit_length, shift_round


class MuSchedule:
    """Piecewise-constant ``mu`` by epoch, written ``"0:5,100:4,150:3"`` (epoch:mu, from epoch 0)."""

    def __init__(self, points: list[tuple[int, int]]) -> None:
        points = sorted(points)
        if not points or points[0][0] != 0:
            raise ValueError("a mu schedule must start at epoch 0, e.g. '0:5,100:4'")
        for epoch, mu in points:
            if epoch < 0 or not 1 <= mu <= 7:
                raise ValueError(f"bad mu schedule entry {epoch}:{mu}: epochs >= 0 and mu in 1..7")
        self.points = points

    @staticmethod
    def parse(text: str) -> "MuSchedule":
        try:
            points = [tuple(int(part) for part in item.split(":")) for item in text.split(",")]
            if any(len(point) != 2 for point in points):
                raise ValueError
        except ValueError:
            raise ValueError(f"cannot read mu schedule {text!r}: write epoch:mu pairs, e.g. '0:5,100:4,150:3'") from None
        return MuSchedule(points)

    def __call__(self, epoch: int) -> int:
        mu = self.points[0][1]
        for start, value in self.points:
            if epoch >= start:
                mu = value
        return mu

    def __str__(self) -> str:
        return ",".join(f"{epoch}:{mu}" for epoch, mu in self.points)


def apply_update(weight: torch.Tensor, grad: torch.Tensor, mu: int) -> torch.Tensor:
    """The new int8 weight after one integer update with ``mu`` bits (see module docstring)."""
    shift = (max_bit_length(grad) - mu).clamp(min=0)
    step = shift_round(grad, shift, "pseudo")
    return (weight.to(torch.int64) - step).clamp(-127, 127).to(torch.int8)


class IntegerUpdate:
    """Applies the integer update to every weighted layer of a model that has a gradient."""

    def __init__(self, model: IntSequential, mu_schedule: MuSchedule) -> None:
        self.model = model
        self.mu_schedule = mu_schedule

    def step(self, epoch: int) -> None:
        mu = self.mu_schedule(epoch)
        for layer in self.model.weighted_layers():
            if layer.weight_grad is None:
                continue
            layer.weight.copy_(apply_update(layer.weight, layer.weight_grad, mu))
            layer.weight_grad = None
            layer.weight_grad_exp = None
