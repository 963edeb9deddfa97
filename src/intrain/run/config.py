"""What a training run depends on: ``TrainConfig``, the names of its choices, and the checks
that need no data (each raising ``ConfigError`` with one line saying what is wrong and what to do).

``TrainConfig.resolved()`` fills every ``None`` from the recipe (``intrain.run.recipes``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from intrain.methods.averaging import WEIGHT_AVERAGES
from intrain.data import DATASETS
from intrain.kernels import BACKENDS as KERNEL_BACKENDS
from intrain.models import MODELS
from intrain.run.recipes import default_recipe

ARITHS = ("int8", "float")
BACKENDS = ("auto",) + KERNEL_BACKENDS
DEVICES = ("cpu", "cuda")
#: Options that may differ on resume: they do not change any number a run computes.
RESUME_FREE = ("workers", "checkpoint_every")


class ConfigError(ValueError):
    """Bad user input; the message is one line saying what is wrong and what to do."""


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``None`` means "the recipe's default"."""

    dataset: str = "digits"
    model: str = "mlp"
    arith: str = "int8"
    data_dir: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    seed: int = 0
    val_split: int | None = None
    train_limit: int | None = None
    mu_schedule: str | None = None  # int8 only
    lr: float | None = None  # float only; default scales with the batch size
    backend: str = "auto"  # int8 only
    device: str = "cpu"
    out: str | None = None  # default: runs/<dataset>-<model>-<arith>-<k>, first free k
    overwrite: bool = False
    width: float = 1.0  # multiplies every layer's channel / unit count
    weight_bits: int = 8  # int8 only: 16 keeps NITI's int16 master weights behind the int8 ones
    error_rounding: str = "nearest"  # int8 only: rounding of back-propagated errors
    weight_average: str = "phase"  # int8 only: mean weights since mu ("phase") or the epoch ("epoch") began
    augment: bool | None = None  # random crop + flip; default: on for cifar10 only
    workers: int = 0  # data loader processes; results are identical for any number
    checkpoint_every: int | None = None  # also checkpoint every N global steps

    def resolved(self) -> "TrainConfig":
        """A copy with every recipe default filled in (batch size first: lr depends on it)."""
        recipe = default_recipe(self.dataset, self.model, self.arith)
        batch = recipe.batch_size if self.batch_size is None else self.batch_size
        return replace(
            self,
            epochs=recipe.epochs if self.epochs is None else self.epochs,
            batch_size=batch,
            mu_schedule=recipe.mu_schedule if self.mu_schedule is None else self.mu_schedule,
            lr=recipe.lr_for(batch) if self.lr is None else self.lr,
            augment=(self.dataset == "cifar10") if self.augment is None else bool(self.augment),
        )


def check_args(c: TrainConfig) -> None:
    """Argument checks that need no data (the CLI's argparse does most of them too)."""
    if c.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {c.dataset!r}: choose one of {', '.join(DATASETS)}")
    if c.model not in MODELS:
        raise ConfigError(f"unknown model {c.model!r}: choose one of {', '.join(MODELS)}")
    if c.arith not in ARITHS:
        raise ConfigError(f"unknown arithmetic {c.arith!r}: choose one of {', '.join(ARITHS)}")
    if c.backend not in BACKENDS:
        raise ConfigError(f"unknown backend {c.backend!r}: choose one of {', '.join(BACKENDS)}")
    if c.epochs < 0:
        raise ConfigError(f"--epochs must be 0 or more, got {c.epochs}")
    if c.batch_size < 1:
        raise ConfigError(f"--batch-size must be 1 or more, got {c.batch_size}")
    if c.seed < 0:
        raise ConfigError(f"--seed must be 0 or more, got {c.seed}")
    if not c.lr > 0:
        raise ConfigError(f"--lr must be a positive number, got {c.lr}")
    if not (c.width > 0 and c.width != float("inf")):
        raise ConfigError(f"--width must be a positive number, got {c.width}")
    if c.workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {c.workers}")
    if c.checkpoint_every is not None and c.checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every must be 1 or more, got {c.checkpoint_every}")
    if c.device not in DEVICES:
        raise ConfigError(f"unknown device {c.device!r}: choose one of {', '.join(DEVICES)}")
    if c.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available: use --device cpu")
    if c.weight_average not in WEIGHT_AVERAGES:
        raise ConfigError(f"unknown weight average {c.weight_average!r}: choose one of {', '.join(WEIGHT_AVERAGES)}")
    if c.arith == "int8":
        mu_schedule(c.mu_schedule)  # raises ConfigError when unreadable


def mu_schedule(text: str):
    from intrain.methods.update import MuSchedule

    try:
        return MuSchedule.parse(text)
    except ValueError as err:
        raise ConfigError(f"--mu-schedule: {err}") from None
