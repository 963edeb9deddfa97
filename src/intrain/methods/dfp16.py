"""DFP16 (Das et al., ICLR 2018): 16-bit dynamic fixed point training with the float recipe, as a
``Method``.

Tensors are DFP16 (``numeric.formats.DFP16``): int16 values in ``[-32767, 32767]`` with one
power-of-two exponent per tensor, chosen from max ``|x|`` (``numeric.requant``). Every product of
a training step (forward, backward to the input, backward to the weights) takes DFP16 operands
(activations, weights, errors; the int8 pixels enter as int16) and runs through the format's
accumulator: by default the int32-chunked one, whose int32 partial sums provably cannot wrap
(``numeric.accumulate``). Outputs and errors are rounded back to DFP16 (errors nearest or
stochastic, ``--error-rounding``); the loss gradient ``softmax(z) - onehot(y)`` is computed in
integers (``methods.loss``) and rounded stochastically to DFP16.

The recipe is the float twin's, unchanged: its optimiser (``--optimizer``: SGD with Nesterov
momentum, or AdamW where the float twin trains with it, the recurrent models), weight decay,
warm-up and cosine decay, the same learning rate and batch size from ``run.recipes``; in two modes
(``--dfp16-master``):

- ``int32`` (default, integer-only): master weights and the optimiser's state are int32 tensors
  with exponents (AdamW's second moments int64) and every factor is an exact fixed-point product
  (``methods.sgd_fixed``, ``methods.adamw_fixed``); the whole step is integer, which the
  integer-only audits check;
- ``fp32`` (the paper's): float32 master weights and optimiser state updated by the float twin's
  optimiser (``methods.float_master``); products stay integer.

After each update the layer's int16 weight and its exponent are the master rounded to DFP16; the
saved model holds them (``model.pt``), the checkpoint also the masters and momentum. Random
numbers (loss and error rounding) are keyed by ``(seed, step, layer)``, so a resumed run repeats
the same bits.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import torch

from intrain.kernels import BACKENDS
from intrain.layers import StepContext, weighted_layers
from intrain.numeric.collective import LOCAL, Collective
from intrain.methods.base import (BIAS_CHOICES, Method, MethodOptionError, fraction_below_one, nonnegative_float,
                                  option, positive_float)
from intrain.methods.float_master import FloatMaster
from intrain.methods.float_twin import OPTIMIZERS, WEIGHT_DECAY
from intrain.methods.loss import cross_entropy_grad
from intrain.methods.sgd_fixed import usable_rate
from intrain.methods.twin_updates import TWIN_UPDATES
from intrain.models import build_int_model
from intrain.numeric.formats import ACCUMULATORS, DFP16, ERROR_ROUNDINGS, NumberFormat
from intrain.numeric.qtensor import QTensor

#: ``--dfp16-master``: integer-only masters (the update of each ``--optimizer`` from
#: ``methods.twin_updates``), or float32 ones as in the paper.
MASTERS = ("int32", "fp32")


def whole_number(text: str) -> int:
    """Parser of an integer option >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


@dataclass(frozen=True)
class Dfp16Options:
    lr: float | None = option(help="peak learning rate (default: the float twin's, 0.05 x batch size / 64)",
                              parse=positive_float, metavar="LR")
    backend: str = option(
        "auto", help="integer kernels to use (auto: the fastest for the device)", choices=("auto",) + BACKENDS)
    error_rounding: str = option(
        "nearest", help="rounding of the errors sent down to earlier layers: NITI's nearest, or stochastic",
        choices=ERROR_ROUNDINGS)
    optimizer: str = option("sgd", help="the float twin's optimiser: SGD with Nesterov momentum, or AdamW "
                                        "(default: from the recipe, the float twin's; the other one needs --lr)",
                            choices=OPTIMIZERS)
    weight_decay: float = option(WEIGHT_DECAY, help="the float twin's weight decay of the weight matrices and "
                                                   "kernels (not of biases)", parse=nonnegative_float, metavar="WD")
    label_smoothing: float = option(
        0, help="label smoothing of the loss gradient's target: 1 - eps on the label plus eps / classes on every "
                  "class, as the float twin's (each class's share rounded to 2**-14: methods.loss) "
                  "(default: from the recipe, else 0)",
        parse=fraction_below_one, metavar="EPS")
    biases: str = option(
        "off", help="'on' gives every convolution and linear layer a 16-bit bias where the float twin has one "
                    "(zero at the start, added before the layer's rounding, no weight decay); not for models with "
                    "batch normalisation or LSTMs (default: from the recipe, else off)", choices=BIAS_CHOICES)
    dfp16_master: str = option(
        "int32", help="master weights and optimiser state: int32 with exponents and fixed-point factors "
                      "(integer-only), or float32 as in Das et al.", choices=MASTERS)
    dfp16_accumulator: str = option(
        DFP16.accumulator, help="int32-chunked: int32 partial sums that cannot wrap (chunks, headroom shifts), "
                                "added in int64; exact: the exact sums (what int64 accumulators give)",
        choices=ACCUMULATORS)
    dfp16_chunk: int = option(
        DFP16.chunk_length, help="terms per int32 partial sum of the int32-chunked accumulator", parse=whole_number,
        metavar="L")
    dfp16_headroom: int = option(
        DFP16.headroom, help="least right shift (bits) of each product operand under the int32-chunked accumulator; "
                             "more is added where the bound needs it", parse=whole_number, metavar="BITS")

    @property
    def fmt(self) -> NumberFormat:
        return replace(DFP16, error_rounding=self.error_rounding, accumulator=self.dfp16_accumulator,
                       chunk_length=self.dfp16_chunk, headroom=self.dfp16_headroom)


