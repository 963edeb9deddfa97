"""Weight averaging: the integer mean of each layer's weights over a run of training steps.

The integer update has no learning rate that decays to zero: every step moves the largest
weight of a layer by about ``2**mu`` units whatever the loss, so the weights keep jittering
around a good point, and the accuracy of the last step moves by tenths of a point from epoch to
epoch. The mean of the weights over many steps (Polyak averaging) sits near the centre of that
jitter. Training continues from the latest weights; evaluation and the saved model use the mean.
When the sums restart is the trainer's choice (``WEIGHT_AVERAGES``): when mu changes ("phase"),
every epoch ("epoch"), or no averaging at all ("none").

Ranges: after each update ``accumulate`` adds the update target (the int8 weight, or the int16
master weight when the layer keeps one) into an int64 sum, so ``|sum| <= 32767 * steps`` (no
overflow below 2**48 steps). ``mean = divide_round(sum, n) = sign(sum) * floor((2 * |sum| + n) / (2 * n))``: the
nearest integer to ``sum / n``, ties away from zero, by integer division; it lies within the
range of the values averaged (so [-127, 127] for int8 weights, [-32767, 32767] for masters).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from intrain.layers import weighted_layers
from intrain.numeric import native
from intrain.numeric.rounding import divide_round

WEIGHT_AVERAGES = ("phase", "epoch", "none")


class WeightAverage:
    """Running int64 sums of every weighted layer's update target since the last ``reset``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers = weighted_layers(model)  # the model's structure is fixed once built
        self.sums: list[torch.Tensor] | None = None
        self.count = 0

    def reset(self) -> None:
        self.sums, self.count = None, 0

    def accumulate(self) -> None:
        targets = [layer.update_target for layer in self.layers]
        if self.sums is None:
            self.sums = [t.to(torch.int64) for t in targets]
        else:
            for total, t in zip(self.sums, targets):
                if not native.add_into_int64(total, t):  # one C pass where it applies, same sums
                    total.add_(t)
        self.count += 1

    @contextmanager
    def applied(self):
        """Within the block the model holds the mean weights (the latest ones when nothing has
        been accumulated); afterwards the latest weights are back, bit for bit."""
        if self.count == 0:
            yield
            return
        layers = self.layers
        # The int8 view of a master weight is derived from it, so the target is all there is to keep.
        saved = [layer.update_target.clone() for layer in layers]

        def load(values):
            for layer, value in zip(layers, values):
                layer.update_target.copy_(value)
                layer.refresh_weight()

        try:
            load(divide_round(total, self.count) for total in self.sums)
            yield
        finally:
            load(saved)

    def state_dict(self) -> dict:
        return {"count": self.count, "sums": None if self.sums is None else [s.clone() for s in self.sums]}

    def load_state_dict(self, state: dict) -> None:
        sums, count = state["sums"], int(state["count"])
        targets = [layer.update_target for layer in self.layers]
        if sums is None:
            if count != 0:
                raise ValueError("weight average state has a count but no sums")
        elif len(sums) != len(targets) or any(s.shape != t.shape for s, t in zip(sums, targets)):
            raise ValueError("weight average state does not match the model's layers")
        else:
            sums = [s.to(device=t.device, dtype=torch.int64) for s, t in zip(sums, targets)]
        self.sums, self.count = sums, count
