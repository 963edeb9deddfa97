"""What a training method is, and the registry the run and the command line choose from.

A method (NITI's int8 training, the float32 twin, ...) is a subclass of ``Method`` listed in
``intrain.methods.METHODS`` under the name ``--arith`` takes. It brings:

- ``Options``: a dataclass of its own options. Each field is an ``option(...)``: its default
  (``None`` = from the recipe of the dataset and model), help text and parser, from which the
  command line makes one ``--flag`` per field. An option of one method given to another is an
  error (``check_options``).
- ``build_model``: the network for a model name, in the method's arithmetic.
- per run: ``train_step``, ``predict``, ``begin_epoch``, ``averaged`` (the weights evaluated and
  saved), ``state_dict``/``load_state_dict`` (what a checkpoint needs beyond the model's own
  state_dict, for a bit-exact resume).
- ``data_parallel``: whether it trains one batch split over several processes (``collective``,
  a ``numeric.collective.Collective``) with the result of one process. Only such a method's
  ``train_step`` is given ``sample_offset`` (its shard's first sample in the batch); the others
  are never run on several processes and may leave the argument out.

Adding a method means adding a module with such a class and one entry in ``METHODS``.

Inputs: the run gives every method the same images, as the int8 pixel ``QTensor`` of
``intrain.data.pixels``; ``network_input`` turns it into what the model takes (integer methods
keep it, the float twin uses its real values).
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from dataclasses import MISSING, asdict, field, fields
from typing import Any, Callable, ClassVar

import torch

from intrain.numeric.collective import LOCAL, Collective
from intrain.numeric.qtensor import QTensor


class MethodOptionError(ValueError):
    """A method option that is unknown to the method, or has a bad value; one line."""


def option(default: Any = None, *, help: str, parse: Callable[[str], Any] | None = None,
           choices: tuple | None = None, metavar: str | None = None):
    """A field of a method's ``Options``; ``parse`` turns the command-line text into the value
    (raising ``argparse.ArgumentTypeError`` or ``ValueError`` with what is wrong)."""
    return field(default=default, metadata=dict(help=help, parse=parse, choices=choices, metavar=metavar))


def positive_float(text: str) -> float:
    """Parser of a positive, finite number option (``--lr``, ``--width``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """Parser of a finite number option that may be 0 (``--weight-decay``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def fraction_below_one(text: str) -> float:
    """Parser of a number in [0, 1) (``--label-smoothing``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _check_recipe_rate(given: dict, recipe_defaults: dict) -> None:
    """Refuse a recipe's learning rate for an optimiser it was not chosen for: an ``--optimizer``
    other than the recipe's, without ``--lr``, would otherwise train at the other optimiser's rate
    (SGD's 0.05 for AdamW, or AdamW's 3e-3 for SGD). For every method with an ``optimizer`` option
    (the float twin, DFP16)."""
    chosen = given.get("optimizer")
    recipe = recipe_defaults.get("optimizer", "sgd")
    if chosen is None or chosen == recipe or given.get("lr") is not None or "lr" not in recipe_defaults:
        return
    raise MethodOptionError(f"--optimizer {chosen} needs --lr here: the recipe's rate {recipe_defaults['lr']:g} is "
                            f"for its {recipe} (the recipes train sgd at 0.05 and adamw at 3e-3, at batch 64)")


#: ``--biases`` of the integer methods: the integer model's convolution and linear layers without
#: biases (NITI's), or with them (``models.build.build_int_model``).
BIAS_CHOICES = ("off", "on")


def flag(name: str) -> str:
    """The command-line flag of an option field: ``mu_schedule`` -> ``--mu-schedule``."""
    return "--" + name.replace("_", "-")


class Method:
    """Base class of training methods (see the module docstring)."""

    #: The ``--arith`` value that selects the method.
    name: ClassVar[str]
    #: One line for ``--help``.
    summary: ClassVar[str]
    #: The dataclass of the method's own options.
    Options: ClassVar[type]
    #: Whether the model computes on integers (QTensor inputs and logits).
    integer: ClassVar[bool]
    #: Whether it trains data-parallel (a collective of several processes), bit for bit as one.
    data_parallel: ClassVar[bool] = False

    # ------------------------------------------------------------------ options

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls.Options))

    @classmethod
    def make_options(cls, given: dict, recipe_defaults: dict):
        """The method's options from the ``given`` ones (``None`` = not given) and the recipe's
        defaults; ``MethodOptionError`` for an option that is not the method's or a bad value."""
        foreign = [name for name, value in given.items() if value is not None and name not in cls.option_names()]
        if foreign:
            name = foreign[0]
            raise MethodOptionError(f"{flag(name)} does not apply to --arith {cls.name}: leave it out "
                                    f"({cls.name} takes {', '.join(map(flag, cls.option_names())) or 'no options'})")
        if "optimizer" in cls.option_names():
            _check_recipe_rate(given, recipe_defaults)
        values = {}
        for f in fields(cls.Options):
            value = given.get(f.name)
            if value is None:
                value = recipe_defaults.get(f.name, f.default if f.default is not MISSING else None)
            values[f.name] = value
        options = cls.Options(**values)
        cls.check_options(options)
        return options

    @classmethod
    def check_options(cls, options) -> None:
        """Raise ``MethodOptionError`` for an option value the method cannot use."""
        for f in fields(options):
            choices = f.metadata.get("choices")
            value = getattr(options, f.name)
            if choices is not None and value not in choices:
                raise MethodOptionError(f"unknown {flag(f.name)} {value!r}: choose one of {', '.join(map(str, choices))}")

    @classmethod
    def options_dict(cls, options) -> dict:
        return asdict(options)

    # ------------------------------------------------------------------ building

    @classmethod
    def build_model(cls, options, model_name: str, in_shape, num_classes: int, *, seed: int,
                    width: float, device: str, hidden: list[int] | None = None, recurrent=None) -> torch.nn.Module:
        """The network; ``hidden``: the MLP's hidden sizes; ``recurrent``: the recurrent models'
        ``models.zoo.RecurrentOptions``."""
        raise NotImplementedError

    @classmethod
    def network_input(cls, pixels: QTensor):
        """What the model takes for a batch of int8 pixels (see the module docstring)."""
        return pixels

    @staticmethod
    def logits_as_float(logits) -> torch.Tensor:
        """The logits' real values in float, for people (progress, metrics, arg-max)."""
        return logits.to_float() if isinstance(logits, QTensor) else logits

    # ------------------------------------------------------------------ training

    def __init__(self, model: torch.nn.Module, options, *, seed: int, total_steps: int,
                 collective: Collective = LOCAL) -> None:
        type(self).check_options(options)
        if collective.world > 1 and not self.data_parallel:
            raise ValueError(f"--arith {self.name} does not train data-parallel: run it in one process")
        self.model = model
        self.options = options
        self.seed = seed
        self.total_steps = total_steps
        self.collective = collective

    def train_step(self, x, y: torch.Tensor, step: int, epoch: int, sample_offset: int = 0):
        """Train on one batch at global step ``step`` (data parallel: this process's shard of
        it, from sample ``sample_offset`` on, see the module docstring); returns its logits
        before the update."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, x):
        """Eval-mode logits of ``x``; the model is left in train mode."""
        self.model.eval()
        try:
            return self.model(x)
        finally:
            self.model.train()

    def begin_epoch(self, epoch: int) -> None:
        """Called before the first batch of ``epoch`` (not when resuming inside it)."""

    def end_epoch(self, epoch: int, epochs: int) -> None:
        """Called after the last batch of ``epoch`` of ``epochs`` (0-based), before it is evaluated."""

    def averaged(self):
        """Context in which the model holds the weights to evaluate and save."""
        return nullcontext()

    def state_dict(self) -> dict:
        """What a checkpoint needs besides the model's state_dict (CPU tensors, plain types)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s entries (``ValueError``/``KeyError`` when they do not fit)."""


def add_option_arguments(parser: argparse.ArgumentParser, methods: dict[str, type[Method]]) -> None:
    """One ``--flag`` per option of every method in ``methods`` (an option several methods share,
    such as ``backend``, once), with help saying which methods take it. Parsed values default to
    None, so that a run can tell which options were given."""
    owners: dict[str, list[str]] = {}
    specs: dict[str, Any] = {}
    for name, method in methods.items():
        for f in fields(method.Options):
            owners.setdefault(f.name, []).append(name)
            specs.setdefault(f.name, f)
    for name, f in specs.items():
        meta = f.metadata
        which = " and ".join(f"--arith {m}" for m in owners[name])
        # a help that states its default itself (e.g. "from the recipe, else ...") is not repeated
        default = "" if f.default in (None, MISSING) or "(default:" in meta["help"] else f" (default: {f.default})"
        kwargs = dict(help=f"{which} only: {meta['help']}{default}", default=None)
        if meta.get("choices") is not None:
            kwargs["choices"] = meta["choices"]
        if meta.get("parse") is not None:
            kwargs["type"] = meta["parse"]
        if meta.get("metavar") is not None:
            kwargs["metavar"] = meta["metavar"]
        parser.add_argument(flag(name), **kwargs)

