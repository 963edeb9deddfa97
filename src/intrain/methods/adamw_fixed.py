"""The float twin's AdamW recipe on integers (NITI's ``--update adamw``).

The float twin with ``optimizer="adamw"`` (the recurrent models' recipe, ``methods.float_twin``)
runs PyTorch's AdamW: betas ``b1, b2 = ADAMW_BETAS`` (0.9, 0.999), ``eps = ADAMW_EPS`` (1e-8),
decoupled weight decay ``--weight-decay`` (``wd``, the float twin's ``WEIGHT_DECAY`` unless
given; 0 for biases, ``sgd_fixed.decays``), with the twin's warm-up and cosine schedule ``lr_t``. Per weighted layer,
at global step ``s`` (``t = s + 1`` steps so far):

    W = W - lr_t * wd * W
    M = b1 * M + (1 - b1) * g                  g = G / N, the mean gradient of N samples
    V = b2 * V + (1 - b2) * g**2
    W = W - (lr_t / c1) * M / (sqrt(V) / sqrt(c2) + eps),    c1 = 1 - b1**t,  c2 = 1 - b2**t

``AdamWUpdate`` runs it with integers only. ``W`` (master weight) and ``M`` (first moment) are
wide tensors (int32 with a power-of-two exponent, ``numeric.wide``) as in ``methods.sgd_fixed``.
``V`` is an int64 tensor with an even exponent, normalised after every step so that its largest
value has 61 or 62 bits (``_normalised``): the square of a 31-bit ``g`` needs 62 bits, so ``V``
keeps the whole range of ``M`` squared, and an element whose gradient is ``2**-31`` of the
layer's largest still has a non-zero second moment (in 31 bits it would be 0 from ``2**-16`` down,
and its step would be ``M / eps``). Operations and their ranges:

- ``V * f`` for a 31-bit factor ``f`` (``_scale64``): ``V = hi * 2**31 + lo``, ``hi * f < 2**62``
  and ``lo * f < 2**62`` exact in int64, the result ``hi * f + round(lo * f / 2**31)`` below
  ``2**62`` with the exponent raised by 31: one rounding of at most half a unit.
- ``g**2``: the 31-bit values squared, below ``2**62``, exact.
- the sum of two such terms (``second_moment_sum``): the finer one shifted right (nearest) to
  the coarser exponent, the sum below ``2**63``; an all-zero term (the first step's ``V``, a layer
  without gradient) drops out, its exponent meaning nothing.
- ``sqrt(V)``: ``R = round(sqrt(V))`` by Newton's iteration (``numeric.rounding.isqrt``, then up
  by one where ``V - x**2 > x``), ``R <= 2**31``, exponent ``e_V / 2``.
- the denominator ``D = R * k + eps`` with ``k = 1 / sqrt(c2)`` a 31-bit factor: ``R * k < 2**62``
  exact, ``eps`` (an exact rational) added at that exponent, the sum shifted right (nearest) so
  that its largest value has 31 bits; at least 1 (an element with ``D`` below half a unit of
  ``2**-31`` of the layer's largest has ``V`` of 0 and, as ``|M| <= sqrt(V) / sqrt(1 - b2)`` in
  exact arithmetic, an ``M`` of at most a rounding).
- the quotient ``Q = round(M * 2**30 / D)``: ``|M * 2**30| < 2**61``, exact integer division with
  nearest rounding (``divide_round``); its precision is ``D``'s, 31 bits for the elements with the
  largest second moment, fewer for the others (the error of an element's step relative to itself
  is at most about ``1 / D``).
- ``W`` gets ``-(lr_t / c1) * Q`` and ``-(lr_t * wd) * W`` through ``wide.scale`` and ``wide.add``.

The scalars (``lr_t``, ``c1``, ``1 / sqrt(c2)``, ``lr_t * wd``) are computed with Python integers:
the hyper-parameters are the exact rationals of their binary64 values (``as_integer_ratio``),
``b**t`` is a fixed-point power with ``POWER_BITS`` fraction bits (binary exponentiation, each
product truncated: error below ``t * 2**-POWER_BITS``), ``1 / sqrt(c2)`` an integer square root,
and each factor is rounded once to 31 significant bits (``sgd_fixed.fixed``). After the update the
layer's weight is ``W`` rounded (nearest) to the format's width, with its own exponent.

Data parallel: as ``sgd_fixed`` (the whole batch's int64 gradient is summed exactly before the
update, which then runs identically in every process).
"""

