"""Bit length and right shifts with rounding, on integer tensors.

``shift_round(a, s, mode)`` returns ``sign(a) * round(|a| / 2**s)``, rounding the magnitude so
that the result is symmetric around zero. Modes:

- ``nearest``: add ``2**(s-1)`` to ``|a|`` before the shift (ties away from zero).
- ``stochastic``: add a uniform integer ``r`` in ``[0, 2**s)`` from the counter-based generator
  (:mod:`intrain.numeric.rng`) keyed by the caller; unbiased: ``E[result] = a / 2**s``. Element
  ``i`` of ``a`` takes element ``offset + i`` of the key's stream (``offset``: where ``a`` starts
  in a larger tensor it is a contiguous piece of, e.g. a data-parallel shard; 0 by default).
- ``pseudo``: NITI's pseudo-stochastic rounding. The ``s`` discarded bits are split into the upper
  ``ceil(s/2)`` bits ``h`` (the probability) and the lower ``floor(s/2)`` bits ``l`` (the random
  number, doubled when ``s`` is odd so both have the same width); the magnitude rounds up when
  ``h > l``. No generator is involved.

Ranges: ``a`` may be any integer dtype, every value with ``|a| <= `` the dtype's maximum (all
but the dtype's minimum: an int32 sum of at most 131,071 int8 products is at most 2**31 - 2**14 in
magnitude); the result has ``a``'s dtype and ``|result| <= |a| / 2**s + 1``. No intermediate
value leaves the dtype: the rounding constant is never added to a full-width magnitude (``|a| +
2**(s-1)`` wraps an int32 from ``|a| > 2**31 - 2**(s-1)``, e.g. 131,071 products (-128)(-128)
at s = 24 rounded to -127 instead of +127). ``s`` is a non-negative Python int or 0-d int64
tensor (a tensor keeps the work on the device), below the dtype's bit count.
"""

from __future__ import annotations

import torch

from intrain.numeric import native, rng

ROUNDING_MODES = ("nearest", "stochastic", "pseudo")


def bit_length(m: torch.Tensor) -> torch.Tensor:
    """Number of bits of non-negative integers ``m`` (0 for 0), as int64, elementwise: a binary
    search for the largest ``b`` with ``m >> b > 0`` (six shifts of at most 63 bits, no temporary
    larger than ``m``), plus one for every non-zero ``m``."""
    m = m.to(torch.int64)
    below = torch.zeros_like(m)
    for step in (32, 16, 8, 4, 2, 1):
        below += ((m >> (below + step)) > 0).to(torch.int64) * step
    return below + (m > 0).to(torch.int64)


def isqrt(n: torch.Tensor) -> torch.Tensor:
    """``floor(sqrt(n))`` of non-negative int64 integers, elementwise, by Newton's iteration from
    above: starting at ``2**ceil(b/2) >= sqrt(n)`` (``b`` its bit length), ``x <- (x + n // x) // 2``
    decreases strictly until it reaches ``floor(sqrt(n))``, where the next value is not smaller.
    The start is within a factor 2 of the root, so the iteration converges quadratically (at most
    seven turns for 62-bit ``n``)."""
    x = torch.ones_like(n) << ((bit_length(n) + 1) >> 1)
    while True:
        y = (x + n // x.clamp(min=1)) >> 1
        if not bool((y < x).any()):
            return x
        x = torch.minimum(x, y)


def max_bit_length(a: torch.Tensor) -> torch.Tensor:
    """Bit length of ``max |a|`` as a 0-d int64 tensor."""
    if a.device.type == "cpu":
        return torch.tensor(cpu_max_bit_length(a), dtype=torch.int64)
    if a.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=a.device)
    # One reading pass and no |a| temporary (which cost as much as the rest of a requantisation
    # on VGG-sized accumulators); the extremes are widened to int64 before negation so that an
    # int8/int16/int32 minimum cannot wrap around (int64 accumulators stay far below 2**63).
    low, high = torch.aminmax(_in_memory_order(a))
    return bit_length(torch.maximum(high.to(torch.int64), -low.to(torch.int64)))


def cpu_max_bit_length(a: torch.Tensor) -> int:
    """Bit length of ``max |a|`` for a CPU tensor (integers, or floats holding exact integers) as
    a Python int: no device to stay on, and a handful of small tensor operations fewer for every
    requantisation and update (they add up on small models). One C pass where the kernel applies
    (``numeric.native``), else one ``aminmax`` pass."""
    largest = native.max_abs(a)
    if largest is None:
        if a.numel() == 0:
            return 0
        low, high = torch.aminmax(_in_memory_order(a))
        largest = max(int(high), -int(low))
    return largest.bit_length()


