"""Weight averaging: the integer mean of each layer's weights over a run of training steps.

The integer update has no learning rate that decays to zero: every step moves the largest
weight of a layer by about ``2**mu`` units whatever the loss, so the weights keep jittering
around a good point, and the accuracy of the last step moves by tenths of a point from epoch to
epoch. The mean of the weights over many steps (Polyak averaging) sits near the centre of that
jitter. Training continues from the latest weights; evaluation and the saved model use the mean.
When the sums restart is the trainer's choice (``WEIGHT_AVERAGES``): when mu changes ("phase"),
every epoch ("epoch"), or no averaging at all ("none").

The float twin's updates on integer masters (``--update sgd`` or ``adamw``) decay their learning
rate to zero, and their masters change exponent at every step, so step sums of one exponent do not
apply. For them ``EpochEndAverage`` ("last:N") takes the mean of the masters at the ends of the
last N epochs of the run, one snapshot per epoch as stochastic weight averaging does (Izmailov et
al., 2018), while training continues from the latest masters; before the window starts evaluation
uses the latest weights.

Ranges: after each update ``accumulate`` adds the update target (the int8 weight, or the int16
master weight when the layer keeps one) into an int64 sum, so ``|sum| <= 32767 * steps`` (no
overflow below 2**48 steps). ``mean = divide_round(sum, n) = sign(sum) * floor((2 * |sum| + n) / (2 * n))``: the
nearest integer to ``sum / n``, ties away from zero, by integer division; it lies within the
range of the values averaged (so [-127, 127] for int8 weights, [-32767, 32767] for masters).

``EpochEndAverage``'s ranges: a master is ``v * 2**e`` with ``|v| < 2**31``. Each layer's sum is an
int64 ``S`` at one exponent ``base``: the smallest exponent added, unless the exponents spread
more than ``gap = 30 - bit_length(N)`` bits, when ``base`` is the largest minus ``gap`` and the
masters below it are rounded to it (nearest; never at the spreads of a training run, where a
master's exponent moves by a few bits). Every term is then below ``2**(31 + gap)``, so ``|S| <
N 2**(31 + gap) <= 2**61`` and ``2 |S| + N`` (``divide_round``) fits int64. The mean
``divide_round(S, n)`` at ``base`` is rounded to the weight's width (nearest, ``requantize``) as
the update rounds a master.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from typing import Callable

import torch

from intrain.layers import weighted_layers
from intrain.numeric import native
from intrain.numeric.qtensor import QTensor
from intrain.numeric.requant import requantize
from intrain.numeric.rounding import divide_round, shift_round

#: NITI's update's step sums (``WeightAverage``); the twin updates take ``last:N``
#: (``EpochEndAverage``) or "none".
WEIGHT_AVERAGES = ("phase", "epoch", "none")
LAST_EPOCHS = "last:"


def last_epochs(value: str) -> int | None:
    """N of a ``last:N`` weight average, None for the other values."""
    return int(value[len(LAST_EPOCHS):]) if value.startswith(LAST_EPOCHS) else None


def parse_weight_average(text: str) -> str:
    """``--weight-average``: one of ``WEIGHT_AVERAGES`` or ``last:N`` with N a whole number >= 1."""
    if text in WEIGHT_AVERAGES:
        return text
    count = text[len(LAST_EPOCHS):] if text.startswith(LAST_EPOCHS) else ""
    if not (count.isdigit() and count.isascii() and int(count) >= 1):
        raise argparse.ArgumentTypeError(f"unknown --weight-average {text!r}: choose one of "
                                         f"{', '.join(WEIGHT_AVERAGES)} or last:N (N epochs, N >= 1)")
    return f"{LAST_EPOCHS}{int(count)}"


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


class EpochEndAverage:
    """The integer mean of the masters at the ends of the last ``last`` epochs of a run (module
    docstring); ``masters()`` gives the update's current masters, one per layer of ``layers``, as
    (int32 values, exponent); ``bits``: the weights' width."""

    def __init__(self, layers: list, masters: Callable[[], list[QTensor]], last: int, bits: int) -> None:
        if last < 1:
            raise ValueError(f"the mean of the last {last} epochs: need at least one epoch")
        self.layers, self.masters, self.last, self.bits = layers, masters, last, bits
        self.gap = 30 - last.bit_length()
        self.sums: list[torch.Tensor] | None = None
        self.bases: list[int] = []  # exponent of each sum
        self.tops: list[int] = []  # largest exponent added to each sum
        self.count = 0

    def end_epoch(self, epoch: int, epochs: int) -> None:
        """Adds the masters after ``epoch`` (0-based) of ``epochs`` when it is one of the last ``last``."""
        if epoch >= epochs - self.last:
            self.add(self.masters())

    def add(self, masters: list[QTensor]) -> None:
        if self.sums is None:
            self.sums = [torch.zeros(m.v.shape, dtype=torch.int64, device=m.v.device) for m in masters]
            self.bases = [int(m.e) for m in masters]
            self.tops = list(self.bases)
        for i, master in enumerate(masters):
            e = int(master.e)
            top = max(self.tops[i], e)
            base = max(min(self.bases[i], e), top - self.gap)
            if base < self.bases[i]:
                self.sums[i] <<= self.bases[i] - base  # exact: every term stays below 2**(31 + gap)
            elif base > self.bases[i]:
                self.sums[i] = shift_round(self.sums[i], base - self.bases[i], "nearest")
            term = master.v.to(torch.int64)
            self.sums[i] += term << (e - base) if e >= base else shift_round(term, base - e, "nearest")
            self.bases[i], self.tops[i] = base, top
        self.count += 1

    def mean_weights(self) -> list[QTensor]:
        """Each layer's mean master rounded to the weights' width (nearest)."""
        return [requantize(divide_round(total, self.count), torch.tensor(base, dtype=torch.int64,
                                                                         device=total.device), bits=self.bits)
                for total, base in zip(self.sums, self.bases)]

    @contextmanager
    def applied(self):
        """Within the block the layers hold the mean weights (the latest before the window
        starts); afterwards the latest weights are back, bit for bit (the masters are not touched)."""
        if self.count == 0:
            yield
            return
        saved = [(layer.weight.clone(), layer.weight_exp.clone()) for layer in self.layers]
        try:
            for layer, weight in zip(self.layers, self.mean_weights()):
                layer.weight.copy_(weight.v)
                layer.weight_exp.copy_(weight.e)
            yield
        finally:
            for layer, (weight, exponent) in zip(self.layers, saved):
                layer.weight.copy_(weight)
                layer.weight_exp.copy_(exponent)

    def state_dict(self) -> dict:
        return {"count": self.count, "sums": None if self.sums is None else [s.clone() for s in self.sums],
                "bases": list(self.bases), "tops": list(self.tops)}

    def load_state_dict(self, state: dict) -> None:
        sums, count = state["sums"], int(state["count"])
        if sums is None:
            if count != 0:
                raise ValueError("weight average state has a count but no sums")
            self.sums, self.bases, self.tops, self.count = None, [], [], 0
            return
        shapes = [layer.weight.shape for layer in self.layers]
        if (len(sums) != len(shapes) or any(s.shape != shape for s, shape in zip(sums, shapes))
                or len(state["bases"]) != len(sums) or len(state["tops"]) != len(sums)):
            raise ValueError("weight average state does not match the model's layers")
        device = self.layers[0].weight.device
        self.sums = [s.to(device=device, dtype=torch.int64) for s in sums]
        self.bases, self.tops = [int(b) for b in state["bases"]], [int(t) for t in state["tops"]]
        self.count = count
