"""The float twin's SGD recipe on integers: int32 master weights and momentum with exponents
(DFP16's update, and NITI's ``--update sgd``).

The float twin (``methods.float_twin``) trains with SGD, Nesterov momentum ``MOMENTUM``, weight
decay ``WEIGHT_DECAY``, linear warm-up over ``warmup_length(total)`` steps and cosine decay to 0
(``lr_at``). ``FixedPointSgd`` runs the same update, PyTorch's ``torch.optim.SGD`` formula, with
integers only:

    g = G / N + wd * W;   B = m * B + g;   u = g + m * B;   W = W - lr_t * u

per weighted layer, where ``G`` is the layer's exact integer weight gradient of the summed loss
(``N`` samples; the float twin's loss is their mean); ``wd`` is 0 for biases (``decays``: as the
float twin, only weight matrices and kernels decay). ``W`` (master weight) and ``B`` (momentum)
are int32 tensors with a power-of-two exponent each (``|v| <= 2**31 - 1``, the exponent chosen
from max ``|v|`` after every operation, ``numeric.wide``). Every factor (``1/N``, ``wd``, ``m``,
``lr_t``) is a fixed-point scalar ``(f, e)`` with ``2**30 <= f < 2**31`` (``fixed``), so every
product ``v * f`` is exact in int64 (``< 2**62``) and rounded once (nearest) to 31 bits, and
every sum is aligned and rounded once (``numeric.wide.add``): each operation's relative error is
at most ``2**-30``. After the update the layer's weight is ``W`` rounded (nearest) to the
format's width (int16 for DFP16, int8 for NITI), with its new exponent.

Data parallel (``collective`` of several processes, NITI's): every exponent of a step is the same
in every process (``layers.base``), so the processes' exact shard gradients share one exponent
and their int64 sum (``Collective.sum``: exact, order-free) is the whole batch's gradient, bit for
bit; the update then runs on it identically in every process.

Where the factors come from: the hyper-parameters are the float twin's numbers (``--lr``,
``MOMENTUM``, ``--weight-decay``: ``WEIGHT_DECAY`` unless given), read once when the update is
built as the exact rationals their binary64 values are (``as_integer_ratio``); the learning rate of step ``s`` is an exact rational
times the schedule, whose cosine is computed with Python integers (``cos_pi``: a Taylor series in
fixed point with ``COS_BITS`` fraction bits, error below ``2**-55``), and the warm-up length is
``float_twin.warmup_length``, the same integer the float twin uses. No float is computed in a step.
"""

from __future__ import annotations

import torch

from intrain.layers import weighted_layers
from intrain.numeric.collective import LOCAL, Collective
from intrain.methods.float_twin import MOMENTUM, WEIGHT_DECAY, warmup_length
from intrain.numeric.formats import NumberFormat
from intrain.numeric.qtensor import QTensor
from intrain.numeric.requant import requantize
from intrain.numeric import wide

#: Fraction bits of the integer cosine.
COS_BITS = 64
#: floor(pi * 2**64) (pi to 80 digits by Machin's formula).
PI_Q64 = 57952155664616982739


def fixed(num: int, den: int) -> tuple[int, int]:
    """The positive rational ``num / den`` as ``(f, e)`` with ``f * 2**e`` its nearest value of
    31 significant bits (``2**30 <= f < 2**31``, or f = 0 for 0); Python integers only."""
    if num < 0 or den <= 0:
        raise ValueError(f"fixed-point factors are non-negative rationals, got {num}/{den}")
    if num == 0:
        return 0, 0
    e = (num.bit_length() - den.bit_length()) - 31
    while True:  # at most two turns: the first guess of e is off by at most one
        scaled_num, scaled_den = (num << -e, den) if e < 0 else (num, den << e)
        f = (2 * scaled_num + scaled_den) // (2 * scaled_den)
        if f >= 1 << 31:
            e += 1
        elif f < 1 << 30:
            e -= 1
        else:
            return f, e


def cos_pi(a: int, b: int) -> int:
    """``cos(pi * a / b)`` in fixed point with ``COS_BITS`` fraction bits, ``0 <= a <= b``: the
    Taylor series of ``cos x`` at ``x = pi * a / b <= pi``, summed until its terms vanish (their
    magnitudes fall below one unit after about 30 terms; each term is truncated, so the error is
    below 2**-55)."""
    one = 1 << COS_BITS
    x = PI_Q64 * a // b  # |x| <= pi, COS_BITS fraction bits
    x2 = x * x >> COS_BITS
    total, term, k = one, one, 1  # term: |x**(2k) / (2k)!|, added with alternating signs
    while term:
        term = (term * x2 >> COS_BITS) // ((2 * k - 1) * (2 * k))
        total += -term if k % 2 else term
        k += 1
    return total


def usable_rate(lr: float | None) -> bool:
    """Whether ``lr`` can be the update's peak learning rate: a positive, finite number (the update
    reads it as the exact rational of its binary64 value)."""
    try:
        return lr is not None and lr.as_integer_ratio()[0] > 0
    except (OverflowError, ValueError):  # infinite or not a number
        return False


