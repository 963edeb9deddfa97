"""The integer weight update (no learning rate) and its ``mu`` schedule.

``mu`` is the size of the largest update in steps of the weight the products use (int8 for
NITI): it moves by up to ``2**mu`` units whatever the format. With a master weight of ``x`` more
bits (NITI's 16-bit weight accumulation, ``x = 8``) the update goes into the master with
``mu + x`` bits, so the same ``mu`` means the same step size with or without masters, the master
keeps the ``x`` bits below it, and a negative ``mu`` (down to ``-x``) makes sub-step updates that
accumulate there. (Before intrain 0.2 ``mu`` counted bits of the master; checkpoints of such runs
are converted when read, see ``run.config.TrainConfig.from_dict``.)

For each layer with an exact int64 gradient ``G`` and the update target's width ``m = mu (+ x)``:
``b = bit_length(max |G|)``; ``G`` is shifted right by ``max(b - m, 0)`` with pseudo-stochastic
rounding, so the update ``g`` has at most ``m`` bits (``|g| <= 2**m``), and ``w <- clip(w - g)``
stays in the target's range. The weight exponent never changes. ``mu`` plays the part of the
learning rate and follows a per-epoch schedule.

Sign rule (``rule="sign"``, for tensor-ring and tensor-train cores): every element with a non-zero
gradient moves by exactly ``2**m`` units of the target against its gradient's sign, ``w <- clip(w
- sign(G) 2**m)`` (``2**mu`` int8 steps, as the largest element moves under the rule above). Why
the cores need it: a layer-wise rule scales every element's step by the layer's largest gradient,
so elements with small gradients round to no step (the first step of a rank-8 TR-LSTM at mu 2
moved 51 % of its core elements, the sign rule 99.5 %), and the float tensor-ring LSTM, likewise,
trains with Adam's per-element scaling and not with plain SGD (BENCHMARKS.md, issue 14).
``|sign(G) 2**m| <= 2**23`` for ``m <= 23``, so the int32 difference cannot wrap, and the rule has
no rounding, so it is the same integers on every device.

Weight decay (``decay_shift = K``, off by default): every weight shrinks towards zero by
``2**(mu - K)`` of itself each step: ``d = sround(w / 2**(K - mu))`` from the weight before the
step, then ``w <- clip(clip(w - g) - d)``, with ``sround`` stochastic rounding keyed by
``(seed, step, layer)`` (``numeric.rng``). Coupling it to mu is SGD's
coupling of the decay to the learning rate (``lr x wd``): a fixed fraction ``2**-K`` of the largest
step's size per unit of weight, whatever mu is. Stochastic rounding because the decay of an int8
weight is far below one unit (``2**-15`` of it at mu 5, K = 20): nearest or NITI's pseudo-stochastic
rounding (which draws its randomness from the low bits of the value itself) would move a weight
always or never, stochastic moves it by one unit with probability ``|w| 2**(mu - K)``. It never
flips a sign: ``|sround(w / 2**s)| <= ceil(|w| / 2) <= |w|`` for ``s >= 1``. Only the weights of
layers with a gradient decay (every layer of a model this trains), and from their value before
the update, as in SGD's ``w - lr (g + wd w)``; ``|w| <= 2**15`` and ``|d| <= |w|``, so the int32
difference cannot wrap.

Data parallel: each process holds the exact gradient of its shard of the batch. Every exponent of
a step is the same in every process (the shifts come from maxima over all processes,
``layers.base``), so the shard gradients share one exponent and their int64 sum over the
processes (``Collective.sum``: exact, order-free) is the whole batch's gradient, bit for bit; the
update then runs on it identically in every process. (Per shard the kernels may return int32
where the whole batch's gradient would be int64; the values are the same integers either way.)
"""

from __future__ import annotations

import torch

from intrain.layers import weighted_layers
from intrain.layers.tensor_ring import TensorRingCore
from intrain.numeric import native, rng
from intrain.numeric.collective import LOCAL, Collective
from intrain.numeric.requant import cpu_slices
from intrain.numeric.rounding import cpu_max_bit_length, max_bit_length, shift_round


