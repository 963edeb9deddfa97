"""NITI (Wang et al., IEEE TPDS 2022): integer-only training with int8 tensors, as a ``Method``.

One step (``train_step``): forward in the model's number format, the integer cross-entropy
gradient (``methods.loss``), backward, the integer update without learning rate
(``methods.update``), and, unless ``weight_average`` is "none", the updated weights added into
integer running sums (``methods.averaging``) that restart in ``begin_epoch`` (every epoch, or when
mu changes) and whose mean ``averaged()`` applies for evaluation and saving (with the twin updates
below, "last:N": the mean of the masters at the ends of the last N epochs, added in
``end_epoch``). Everything in it is an integer operation on integer tensors (the audit test
records every aten operator to prove it).
Its random numbers (loss rounding, error rounding, dropout) are keyed by ``(seed, step, layer)``
and the element's position in the batch, so any step can be replayed bit for bit.

Data parallel (``collective`` of several processes): each process trains on its shard of every
batch; every maximum that picks a shift and every weight gradient is reduced over the processes
exactly (``layers.base``, ``methods.update``), so every process ends the step with the weights of
one process training on the whole batch.

The number format (``numeric.formats``) follows from the options: ``NITI_INT8``, or with
``weight_bits=16`` ``NITI_INT8_MASTER16`` (int16 master weights behind the int8 ones, NITI's
ImageNet setting), with the chosen error rounding.

Three updates (``--update``): NITI's (``niti``, ``methods.update``: no learning rate, each layer's
largest step ``2**mu`` int8 units, the weight exponent fixed) and the float twin's two recipes on
integers: SGD (``sgd``, ``methods.sgd_fixed``: int32 master weights and momentum with exponents,
Nesterov momentum, weight decay, warm-up and cosine decay of ``--lr``) and AdamW (``adamw``,
``methods.adamw_fixed``: int32 masters and first moments, int64 second moments, the same
schedule); after each step the int8 weight is the master rounded to nearest with its own
exponent. The forward and backward products are the same int8 ones under all three. Why the
twin's updates exist: NITI's step is normalised to the layer's largest gradient, and the float
twin trained with that normalised step scores as the int8 model does, below the float recipe
(BENCHMARKS.md, issue 17); AdamW's step is normalised per element instead, and the recurrent
models' float twins train with it (BENCHMARKS.md, issue 14). Options of another update are
refused, and the recipe gives only the chosen update's.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import torch

from intrain.kernels import BACKENDS, CpuBackend, CpuSettings
from intrain.layers import StepContext, weighted_layers
from intrain.methods.averaging import LAST_EPOCHS, EpochEndAverage, WeightAverage, last_epochs, parse_weight_average
from intrain.methods.base import (BIAS_CHOICES, Method, MethodOptionError, flag, fraction_below_one, nonnegative_float,
                                  option, positive_float)
from intrain.methods.loss import cross_entropy_grad
from intrain.layers.tensor_ring import TensorRingCore
from intrain.methods.sgd_fixed import usable_rate
from intrain.methods.float_twin import WEIGHT_DECAY
from intrain.methods.twin_updates import TWIN_UPDATES
from intrain.methods.update import CORE_UPDATES, IntegerUpdate, MuSchedule, check_decay_shift
from intrain.models import build_int_model
from intrain.numeric.formats import (ACTIVATION_ROUNDINGS, ERROR_ROUNDINGS, NITI_INT8, NITI_INT8_MASTER16, RELU_SCALES,
                                     NumberFormat)
from intrain.numeric.collective import LOCAL, Collective
from intrain.numeric.qtensor import QTensor

#: Formats by ``--weight-bits``.
WEIGHT_BITS = {8: NITI_INT8, 16: NITI_INT8_MASTER16}

#: ``--update``: NITI's integer update, or the float twin's SGD or AdamW recipe on integers (module
#: docstring, ``methods.twin_updates``), by name.
UPDATES = ("niti", *TWIN_UPDATES)
#: Options that only NITI's update reads (with their values that mean "not used"), and the twin
#: updates'; ``Niti.make_options`` drops the recipe's values of the other update's options.
NITI_UPDATE_OPTIONS = {"mu_schedule": None, "weight_bits": 8, "weight_decay_shift": None, "core_update": "niti",
                       "core_mu_schedule": None}
TWIN_UPDATE_OPTIONS = {"lr": None, "weight_decay": None, "biases": "off"}


def parse_mu_schedule(text: str) -> str:
    try:
        MuSchedule.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


@dataclass(frozen=True)
class NitiOptions:
    update: str = option(
        "niti", help="weight update: NITI's ('niti': no learning rate, each layer's largest step 2**mu int8 units), "
                     "'sgd' (the float twin's SGD recipe on int32 master weights and momentum, integer-only) or "
                     "'adamw' (the float twin's AdamW recipe on int32 masters and moments, integer-only) "
                     "(default: from the recipe, else niti)", choices=UPDATES)
    lr: float | None = option(
        help="--update sgd or adamw: peak learning rate (default: from the recipe, the float twin's; for adamw "
             "only on data sets whose float recipe is AdamW)", parse=positive_float, metavar="LR")
    weight_decay: float | None = option(
        help="weight decay of the weight matrices and kernels, not of biases (int8: --update sgd or adamw; NITI's "
             f"update takes --weight-decay-shift) (default: from the recipe, else the float twin's {WEIGHT_DECAY})",
        parse=nonnegative_float, metavar="WD")
    label_smoothing: float = option(
        0, help="label smoothing of the loss gradient's target: 1 - eps on the label plus eps / classes on every "
                  "class, as the float twin's (each class's share rounded to 2**-14: methods.loss) "
                  "(default: from the recipe, else 0)",
        parse=fraction_below_one, metavar="EPS")
    mu_schedule: str | None = option(
        help="update size by epoch as epoch:mu pairs, e.g. '0:5,100:4,150:3': the largest update of a layer moves "
             "its int8 weight by 2**mu steps, with or without int16 masters (with them a negative mu makes "
             "sub-step updates) (default: from the recipe)",
        parse=parse_mu_schedule, metavar="SPEC")
    backend: str = option(
        "auto", help="integer kernels to use (auto: the fastest for the device)", choices=("auto",) + BACKENDS)
    int8_gemm: str = option(
        "auto", help="cpu backend: int8 products on this CPU's int8 GEMM units (torch._int_mm) 'on', exactly on its "
                     "float units 'off', or 'auto': on where the int8 GEMM measured at least 2x float32 here (once "
                     "per machine, cached), for layers of 32 channels or more; except with 'on', first layers of "
                     "1-3 channels run on direct integer kernels in C; the results are bit-identical either way",
        choices=("auto", "on", "off"))
    weight_bits: int = option(
        8, help="16 keeps an int16 master copy of every weight that takes the updates, while all products "
                "use its upper 8 bits (NITI's 16-bit weight accumulation)", parse=int, choices=tuple(WEIGHT_BITS))
    error_rounding: str = option(
        "nearest", help="rounding of the errors sent down to earlier layers: NITI's nearest, or stochastic",
        choices=ERROR_ROUNDINGS)
    activation_rounding: str = option(
        "nearest", help="rounding of convolution and linear outputs in training steps: NITI's nearest, or stochastic "
                        "(unbiased noise of up to one step; it beat nearest on no tuning split measured, BENCHMARKS.md); "
                        "evaluation always rounds to nearest "
                        "(default: from the recipe, else nearest)", choices=ACTIVATION_ROUNDINGS)
    core_update: str = option(
        "niti", help="update of the cores of tt-lstm / tr-lstm: NITI's ('niti': the core's largest gradient moves "
                     "its element by 2**mu int8 steps, the others in proportion) or 'sign' (every element with a "
                     "non-zero gradient moves by 2**mu steps against its sign); other layers always take NITI's "
                     "(default: from the recipe)", choices=CORE_UPDATES)
    core_mu_schedule: str | None = option(
        help="mu by epoch for the cores of tt-lstm / tr-lstm, written like --mu-schedule (default: from the "
             "recipe, else --mu-schedule's)", parse=parse_mu_schedule, metavar="SPEC")
    weight_decay_shift: int | None = option(
        help="integer weight decay: every step each weight shrinks towards 0 by 2**(mu - K) of itself, "
             "stochastically rounded (SGD's learning rate x weight decay, with mu as the rate); K must exceed every "
             "mu (default: from the recipe, off)", parse=int, metavar="K")
    relu_scale: str = option(
        "magnitude", help="output exponent of a convolution or linear layer directly followed by a ReLU: from its "
                          "largest magnitude ('magnitude', NITI's) or its largest positive value ('positive': the "
                          "ReLU's output gets the whole int8 range) (default: from the recipe, else magnitude)",
        choices=RELU_SCALES)
    biases: str = option(
        "off", help="'on' gives every convolution and linear layer an integer bias where the float twin has one "
                    "(zero at the start, added before the layer's rounding, no weight decay); needs --update sgd or "
                    "adamw; not for models with batch normalisation or LSTMs (default: from the recipe, else off)",
        choices=BIAS_CHOICES)
    weight_average: str = option(
        "phase", help="evaluate and save the integer mean of the weights over the steps since mu last changed "
                      "('phase') or since the epoch began ('epoch'), or, with --update sgd or adamw, of the masters "
                      "at the ends of the last N epochs ('last:N'), while training continues from the latest ones; "
                      "'none' uses the latest weights (default: from the recipe, else phase with NITI's update and "
                      "none with the others)",
        parse=parse_weight_average, metavar="{phase,epoch,none,last:N}")

    @property
    def fmt(self) -> NumberFormat:
        return replace(WEIGHT_BITS[self.weight_bits], error_rounding=self.error_rounding, relu_scale=self.relu_scale,
                       activation_rounding=self.activation_rounding)


class Niti(Method):
    name = "int8"
    summary = "integer-only training (NITI)"
    Options = NitiOptions
    integer = True
    data_parallel = True

    @classmethod
    def make_options(cls, given: dict, recipe_defaults: dict):
        """As ``Method.make_options``, with the recipe's values of the options the chosen update
        does not read left out (an update given on the command line overrides the recipe's)."""
        update = given.get("update") or recipe_defaults.get("update", "niti")
        unused = NITI_UPDATE_OPTIONS if update in TWIN_UPDATES else TWIN_UPDATE_OPTIONS
        defaults = {name: value for name, value in recipe_defaults.items() if name not in unused}
        average = recipe_defaults.get("weight_average", "phase")
        if update in TWIN_UPDATES and last_epochs(average) is None:
            defaults["weight_average"] = "none"
        elif update not in TWIN_UPDATES and last_epochs(average) is not None:
            defaults["weight_average"] = "phase"  # the recipe's is its twin update's
        if update == "adamw":  # the recipe's rate is SGD's; AdamW's where the float twin trains with it
            defaults["lr"] = recipe_defaults.get("adamw_lr")
        return super().make_options(given, defaults)

    @classmethod
    def check_options(cls, options: NitiOptions) -> None:
        super().check_options(options)
        try:
            parse_weight_average(options.weight_average)
        except argparse.ArgumentTypeError as err:
            raise MethodOptionError(str(err)) from None
        if options.update in TWIN_UPDATES:
            cls._check_twin_options(options)
            return
        if last_epochs(options.weight_average) is not None:
            raise MethodOptionError(f"--weight-average {options.weight_average} averages the masters of --update sgd "
                                    f"or adamw: NITI's update takes phase, epoch or none")
        if options.weight_decay is not None:
            raise MethodOptionError("--weight-decay sets the weight decay of --update sgd or adamw: NITI's update "
                                    "takes --weight-decay-shift; leave it out or add --update sgd or adamw")
        if options.lr is not None:
            raise MethodOptionError("--lr sets the learning rate of --update sgd or adamw: NITI's update has none "
                                    "(its step size is --mu-schedule); leave it out or add --update sgd or adamw")
        if options.biases == "on":
            raise MethodOptionError("--biases on needs --update sgd or adamw: NITI's update keeps each layer's "
                                    "exponent where it started, and a bias starts at zero, with no scale to keep")
        if options.mu_schedule is None:
            raise MethodOptionError("--mu-schedule is needed (the recipe gives none)")
        schedules = {}
        for name in ("mu_schedule", "core_mu_schedule"):
            text = getattr(options, name)
            if text is None:
                continue
            try:
                schedules[name] = MuSchedule.parse(text)
            except ValueError as err:
                raise MethodOptionError(f"{flag(name)}: {err}") from None
        if options.int8_gemm != "auto" and options.backend not in ("auto", "cpu"):
            raise MethodOptionError(f"--int8-gemm {options.int8_gemm} chooses a path of the cpu backend: leave it out "
                                    f"with --backend {options.backend}")
        try:
            check_decay_shift(options.weight_decay_shift, schedules.values())
        except ValueError as err:
            raise MethodOptionError(f"--weight-decay-shift {err}") from None
        fmt = options.fmt
        lowest = -fmt.master_extra_bits if fmt.master_bits is not None else 0
        for name, schedule in schedules.items():
            if min(mu for _, mu in schedule.points) < lowest:
                raise MethodOptionError(f"{flag(name)} {schedule}: mu below {lowest} needs "
                                        + ("more master bits" if lowest else "--weight-bits 16 (sub-step updates)"))

    @classmethod
    def _check_twin_options(cls, options: NitiOptions) -> None:
        update = f"--update {options.update}"
        for name, unused in NITI_UPDATE_OPTIONS.items():
            if getattr(options, name) != unused:
                raise MethodOptionError(f"{flag(name)} applies to NITI's update: leave it out with {update} "
                                        f"(int32 master weights, the step size is --lr)")
        if options.weight_average in ("phase", "epoch"):
            raise MethodOptionError(f"--weight-average {options.weight_average} sums int8 weights of one exponent, "
                                    f"and {update} changes the exponent every step: use --weight-average "
                                    f"{LAST_EPOCHS}N (the masters at the ends of the last N epochs) or none")
        if options.lr is None and options.update == "adamw":
            raise MethodOptionError("--update adamw needs --lr here: this data set's float recipe is not AdamW, so "
                                    "the recipe has no AdamW rate (PyTorch's default is 1e-3)")
        if not usable_rate(options.lr):
            raise MethodOptionError(f"{update} needs a positive --lr, got {options.lr}")

    @classmethod
    def build_model(cls, options: NitiOptions, model_name: str, in_shape, num_classes: int, *, seed: int,
                    width: float, device: str, hidden: list[int] | None = None, recurrent=None) -> torch.nn.Module:
        backend = options.backend
        if options.int8_gemm != "auto":
            if torch.device(device).type != "cpu":
                raise MethodOptionError(f"--int8-gemm {options.int8_gemm} chooses a path of the cpu backend, which "
                                        f"runs on CPU tensors only: leave it out with --device {device}")
            backend = CpuBackend(CpuSettings(use_int8_gemm=options.int8_gemm == "on"))
        model = build_int_model(model_name, in_shape, num_classes, seed, backend=backend, device=device,
                                width=width, fmt=options.fmt, hidden=hidden, recurrent=recurrent,
                                biases=options.biases == "on")
        core_options = [f"{flag(name)} {value}" for name, value in
                        (("core_update", options.core_update), ("core_mu_schedule", options.core_mu_schedule))
                        if value not in (None, "niti")]
        if core_options and not any(isinstance(m, TensorRingCore) for m in model.modules()):
            raise MethodOptionError(f"{core_options[0]} applies to the cores of tt-lstm and tr-lstm: "
                                    f"{model_name} has none, leave it out")
        return model

    def __init__(self, model: torch.nn.Module, options: NitiOptions, *, seed: int, total_steps: int = 0,
                 collective: Collective = LOCAL) -> None:
        super().__init__(model, options, seed=seed, total_steps=total_steps, collective=collective)
        self.fmt = options.fmt
        self.average = WeightAverage(model) if options.weight_average in ("phase", "epoch") else None
        if options.update in TWIN_UPDATES:
            # None: not given, so the float twin's (None also marks it unused by NITI's update)
            decay = WEIGHT_DECAY if options.weight_decay is None else options.weight_decay
            self.twin = TWIN_UPDATES[options.update](model, self.fmt, options.lr, total_steps, collective,
                                                     weight_decay=decay)
            last = last_epochs(options.weight_average)
            if last is not None:
                self.average = EpochEndAverage(weighted_layers(model), lambda: self.twin.master, last,
                                               self.fmt.bits)
            return
        self.twin = None
        self.mu_schedule = MuSchedule.parse(options.mu_schedule)
        self.core_schedule = (self.mu_schedule if options.core_mu_schedule is None
                              else MuSchedule.parse(options.core_mu_schedule))
        self.update = IntegerUpdate(model, self.mu_schedule, collective, core_rule=options.core_update,
                                    core_schedule=self.core_schedule, decay_shift=options.weight_decay_shift,
                                    seed=seed)

    @torch.no_grad()
    def train_step(self, x: QTensor, y: torch.Tensor, step: int, epoch: int, sample_offset: int = 0) -> QTensor:
        """Train on one batch (or this process's shard of it, from sample ``sample_offset``);
        returns its logits as computed before the update."""
        self.model.train()
        # Each layer is updated as soon as backward has made its gradient (the update of a layer
        # reads nothing but its own gradient and weight, so the order changes no bit), which
        # frees the gradients one by one: ResNet-18's would otherwise all be alive at once, 42.6 MiB
        # of int32 at width 1 (``python benchmarks/speed.py --model resnet18``, peak memory).
        if self.twin is not None:
            batch = y.shape[0]
            if self.collective.world > 1:  # the gradient is the whole batch's: the mean divides by its size
                batch = int(self.collective.sum(torch.tensor(batch, dtype=torch.int64, device=y.device)))
            update = lambda within=None: self.twin.step(step, batch, within=within)
        else:
            update = lambda within=None: self.update.step(epoch, within=within, step=step)
        ctx = StepContext(self.seed, step, sample_offset, self.collective, gradient_ready=update)
        logits = self.model(x, ctx)
        error = cross_entropy_grad(logits, y, self.seed, step, self.fmt, sample_offset=sample_offset,
                                   collective=self.collective, label_smoothing=self.options.label_smoothing)
        self.model.backward(error, ctx)
        update()  # layers no container reported
        if isinstance(self.average, WeightAverage):
            self.average.accumulate()
        return logits

    def averaged(self):
        """Context in which the model holds the mean weights since the last restart (the latest
        weights without averaging)."""
        return self.average.applied() if self.average is not None else super().averaged()

    def begin_epoch(self, epoch: int) -> None:
        """Restarts the weight sums every epoch ("epoch") or when mu changes ("phase")."""
        if not isinstance(self.average, WeightAverage):  # always with --update sgd or adamw: no mu
            return
        changed = any(mu(epoch) != mu(epoch - 1) for mu in (self.mu_schedule, self.core_schedule))
        if self.options.weight_average == "epoch" or epoch == 0 or changed:
            self.average.reset()

    def end_epoch(self, epoch: int, epochs: int) -> None:
        """Adds the masters to the mean of the last epochs ("last:N") once its window has begun."""
        if isinstance(self.average, EpochEndAverage):
            self.average.end_epoch(epoch, epochs)

    def state_dict(self) -> dict:
        # The integer path draws its random numbers from the counter-based generator keyed by
        # (seed, step, layer): no generator state to keep, only the weight sums (or the twin
        # update's masters and moments, under "sgd_update" or "adamw_update").
        state = {"weight_average": None if self.average is None else self.average.state_dict()}
        for name in TWIN_UPDATES:
            state[f"{name}_update"] = self.twin.state_dict() if self.options.update == name else None
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.twin is not None:
            key = f"{self.options.update}_update"
            if state.get(key) is None:
                raise ValueError(f"no master weights and moments of --update {self.options.update}")
            self.twin.load_state_dict(state[key])
        if self.average is not None:
            if state.get("weight_average") is None:
                raise ValueError("no weight average state")
            self.average.load_state_dict(state["weight_average"])