class Dfp16(Method):
    name = "dfp16"
    summary = "16-bit dynamic fixed point with the float recipe (Das et al.)"
    Options = Dfp16Options
    integer = True

    @classmethod
    def check_options(cls, options: Dfp16Options) -> None:
        super().check_options(options)
        if not usable_rate(options.lr):
            raise MethodOptionError(f"--lr must be a positive number, got {options.lr}")
        if options.dfp16_chunk < 1:
            raise MethodOptionError(f"--dfp16-chunk must be 1 or more, got {options.dfp16_chunk}")
        if options.dfp16_headroom >= DFP16.bits:
            raise MethodOptionError(f"--dfp16-headroom must be below {DFP16.bits} bits, got {options.dfp16_headroom}")

    @classmethod
    def build_model(cls, options: Dfp16Options, model_name: str, in_shape, num_classes: int, *, seed: int,
                    width: float, device: str, hidden: list[int] | None = None, recurrent=None) -> torch.nn.Module:
        return build_int_model(model_name, in_shape, num_classes, seed, backend=options.backend, device=device,
                               width=width, fmt=options.fmt, hidden=hidden, recurrent=recurrent,
                               biases=options.biases == "on")

    @classmethod
    def network_input(cls, pixels: QTensor) -> QTensor:
        return QTensor(pixels.v.to(DFP16.dtype), pixels.e)

    def __init__(self, model: torch.nn.Module, options: Dfp16Options, *, seed: int, total_steps: int = 0,
                 collective: Collective = LOCAL) -> None:
        # data_parallel stays off: the int32-chunked headroom comes from each process's own maxima
        super().__init__(model, options, seed=seed, total_steps=total_steps, collective=collective)
        self.fmt = options.fmt
        if options.dfp16_master == "fp32":
            self.update = FloatMaster(model, self.fmt, options.lr, total_steps, optimizer=options.optimizer,
                                      weight_decay=options.weight_decay)
        else:
            self.update = TWIN_UPDATES[options.optimizer](model, self.fmt, options.lr, total_steps,
                                                          weight_decay=options.weight_decay)

    @torch.no_grad()
    def train_step(self, x: QTensor, y: torch.Tensor, step: int, epoch: int) -> QTensor:
        """Train on one batch; returns its logits as computed before the update."""
        self.model.train()
        batch = y.shape[0]
        # Each layer is updated as soon as backward has made its gradient (same bits in any
        # order), so the int64 gradients are freed one by one instead of all living at once.
        ctx = StepContext(self.seed, step, gradient_ready=lambda layer: self.update.step(step, batch, within=layer))
        logits = self.model(x, ctx)
        error = cross_entropy_grad(logits, y, self.seed, step, self.fmt, label_smoothing=self.options.label_smoothing)
        self.model.backward(error, ctx)
        self.update.step(step, batch)  # layers no container reported
        return logits

    def int32_wraps(self) -> list[int]:
        """Per weighted layer: results of its products so far that a plain int32 accumulator would
        have got wrong (``layers.base``; 0 under the int32-chunked accumulator)."""
        return [layer.int32_wraps for layer in weighted_layers(self.model)]

    def state_dict(self) -> dict:
        return {"dfp16_update": self.update.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("dfp16_update") is None:
            raise ValueError("no DFP16 master weights and optimiser state")
        self.update.load_state_dict(state["dfp16_update"])