#: The range a schedule may name; a method narrows it to what its format can use (a negative mu
#: needs master weights).
MU_MIN, MU_MAX = -16, 15

#: Update rules for tensor-ring / tensor-train cores (see the module docstring); other layers
#: always take NITI's.
CORE_UPDATES = ("niti", "sign")


class MuSchedule:
    """Piecewise-constant ``mu`` by epoch, written ``"0:5,100:4,150:3"`` (epoch:mu, from epoch 0)."""

    def __init__(self, points: list[tuple[int, int]]) -> None:
        points = sorted(points)
        if not points or points[0][0] != 0:
            raise ValueError("a mu schedule must start at epoch 0, e.g. '0:5,100:4'")
        for epoch, mu in points:
            if epoch < 0 or not MU_MIN <= mu <= MU_MAX:
                raise ValueError(f"bad mu schedule entry {epoch}:{mu}: epochs >= 0 and mu in {MU_MIN}..{MU_MAX}")
        epochs = [epoch for epoch, _ in points]
        if len(set(epochs)) != len(epochs):
            twice = next(e for e in epochs if epochs.count(e) > 1)
            raise ValueError(f"epoch {twice} appears twice in the mu schedule: give each epoch one mu")
        self.points = points

    @staticmethod
    def parse(text: str) -> "MuSchedule":
        try:
            points = [tuple(int(part) for part in item.split(":")) for item in text.split(",")]
            if any(len(point) != 2 for point in points):
                raise ValueError
        except ValueError:
            raise ValueError(f"cannot read mu schedule {text!r}: write epoch:mu pairs, e.g. '0:5,100:4,150:3'") from None
        return MuSchedule(points)

    def __call__(self, epoch: int) -> int:
        mu = self.points[0][1]
        for start, value in self.points:
            if epoch >= start:
                mu = value
        return mu

    def __str__(self) -> str:
        return ",".join(f"{epoch}:{mu}" for epoch, mu in self.points)

    def shifted(self, delta: int) -> "MuSchedule":
        """The same schedule with every mu changed by ``delta``."""
        return MuSchedule([(epoch, mu + delta) for epoch, mu in self.points])


def apply_update(weight: torch.Tensor, grad: torch.Tensor, mu: int) -> torch.Tensor:
    """The new weight after one integer update with ``mu`` bits (see module docstring), in the
    weight's dtype: int8 clipped to [-127, 127], or an int16 master clipped to [-32767, 32767]."""
    limit = torch.iinfo(weight.dtype).max
    if grad.device.type != "cpu":
        shift = (max_bit_length(grad) - mu).clamp(min=0)
        step = shift_round(grad, shift, "pseudo")
        return (weight.to(torch.int64) - step).clamp(-limit, limit).to(weight.dtype)
    shift = max(cpu_max_bit_length(grad) - mu, 0)
    updated = native.update_pseudo(weight, grad, shift, limit)  # one C pass where it applies
    if updated is not None:
        return updated
    # Else on CPU a slice of rows at a time: the rounding's temporaries stay small (they were the
    # peak of a VGG-small-7 step's tensor memory, eight of them the size of the largest gradient).
    # The difference in the step's own dtype (int32 for int32 gradients: |w| <= 2**15 and
    # |step| <= 2**m + 1 <= 2**24 + 1 for m = mu + 8 <= 23 cannot wrap; half the bytes of int64).
    updated = torch.empty_like(weight)
    for rows in cpu_slices(grad):
        step = shift_round(grad[rows], shift, "pseudo")
        updated[rows] = step.neg_().add_(weight[rows]).clamp_(-limit, limit)
    return updated


def apply_sign_update(weight: torch.Tensor, grad: torch.Tensor, bits: int) -> torch.Tensor:
    """The new weight after one sign-rule update (see the module docstring): ``2**bits`` units
    against each non-zero gradient's sign, clipped to the weight dtype's symmetric range."""
    if not 0 <= bits <= 23:
        raise ValueError(f"a sign update of 2**{bits} units does not fit int32 arithmetic: use 0..23 bits")
    limit = torch.iinfo(weight.dtype).max
    step = torch.sign(grad).to(torch.int32) << bits
    return (weight.to(torch.int32) - step).clamp_(-limit, limit).to(weight.dtype)