from __future__ import annotations

import torch

from intrain.layers import weighted_layers
from intrain.methods.float_twin import ADAMW_BETAS, ADAMW_EPS, WEIGHT_DECAY, warmup_length
from intrain.methods.sgd_fixed import decays, fixed, mean_gradient, schedule_fraction, store_rounded
from intrain.numeric import native, wide
from intrain.numeric.collective import LOCAL, Collective
from intrain.numeric.formats import NumberFormat
from intrain.numeric.qtensor import QTensor
from intrain.numeric.rounding import divide_round, isqrt, shift_round

#: Fraction bits of the fixed-point powers ``b**t``.
POWER_BITS = 128
#: Bits of the second moment's largest value (61 or 62: the exponent is kept even).
MOMENT_BITS = 62
#: Left shift of the first moment before the division by the denominator (``|M| < 2**31``).
QUOTIENT_SHIFT = 30


def power(base: tuple[int, int], t: int) -> int:
    """``(num / den) ** t`` for a rational ``base`` in [0, 1], in fixed point with ``POWER_BITS``
    fraction bits (binary exponentiation; each product truncated)."""
    one = 1 << POWER_BITS
    result, square = one, (base[0] << POWER_BITS) // base[1]
    while t:
        if t & 1:
            result = result * square >> POWER_BITS
        square = square * square >> POWER_BITS
        t >>= 1
    return result