def schedule_fraction(step: int, total_steps: int, warmup: int) -> tuple[int, int]:
    """The float twin's schedule ``lr_at(step) / base_lr`` as an exact rational (num, den): linear
    warm-up ``(step + 1) / warmup``, then ``(1 + cos(pi * p)) / 2`` with ``p = (step - warmup) /
    (total_steps - warmup)`` (cosine in fixed point), 0 past the end."""
    if step < warmup:
        return step + 1, warmup
    decay = total_steps - warmup
    if decay <= 0 or step >= total_steps:
        return 0, 1
    return (1 << COS_BITS) + cos_pi(step - warmup, decay), 1 << (COS_BITS + 1)


def decays(layer) -> bool:
    """Whether weight decay applies to ``layer``'s weight: the float twin's rule (matrices and
    kernels, not 1-d tensors such as biases, ``float_twin``)."""
    return layer.weight.dim() > 1


def mean_gradient(layer, collective: Collective, per_sample: tuple[int, int]) -> QTensor:
    """The layer's exact weight gradient (summed over the processes), rounded to a wide tensor and
    scaled by ``per_sample`` (``1 / N``); the layer's gradient is freed (the twin updates' shared
    first step, ``methods.adamw_fixed`` too)."""
    grad, grad_exp = layer.weight_grad, layer.weight_grad_exp
    layer.weight_grad = layer.weight_grad_exp = None
    if collective.world > 1:
        grad = collective.sum(grad.to(torch.int64))
    return wide.scale(wide.requantize(grad, grad_exp), per_sample)


def store_rounded(layer, master: QTensor, bits: int) -> None:
    """The layer's weight and exponent set to ``master`` rounded (nearest) to ``bits`` bits."""
    weight = requantize(master.v, master.e, bits=bits)
    layer.weight.copy_(weight.v)
    layer.weight_exp.copy_(weight.e)


class FixedPointSgd:
    """The integer-only SGD update of every weighted layer of ``model`` (see the module
    docstring), with peak learning rate ``lr`` and weight decay ``weight_decay`` (floats, read as
    their exact rationals; the float twin's ``WEIGHT_DECAY`` unless given)."""

    def __init__(self, model: torch.nn.Module, fmt: NumberFormat, lr: float, total_steps: int,
                 collective: Collective = LOCAL, weight_decay: float = WEIGHT_DECAY) -> None:
        self.layers = weighted_layers(model)
        self.collective = collective
        self.fmt = fmt
        self.lr = lr.as_integer_ratio()
        self.total_steps = total_steps
        self.warmup = warmup_length(total_steps)
        self.momentum = fixed(*MOMENTUM.as_integer_ratio())
        self.decay = fixed(*weight_decay.as_integer_ratio())
        self.master = [wide.from_values(layer.weight, layer.weight_exp) for layer in self.layers]
        self.velocity = [QTensor(torch.zeros_like(m.v), torch.zeros_like(m.e)) for m in self.master]

    def lr_factor(self, step: int) -> tuple[int, int]:
        """The learning rate of global step ``step`` as a fixed-point factor."""
        num, den = schedule_fraction(step, self.total_steps, self.warmup)
        return fixed(self.lr[0] * num, self.lr[1] * den)

    @torch.no_grad()
    def step(self, step: int, batch: int, within=None) -> None:
        """Update every layer that holds a ``weight_grad`` of a batch of ``batch`` samples (over all
        processes), or only the layers in ``within`` (called as backward finishes each layer: a
        layer's update reads only its own gradient, master and momentum, so the order changes no
        bit); each gradient is freed once used."""
        per_sample = fixed(1, batch)
        lr_f, lr_e = self.lr_factor(step)
        chosen = None if within is None else {id(layer) for layer in weighted_layers(within)}
        for i, layer in enumerate(self.layers):
            if layer.weight_grad is None or (chosen is not None and id(layer) not in chosen):
                continue
            # Each temporary is dropped as soon as it is used (the layer's int64 gradient first),
            # so that at most three int32 tensors of the weight's size are alive beside the
            # master and momentum: the update of a large last layer sets DFP16's peak memory.
            grad = mean_gradient(layer, self.collective, per_sample)
            g = wide.add(grad, wide.scale(self.master[i], self.decay)) if decays(layer) else grad
            del grad
            self.velocity[i] = wide.add(wide.scale(self.velocity[i], self.momentum), g)
            u = wide.add(g, wide.scale(self.velocity[i], self.momentum))
            del g
            u = wide.scale(u, (-lr_f, lr_e))
            self.master[i] = wide.add(self.master[i], u)
            del u
            store_rounded(layer, self.master[i], self.fmt.bits)

    def state_dict(self) -> dict:
        return {"master": [(m.v, m.e) for m in self.master], "momentum": [(b.v, b.e) for b in self.velocity]}

    def load_state_dict(self, state: dict) -> None:
        for key in ("master", "momentum"):
            if len(state[key]) != len(self.layers):
                raise ValueError(f"{key} state for {len(state[key])} layers, the model has {len(self.layers)}")
        device = self.layers[0].weight.device if self.layers else "cpu"
        for name, target in (("master", self.master), ("momentum", self.velocity)):
            for i, ((v, e), layer) in enumerate(zip(state[name], self.layers)):
                if v.dtype != torch.int32 or tuple(v.shape) != tuple(layer.weight.shape):
                    raise ValueError(f"{name} of layer {i + 1} does not fit: {v.dtype} {tuple(v.shape)}")
                target[i] = QTensor(v.to(device), e.to(device))