def _in_memory_order(a: torch.Tensor) -> torch.Tensor:
    """``a`` with its dimensions permuted into memory order, when that makes it contiguous (a
    channels-last view, say): reductions over all elements then read it in place instead of
    copying it first."""
    order = sorted(range(a.dim()), key=lambda i: -a.stride(i))
    permuted = a.permute(order)
    return permuted if permuted.is_contiguous() else a


def _sign_mask(a: torch.Tensor) -> torch.Tensor:
    """-1 where ``a < 0`` and 0 elsewhere: an arithmetic shift, cheaper than a comparison."""
    return a >> (torch.iinfo(a.dtype).bits - 1)


def _nearest(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``sign(a) * floor((|a| + 2**(s-1)) / 2**s)`` (ties away from zero) without adding the
    rounding constant to ``|a|``, so that it cannot wrap for any ``|a| <=`` the dtype's maximum.

    For s >= 1 let ``b = a - 1`` where ``a < 0`` and ``b = a`` elsewhere (no wrap: a is above
    the dtype's minimum), and ``t = floor(b / 2**(s-1))`` (an arithmetic shift). For a >= 0,
    ``floor((a + 2**(s-1)) / 2**s) = floor((a / 2**(s-1) + 1) / 2) = floor((t + 1) / 2)``
    (floor((z + 1) / 2) = floor((floor(z) + 1) / 2) for real z). For a < 0, the result
    ``-floor((-a + 2**(s-1)) / 2**s) = ceil((a - 2**(s-1)) / 2**s)`` equals
    ``floor((a - 1 + 2**(s-1)) / 2**s)`` (ceil(x / m) = floor((x + m - 1) / m)), which is
    ``floor((t + 1) / 2)`` by the same step with b. And ``floor((t + 1) / 2) = ceil(t / 2) =
    t - floor(t / 2)``, whose magnitude is at most |t|. For s = 0 both corrections are masked
    off and the result is a itself. In place on the one new tensor (plus one for the halves):
    on CPU each fresh accumulator-sized temporary costs more (page faults) than the arithmetic.
    """
    rounds = (s > 0).to(a.dtype)  # 1 when bits are dropped, 0 for s = 0
    out = _sign_mask(a).bitwise_and_(-rounds)
    out += a
    out.bitwise_right_shift_(s - rounds)
    out -= (out >> 1).bitwise_and_(-rounds)
    return out


def shift_round(
    a: torch.Tensor,
    s: torch.Tensor | int,
    mode: str,
    key: tuple[int, int] | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """``sign(a) * round(|a| / 2**s)`` with the given rounding mode (see module docstring)."""
    if not isinstance(s, torch.Tensor):
        if s < 0:
            raise ValueError(f"shift must be non-negative, got {s}")
        s = torch.tensor(s, dtype=torch.int64, device=a.device)
    if mode == "nearest":
        return _nearest(a, s)
    sign = _sign_mask(a)
    magnitude = (a ^ sign) - sign
    if mode == "stochastic":
        if key is None:
            raise ValueError("stochastic rounding needs a random key")
        noise = rng.uniform_bits(key, a.shape, s, a.device, offset, dtype=a.dtype)
        # The remainder and the noise are both below 2**s, so their sum cannot wrap where
        # magnitude + noise could (magnitude near the dtype's limit).
        remainder = magnitude & ((1 << s) - 1).to(a.dtype)
        rounded = (magnitude >> s) + ((remainder + noise) >> s)
    elif mode == "pseudo":
        low_width = s >> 1
        high_width = s - low_width
        discarded = magnitude & ((1 << s) - 1).to(a.dtype)
        probability = discarded >> low_width
        pseudo_random = (discarded & ((1 << low_width) - 1).to(a.dtype)) << (high_width - low_width)
        rounded = (magnitude >> s) + (probability > pseudo_random).to(a.dtype)
    else:
        raise ValueError(f"unknown rounding mode {mode!r}; choose one of {', '.join(ROUNDING_MODES)}")
    return (rounded ^ sign) - sign


def divide_round(total: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """The nearest integer to ``total / count`` (ties away from zero), elementwise, by integer
    division: ``sign(t) * floor((2 * |t| + count) / (2 * count))``; ``total``'s dtype must hold
    ``2 * |total| + count``. ``count`` is a positive int or an integer tensor of positive values
    that broadcasts with ``total`` (per-channel counts and standard deviations). Used for means
    (weight averaging, average pooling, batch normalisation)."""
    if isinstance(count, int) and count <= 0:
        raise ValueError(f"cannot divide by {count}: need a positive count")
    sign = total.sign()
    return sign * torch.div(2 * total.abs() + count, 2 * count, rounding_mode="floor")
