"""The float32 twin: a standard, well-tuned SGD recipe for the same network.

Every integer run is judged against this baseline, so it is deliberately the usual strong
recipe rather than a copy of the integer method's constraints:

- SGD with Nesterov momentum 0.9;
- weight decay 5e-4 on weights only (matrices and kernels); biases and other 1-d parameters
  are not decayed, as is common practice, since decaying them only hurts;
- a per-step learning-rate schedule: linear warm-up over the first 2 % of all steps (at least
  one step), then cosine decay to 0 at the last step;
- cross-entropy loss on the logits.

Determinism: nothing here draws random numbers; seed torch (``torch.manual_seed``) before the
model is built and the run is reproducible on CPU.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

#: Fraction of all steps spent in linear warm-up.
WARMUP_FRACTION = 0.02


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int) -> float:
    """Learning rate at global step ``step`` (0-based): linear warm-up, then cosine to 0.

    During warm-up step ``s`` uses ``base_lr * (s + 1) / warmup_steps``, so the first step is
    already non-zero and the last warm-up step reaches ``base_lr``. After it the rate follows
    ``base_lr * (1 + cos(pi * p)) / 2`` with ``p = (step - warmup_steps) / decay_steps``, which
    reaches 0 at ``step == total_steps`` (the last real step is one step short of it, as in
    the usual implementations). Steps past the end get rate 0.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0 or step >= total_steps:
        return 0.0
    progress = (step - warmup_steps) / decay_steps
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class FloatTrainer:
    """Trains a ``torch.nn.Module`` classifier with SGD + warm-up/cosine; one call per batch."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        epochs: int,
        steps_per_epoch: int,
        nesterov: bool = True,
    ) -> None:
        self.model = model
        self.base_lr = float(lr)
        self.total_steps = max(0, int(epochs) * int(steps_per_epoch))
        self.warmup_steps = max(1, round(WARMUP_FRACTION * self.total_steps))
        decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
        groups = [{"params": decay, "weight_decay": weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        self.optimizer = torch.optim.SGD(groups, lr=self.lr_at(0), momentum=momentum, nesterov=nesterov)

    def begin_epoch(self, epoch: int) -> None:
        """Nothing to do: the float twin's schedule is a function of the step."""

    def averaged(self):
        """The float twin evaluates and saves its latest weights."""
        return nullcontext()

    def lr_at(self, step: int) -> float:
        """The learning rate this trainer uses at global step ``step``."""
        return lr_at(step, base_lr=self.base_lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int, epoch: int) -> torch.Tensor:
        """One SGD step on batch ``(x, y)`` at global step ``step``; returns the batch's logits.

        The logits are those of the forward pass the update is computed from (before the
        update), detached. ``epoch`` is accepted for symmetry with the integer trainer.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        self.model.train()
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return logits.detach()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits for ``x`` (no gradient); the model is left in train mode."""
        self.model.eval()
        try:
            return self.model(x)
        finally:
            self.model.train()