def _isqrt_int(n: int) -> int:
    """``floor(sqrt(n))`` of a non-negative Python int (Newton's iteration from above)."""
    if n == 0:
        return 0
    x = 1 << ((n.bit_length() + 1) >> 1)
    while True:
        y = (x + n // x) >> 1
        if y >= x:
            return x
        x = y


def _largest(v: torch.Tensor) -> int:
    """The largest value of a non-negative integer tensor (0 for an empty one)."""
    return int(v.max()) if v.numel() else 0


def _shift(v: torch.Tensor, s: int) -> torch.Tensor:
    """``v * 2**-s``: an exact left shift for ``s < 0``, a right shift with nearest rounding."""
    if s <= 0:
        return v << -s
    return shift_round(v, s, "nearest") if s < 63 else torch.zeros_like(v)


def _normalised(v: torch.Tensor, e: int, largest: int | None = None) -> tuple[torch.Tensor, int]:
    """Non-negative int64 ``v * 2**e`` (below 2**63; ``largest`` its largest value, if known)
    shifted so that its largest value has ``MOMENT_BITS`` bits or one fewer, with an even exponent
    (a right shift's rounding may carry the largest value to exactly ``2**MOMENT_BITS``); all-zero
    keeps its values."""
    length = (_largest(v) if largest is None else largest).bit_length()
    if length == 0:
        return v, e - e % 2
    s = length - MOMENT_BITS
    s += (e + s) % 2  # one more right shift (or one less left shift) to an even exponent
    return (_shift(v, s) if s else v), e + s


def _scale64(v: torch.Tensor, e: int, factor: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """``v * f * 2**fe`` for non-negative int64 ``v <= 2**62`` and ``0 <= f < 2**31``: the result
    is below 2**62 with the exponent raised by 31 (module docstring)."""
    f, fe = factor
    high, low = v >> 31, v & (2**31 - 1)
    return high * f + shift_round(low * f, 31, "nearest"), e + fe + 31


def second_moment_sum(second: torch.Tensor, e: int, grad: QTensor, keep: tuple[int, int], take: tuple[int, int]
                      ) -> tuple[torch.Tensor, int, int]:
    """``keep * V + take * g**2`` before normalisation (int64 ``V * 2**e <= 2**62``, a wide ``g``,
    31-bit factors): each term scaled by ``_scale64`` (the square is exact), the finer one rounded
    to the coarser exponent; returns the sum, its exponent and its largest value (one C
    pass where ``native.adamw_second_moment`` applies, with the same bits)."""
    kept_e = e + keep[1] + 31
    taken_e = 2 * int(grad.e) + take[1] + 31
    no_second, no_grad = _largest(second) == 0, _largest(grad.v.abs()) == 0
    if not no_second and not no_grad:
        top = max(kept_e, taken_e)
    else:  # an all-zero term's exponent means nothing: it drops out
        top = kept_e if no_grad else taken_e
    shift_kept = 63 if no_second else top - kept_e
    shift_taken = 63 if no_grad else top - taken_e
    fused = native.adamw_second_moment(second, grad.v, keep[0], take[0], shift_kept, shift_taken)
    if fused is not None:
        return fused[0], top, fused[1]
    kept, _ = _scale64(second, e, keep)
    taken, _ = _scale64(grad.v.to(torch.int64) ** 2, 2 * int(grad.e), take)
    total = _shift(kept, shift_kept) + _shift(taken, shift_taken)
    return total, top, _largest(total)


def _nearest_sqrt(v: torch.Tensor) -> torch.Tensor:
    """``round(sqrt(v))`` of non-negative int64 values (halves cannot occur: ``(x + 1/2)**2`` is
    not an integer)."""
    x = isqrt(v)
    return x + (v - x * x > x).to(torch.int64)


def quotient(second: torch.Tensor, first: torch.Tensor, root: int, shift: int, eps: int) -> torch.Tensor:
    """``round(M * 2**QUOTIENT_SHIFT / D)`` elementwise with ``D = max(round(round(sqrt(V)) * root /
    2**shift) + eps, 1)``, for int64 ``V <= 2**62`` and int32 ``M`` (module docstring; the C kernel
    ``native.adamw_quotient`` gives the same bits in one pass)."""
    scaled = _nearest_sqrt(second) * root
    denominator = (_shift(scaled, shift) + eps).clamp_(min=1)
    return divide_round(first.to(torch.int64) << QUOTIENT_SHIFT, denominator)


class AdamWUpdate:
    """The integer-only AdamW update of every weighted layer of ``model`` (module docstring), with
    peak learning rate ``lr`` and weight decay ``weight_decay`` (floats, read as their exact
    rationals; the float twin's ``WEIGHT_DECAY`` unless given)."""

    def __init__(self, model: torch.nn.Module, fmt: NumberFormat, lr: float, total_steps: int,
                 collective: Collective = LOCAL, weight_decay: float = WEIGHT_DECAY) -> None:
        self.layers = weighted_layers(model)
        self.collective = collective
        self.fmt = fmt
        self.lr = lr.as_integer_ratio()
        self.total_steps = total_steps
        self.warmup = warmup_length(total_steps)
        self.beta1, self.beta2 = (beta.as_integer_ratio() for beta in ADAMW_BETAS)
        self.first_keep = fixed(*self.beta1)
        self.first_take = fixed(self.beta1[1] - self.beta1[0], self.beta1[1])
        self.second_keep = fixed(*self.beta2)
        self.second_take = fixed(self.beta2[1] - self.beta2[0], self.beta2[1])
        self.eps = ADAMW_EPS.as_integer_ratio()
        self.decay = weight_decay.as_integer_ratio()
        self.master = [wide.from_values(layer.weight, layer.weight_exp) for layer in self.layers]
        self.first = [QTensor(torch.zeros_like(m.v), torch.zeros_like(m.e)) for m in self.master]
        self.second = [(torch.zeros_like(m.v, dtype=torch.int64), 0) for m in self.master]

    def factors(self, step: int) -> dict:
        """The scalars of global step ``step`` as fixed-point factors ``(f, e)``: ``decay``
        ``lr_t * wd``, ``step`` ``lr_t / c1``, ``root`` ``1 / sqrt(c2)`` (module docstring)."""
        num, den = schedule_fraction(step, self.total_steps, self.warmup)
        lr_num, lr_den = self.lr[0] * num, self.lr[1] * den  # lr_t = lr_num / lr_den
        t = step + 1
        one = 1 << POWER_BITS
        c1 = one - power(self.beta1, t)
        c2 = one - power(self.beta2, t)
        root = _isqrt_int((one << (2 * POWER_BITS)) // c2)  # sqrt(1 / c2) with POWER_BITS fraction bits
        return {"decay": fixed(lr_num * self.decay[0], lr_den * self.decay[1]),
                "step": fixed(lr_num * one, lr_den * c1),
                "root": fixed(root, one)}

    def _denominator_terms(self, second: torch.Tensor, e: int, root: tuple[int, int]) -> tuple[int, int, int]:
        """``(shift, eps_shifted, exponent)`` of the denominator ``round(sqrt(V) * k / 2**shift) +
        eps_shifted`` (``k`` the factor ``root``'s integer, ``exponent`` its exponent): the shift
        brings the largest value, ``round(sqrt(max V)) * k + eps``, to 31 bits (``sqrt`` is monotone,
        so the largest root is the root of the largest ``V``); eps is the exact rational at that
        exponent, rounded to nearest once."""
        exponent = e // 2 + root[1]
        eps_num, eps_den = (self.eps[0] << -exponent, self.eps[1]) if exponent < 0 else \
            (self.eps[0], self.eps[1] << exponent)
        largest = _largest(second)
        root_of_largest = _isqrt_int(largest)
        root_of_largest += largest - root_of_largest**2 > root_of_largest
        top = root_of_largest * root[0] + -(-eps_num // eps_den)
        s = max(top.bit_length() - wide.VALUE_BITS, 0)
        eps_shifted = (2 * eps_num + (eps_den << s)) // (eps_den << (s + 1))  # round(eps / 2**s)
        return s, eps_shifted, exponent + s

    @torch.no_grad()
    def step(self, step: int, batch: int, within=None) -> None:
        """Update every layer that holds a ``weight_grad`` of a batch of ``batch`` samples (over all
        processes), or only the layers in ``within``; each gradient is freed once used."""
        per_sample = fixed(1, batch)
        factors = self.factors(step)
        decay_f, decay_e = factors["decay"]
        step_f, step_e = factors["step"]
        chosen = None if within is None else {id(layer) for layer in weighted_layers(within)}
        for i, layer in enumerate(self.layers):
            if layer.weight_grad is None or (chosen is not None and id(layer) not in chosen):
                continue
            g = mean_gradient(layer, self.collective, per_sample)
            if decays(layer):
                self.master[i] = wide.add(self.master[i], wide.scale(self.master[i], (-decay_f, decay_e)))
            self.first[i] = wide.add(wide.scale(self.first[i], self.first_keep), wide.scale(g, self.first_take))
            second, second_e = _normalised(*second_moment_sum(*self.second[i], g, self.second_keep,
                                                               self.second_take))
            del g
            self.second[i] = (second, second_e)
            root_f = factors["root"][0]
            s, eps_shifted, denominator_e = self._denominator_terms(second, second_e, factors["root"])
            first = self.first[i]
            q = native.adamw_quotient(second, first.v, root_f, s, eps_shifted) if s < 63 else None
            if q is None:
                q = quotient(second, first.v, root_f, s, eps_shifted)
            move = wide.requantize(q, first.e - QUOTIENT_SHIFT - denominator_e)
            del q
            self.master[i] = wide.add(self.master[i], wide.scale(move, (-step_f, step_e)))
            store_rounded(layer, self.master[i], self.fmt.bits)

    def state_dict(self) -> dict:
        return {"master": [(m.v, m.e) for m in self.master], "first_moment": [(m.v, m.e) for m in self.first],
                "second_moment": [(v, torch.tensor(e, dtype=torch.int64)) for v, e in self.second]}

    def load_state_dict(self, state: dict) -> None:
        for key in ("master", "first_moment", "second_moment"):
            if len(state[key]) != len(self.layers):
                raise ValueError(f"{key} state for {len(state[key])} layers, the model has {len(self.layers)}")
        device = self.layers[0].weight.device if self.layers else "cpu"
        for i, layer in enumerate(self.layers):
            for key, dtype in (("master", torch.int32), ("first_moment", torch.int32), ("second_moment", torch.int64)):
                v, _ = state[key][i]
                if v.dtype != dtype or tuple(v.shape) != tuple(layer.weight.shape):
                    raise ValueError(f"{key} of layer {i + 1} does not fit: {v.dtype} {tuple(v.shape)}")
            self.master[i] = QTensor(state["master"][i][0].to(device), state["master"][i][1].to(device))
            self.first[i] = QTensor(state["first_moment"][i][0].to(device), state["first_moment"][i][1].to(device))
            self.second[i] = (state["second_moment"][i][0].to(device), int(state["second_moment"][i][1]))
