"""One integer training step: forward, integer loss gradient, backward, integer update.

Everything inside ``IntegerTrainer.train_step`` is an integer operation on integer tensors (the
audit test records every aten operator to prove it). The random numbers it uses (loss rounding,
dropout) are keyed by ``(seed, step)``, so any step can be replayed bit for bit.
"""

from __future__ import annotations

import torch

from intrain.layers import IntSequential, StepContext
from intrain.loss import cross_entropy_grad
from intrain.optim import IntegerUpdate, MuSchedule
from intrain.qtensor import QTensor


class IntegerTrainer:
    def __init__(self, model: IntSequential, seed: int, mu_schedule: MuSchedule) -> None:
        self.model = model
        self.seed = seed
        self.update = IntegerUpdate(model, mu_schedule)

    @torch.no_grad()
    def train_step(self, x: QTensor, y: torch.Tensor, step: int, epoch: int) -> QTensor:
        """Train on one batch; returns its int8 logits as computed before the update."""
        self.model.train()
        ctx = StepContext(self.seed, step)
        logits = self.model(x, ctx)
        error = cross_entropy_grad(logits, y, self.seed, step)
        self.model.backward(error, ctx)
        self.update.step(epoch)
        return logits

    @torch.no_grad()
    def predict(self, x: QTensor) -> QTensor:
        self.model.eval()
        return self.model(x)
