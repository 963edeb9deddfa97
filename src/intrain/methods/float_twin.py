"""The float32 twin: a standard, well-tuned SGD recipe for the same network.

Every integer run is judged against this baseline, so it is deliberately the usual strong
recipe rather than a copy of the integer method's constraints:

- SGD with Nesterov momentum 0.9, or (``optimizer="adamw"``, the recipe of the recurrent models
  on moving-mnist-actions, where SGD trained the tensor-ring LSTM not at all) AdamW with its
  default betas and the same decoupled weight decay and schedule;
- weight decay 5e-4 (``weight_decay``) on weights only (matrices and kernels); biases and other
  1-d parameters are not decayed, as is common practice, since decaying them only hurts;
- a per-step learning-rate schedule: linear warm-up over the first 2 % of all steps (at least
  one step), then cosine decay to 0 at the last step;
- cross-entropy loss on the logits;
- initialisation (``weight_init``): PyTorch's default, or Kaiming-uniform (``kaiming``: weights
  uniform in +-sqrt(6 / fan_in), biases 0), the scale the integer models start from
  (``layers.init``). PyTorch's default (uniform in +-sqrt(1 / fan_in)) has a sixth of that
  variance, so a plain ReLU stack without normalisation starts with its signal shrinking by
  about sqrt(6) per layer: the recipe (``run.recipes``) takes ``kaiming`` for the VGG-small
  models, where the default left a 7-layer network at chance;
- parameters (``float_params``): torch.nn's (``torch``: biases, and BatchNorm's scale and shift),
  or only the integer model's (``integer``: no biases, BatchNorm without affine; not for the
  recurrent models, whose gates keep their biases), a diagnostic that separates what the integer
  arithmetic costs from what the extra parameters add; no recipe takes it;
- gradient clipping (``clip_grad_norm``): off, or the whole gradient rescaled to at most that
  L2 norm before each step, the usual guard for recurrent networks. No recipe takes it: on the
  float TR-LSTM at AdamW 1e-2 it stopped a collapse but ended below plain 3e-3 (``run.recipes``).

Determinism: nothing here draws random numbers; seed torch (``torch.manual_seed``) before the
model is built and the run is reproducible on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from intrain.layers.recurrent import FloatLSTM
from intrain.methods.base import (Method, MethodOptionError, fraction_below_one, nonnegative_float, option,
                                  positive_float)
from intrain.models import build_float_model
from intrain.numeric.collective import LOCAL, Collective
from intrain.numeric.qtensor import QTensor

OPTIMIZERS = ("sgd", "adamw")
WEIGHT_INITS = ("torch", "kaiming")
#: ``--float-params``: torch.nn's parameters, or only those of the integer model (module docstring).
FLOAT_PARAMS = ("torch", "integer")
#: Fraction of all steps spent in linear warm-up.
WARMUP_FRACTION = 0.02
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
#: AdamW's betas and epsilon: PyTorch's defaults, named so that the integer AdamW
#: (``methods.adamw_fixed``) reads the same numbers.
ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-8


def warmup_length(total_steps: int) -> int:
    """Steps of linear warm-up in a run of ``total_steps`` steps (at least one)."""
    return max(1, round(WARMUP_FRACTION * total_steps))


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


@dataclass(frozen=True)
class FloatOptions:
    lr: float | None = option(help="peak learning rate (default: 0.05 x batch size / 64)", parse=positive_float,
                              metavar="LR")
    optimizer: str = option("sgd", help="SGD with Nesterov momentum, or AdamW (default: from the recipe, sgd; "
                            "the other one needs --lr)", choices=OPTIMIZERS)
    weight_init: str = option("torch", help="PyTorch's default initialisation, or Kaiming-uniform for ReLU networks "
                              "(weights uniform in +-sqrt(6 / fan_in), biases 0) (default: from the recipe, "
                              "kaiming for vgg-small models)", choices=WEIGHT_INITS)
    weight_decay: float = option(WEIGHT_DECAY, help="weight decay of the weight matrices and kernels (not of biases)",
                                 parse=nonnegative_float, metavar="WD")
    label_smoothing: float = option(0, help="label smoothing of the cross-entropy target: 1 - eps on the label plus "
                                    "eps / classes on every class (torch's label_smoothing) "
                                    "(default: from the recipe, else 0)",
                                    parse=fraction_below_one, metavar="EPS")
    clip_grad_norm: float | None = option(help="rescale the gradient to at most this L2 norm before each step "
                                          "(default: from the recipe, off)", parse=positive_float, metavar="NORM")
    float_params: str = option("torch", help="torch.nn's parameters (biases, BatchNorm's scale and shift), or only "
                               "the integer model's (no biases, BatchNorm without affine), to compare the "
                               "arithmetic alone", choices=FLOAT_PARAMS)


class FloatTwin(Method):
    """Trains a ``torch.nn.Module`` classifier with SGD or AdamW (``--optimizer``) and warm-up/cosine;
    one call per batch."""

    name = "float"
    summary = "the float32 twin (SGD, or AdamW where the recipe says)"
    Options = FloatOptions
    integer = False

    @classmethod
    def check_options(cls, options: FloatOptions) -> None:
        super().check_options(options)
        if options.lr is None or not options.lr > 0 or options.lr == float("inf"):
            raise MethodOptionError(f"--lr must be a positive number, got {options.lr}")
        if not 0 <= options.weight_decay < float("inf"):
            raise MethodOptionError(f"--weight-decay must be a number >= 0, got {options.weight_decay}")
        norm = options.clip_grad_norm
        if norm is not None and (not norm > 0 or norm == float("inf")):
            raise MethodOptionError(f"--clip-grad-norm must be a positive number, got {norm}")

    @classmethod
    def build_model(cls, options: FloatOptions, model_name: str, in_shape, num_classes: int, *, seed: int,
                    width: float, device: str, hidden: list[int] | None = None, recurrent=None) -> torch.nn.Module:
        """The float32 twin, initialised (``options.weight_init``) from torch's global generator
        seeded with ``seed`` (which also keys dropout)."""
        torch.manual_seed(seed)
        model = build_float_model(model_name, in_shape, num_classes, width=width, hidden=hidden,
                                  recurrent=recurrent, biases=options.float_params == "torch")
        if options.weight_init == "kaiming":
            for module in model.modules():
                if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                    torch.nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
                    if module.bias is not None:
                        torch.nn.init.zeros_(module.bias)
            for module in model.modules():
                if isinstance(module, FloatLSTM):  # its forget gate keeps the model's bias
                    module.reset_forget_bias()
        return model.to(device)

    @classmethod
    def network_input(cls, pixels: QTensor) -> torch.Tensor:
        return pixels.to_float()

    def __init__(self, model: torch.nn.Module, options: FloatOptions, *, seed: int = 0, total_steps: int,
                 collective: Collective = LOCAL) -> None:
        super().__init__(model, options, seed=seed, total_steps=max(0, int(total_steps)), collective=collective)
        self.base_lr = float(options.lr)
        self.clip_grad_norm = options.clip_grad_norm
        self.warmup_steps = warmup_length(self.total_steps)
        decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
        groups = [{"params": decay, "weight_decay": options.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        if options.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=self.lr_at(0), betas=ADAMW_BETAS, eps=ADAMW_EPS)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=self.lr_at(0), momentum=MOMENTUM, nesterov=True)

    def lr_at(self, step: int) -> float:
        """The learning rate this trainer uses at global step ``step``."""
        return lr_at(step, base_lr=self.base_lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int, epoch: int) -> torch.Tensor:
        """One SGD step on batch ``(x, y)`` at global step ``step``; returns the batch's logits.
        One process only (``data_parallel`` is off), so no shard offset.

        The logits are those of the forward pass the update is computed from (before the
        update), detached.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        self.model.train()
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.options.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.optimizer.step()
        return logits.detach()

    def _on_cuda(self) -> bool:
        return any(p.device.type == "cuda" for p in self.model.parameters())

    def state_dict(self) -> dict:
        """Momentum buffers and torch's generator states (dropout draws from them)."""
        state = {"optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state(), "cuda_rng": None}
        if self._on_cuda():
            state["cuda_rng"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("optimizer") is None or state.get("torch_rng") is None:
            raise ValueError("no optimizer state for the float twin")
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if self._on_cuda() and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