def check_decay_shift(decay_shift: int | None, schedules) -> None:
    """``ValueError`` unless the weight decay's ``K`` (``None``: no decay) exceeds every mu of
    ``schedules``: at ``K <= mu`` the decay would be a whole weight or more per step."""
    if decay_shift is None:
        return
    highest = max(mu for schedule in schedules for _, mu in schedule.points)
    if decay_shift <= highest:
        raise ValueError(f"{decay_shift} must exceed every mu of the schedule (up to {highest}): the decay "
                         f"would be a whole weight or more per step")


class IntegerUpdate:
    """Applies the integer update to every weighted layer (anywhere in the model's tree) that has
    a gradient, summed over the processes of ``collective`` first; tensor-ring cores take
    ``core_rule`` (``CORE_UPDATES``) with ``core_schedule`` (default: ``mu_schedule``)."""

    def __init__(self, model: torch.nn.Module, mu_schedule: MuSchedule, collective: Collective = LOCAL,
                 core_rule: str = "niti", core_schedule: MuSchedule | None = None, *,
                 decay_shift: int | None = None, seed: int = 0) -> None:
        if core_rule not in CORE_UPDATES:
            raise ValueError(f"unknown core update rule {core_rule!r}: choose one of {', '.join(CORE_UPDATES)}")
        self.model = model
        self.mu_schedule = mu_schedule
        self.collective = collective
        self.core_rule = core_rule
        self.core_schedule = core_schedule or mu_schedule
        self.decay_shift = decay_shift
        self.seed = seed
        check_decay_shift(decay_shift, (self.mu_schedule, self.core_schedule))
        self.layers = weighted_layers(model)  # the model's structure is fixed once built

    def step(self, epoch: int, within: torch.nn.Module | None = None, step: int = 0) -> None:
        """Update every layer of the model (of ``within``, a part of it, when given) that holds a
        gradient, and free the gradient; ``step`` (the global step) keys the weight decay's rounding."""
        mu, core_mu = self.mu_schedule(epoch), self.core_schedule(epoch)
        for layer in self.layers if within is None else weighted_layers(within):
            if layer.weight_grad is None:
                continue
            target = layer.update_target
            extra = layer.fmt.master_extra_bits if layer.has_master_weight else 0
            grad = layer.weight_grad
            if self.collective.world > 1:
                grad = self.collective.sum(grad.to(torch.int64))
            core = isinstance(layer, TensorRingCore)
            rule = apply_sign_update if core and self.core_rule == "sign" else apply_update
            layer_mu = core_mu if core else mu
            decay = None if self.decay_shift is None else self._decay(target, layer, step, layer_mu)
            target.copy_(rule(target, grad, layer_mu + extra))
            if decay is not None:
                limit = torch.iinfo(target.dtype).max
                target.copy_(target.to(torch.int32).sub_(decay).clamp_(-limit, limit))
            layer.refresh_weight()
            layer.weight_grad = None
            layer.weight_grad_exp = None

    def _decay(self, target: torch.Tensor, layer, step: int, mu: int) -> torch.Tensor:
        """``sround(target / 2**(decay_shift - mu))`` (see the module docstring), in the target's
        dtype (the C pass) or int32."""
        key = rng.derive_key(self.seed, step, layer.layer_id, rng.STREAM_WEIGHT_DECAY)
        shift = self.decay_shift - mu
        # One C pass where it applies (same bits as shift_round, tests/test_native.py): the
        # generic path costs 4-6 ms of a 14 ms LeNet-5 step (batch 128, 1 thread).
        limit = torch.iinfo(target.dtype).max
        decay = native.round_shift(target.to(torch.int16), shift, "stochastic", limit, target.dtype, key)
        if decay is not None:
            return decay
        return shift_round(target.to(torch.int32), shift, "stochastic", key)
