"""One integer training step: forward, integer loss gradient, backward, integer update.

Everything inside ``IntegerTrainer.train_step`` is an integer operation on integer tensors (the
audit test records every aten operator to prove it). The random numbers it uses (loss rounding,
dropout) are keyed by ``(seed, step)``, so any step can be replayed bit for bit. Unless
``weight_average`` is "none", the step also adds the updated weights into integer running sums
(:mod:`intrain.methods.averaging`) that restart in ``begin_epoch`` (every epoch, or when mu changes), and
whose mean ``averaged()`` applies for evaluation and saving.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from intrain.methods.averaging import WEIGHT_AVERAGES, WeightAverage
from intrain.layers import IntSequential, StepContext
from intrain.methods.loss import cross_entropy_grad
from intrain.methods.update import IntegerUpdate, MuSchedule
from intrain.numeric.qtensor import QTensor


class IntegerTrainer:
    def __init__(self, model: IntSequential, seed: int, mu_schedule: MuSchedule,
                 weight_average: str = "none") -> None:
        if weight_average not in WEIGHT_AVERAGES:
            raise ValueError(f"unknown weight average {weight_average!r}: choose one of {', '.join(WEIGHT_AVERAGES)}")
        self.model = model
        self.seed = seed
        self.mu_schedule = mu_schedule
        self.update = IntegerUpdate(model, mu_schedule)
        self.weight_average = weight_average
        self.average = WeightAverage(model) if weight_average != "none" else None

    @torch.no_grad()
    def train_step(self, x: QTensor, y: torch.Tensor, step: int, epoch: int) -> QTensor:
        """Train on one batch; returns its int8 logits as computed before the update."""
        self.model.train()
        ctx = StepContext(self.seed, step)
        logits = self.model(x, ctx)
        error = cross_entropy_grad(logits, y, self.seed, step)
        self.model.backward(error, ctx)
        self.update.step(epoch)
        if self.average is not None:
            self.average.accumulate()
        return logits

    def averaged(self):
        """Context in which the model holds the mean weights since the last restart (a no-op
        without averaging)."""
        return self.average.applied() if self.average is not None else nullcontext()

    def begin_epoch(self, epoch: int) -> None:
        """Called before the first batch of ``epoch`` (not when resuming inside it): restarts the
        weight sums every epoch ("epoch") or when mu changes ("phase")."""
        if self.average is None:
            return
        mu = self.mu_schedule
        if self.weight_average == "epoch" or epoch == 0 or mu(epoch) != mu(epoch - 1):
            self.average.reset()

    @torch.no_grad()
    def predict(self, x: QTensor) -> QTensor:
        self.model.eval()
        return self.model(x)
