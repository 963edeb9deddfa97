"""One integer training step: forward, integer loss gradient, backward, integer update.

Everything inside ``IntegerTrainer.train_step`` is an integer operation on integer tensors (the
audit test records every aten operator to prove it). The random numbers it uses (loss rounding,
dropout) are keyed by ``(seed, step)``, so any step can be replayed bit for bit. With
``average_weights`` the step also adds the updated weights into integer running sums
(:mod:`intrain.averaging`), whose mean ``averaged()`` applies for evaluation and saving.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from intrain.averaging import WeightAverage
from intrain.layers import IntSequential, StepContext
from intrain.loss import cross_entropy_grad
from intrain.optim import IntegerUpdate, MuSchedule
from intrain.qtensor import QTensor


class IntegerTrainer:
    def __init__(self, model: IntSequential, seed: int, mu_schedule: MuSchedule,
                 average_weights: bool = False) -> None:
        self.model = model
        self.seed = seed
        self.update = IntegerUpdate(model, mu_schedule)
        self.average = WeightAverage(model) if average_weights else None

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

    def restart_average(self) -> None:
        if self.average is not None:
            self.average.reset()

    @torch.no_grad()
    def predict(self, x: QTensor) -> QTensor:
        self.model.eval()
        return self.model(x)
