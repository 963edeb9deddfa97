"""The int32-chunked accumulator (DFP16's overflow control): headroom shifts and the bound.

Hardware that multiplies int16 pairs and adds them into an int32 register (Das et al. 2018 use
such fused multiply-adds) wraps silently: one product of two full-scale int16 values is nearly
``2**30``, so two of them can already pass ``2**31 - 1``. The int32-chunked accumulator of a
``NumberFormat`` (``accumulator="int32-chunked"``) prevents every wrap by construction:

1. The reduction of ``K`` terms is cut into chunks of ``L = min(chunk_length, K)`` terms; each
   chunk is summed in int32, and the chunk sums are added in int64.
2. Before the product both operands are shifted right with nearest rounding (ties away from
   zero) by ``ha`` and ``hb`` headroom bits, the fewest (each at least the format's
   ``headroom``) for which the bound below holds; the shifts go into the exponent.

The bound, from the actual maxima ``A = max |a|`` and ``B = max |b|``: nearest rounding gives
``|round(v / 2**h)| = floor((|v| + 2**(h-1)) / 2**h) <= floor((A + 2**(h-1)) / 2**h) = A'`` (the
map is monotone in ``|v|``; ``A' = A`` for ``h = 0``), so every term is at most ``A' * B'`` and
every partial sum of a chunk, in any order, at most ``L * A' * B' <= 2**31 - 1``
(``headroom_shifts`` checks exactly this inequality): no int32 partial sum can wrap. The int64
total is at most ``K * 2**30 < 2**63`` (``kernels.im2col.weight_grad_dtype`` refuses ``K >=
2**33``), so it is the exact integer sum of the shifted operands' products. That is what every
kernel backend returns for the shifted operands (each is exact and bit-identical to the int64
reference), so the layers compute the controlled accumulation with any backend, and the int32
chunking is a property proved here rather than a loop run on the CPU: hardware with int32
accumulators gets the same bits by summing chunks of ``L`` terms.

A plain int32 accumulator (no chunks, no headroom) returns the exact sum modulo ``2**32``
whatever its order of additions (two's-complement addition is exact modulo ``2**32``), so it is
wrong exactly for the outputs whose exact sum lies outside ``[-2**31, 2**31 - 1]``:
``plain_int32_wraps`` counts them.

All functions are pure; maxima are read to the host (one ``aminmax`` per operand).
"""

from __future__ import annotations

import torch

from intrain.numeric import native
from intrain.numeric.rounding import shift_round

INT32_MAX = 2**31 - 1
#: Shifting an int16 value (|v| < 2**15) right by this many bits always gives 0, so no search for
#: headroom needs more: with both operands at 0 every bound holds.
MAX_SHIFT = 16


def shifted_max(largest: int, shift: int) -> int:
    """Largest magnitude after a nearest right shift by ``shift`` of values of magnitude at most
    ``largest`` (see the module docstring)."""
    return largest if shift == 0 else (largest + (1 << (shift - 1))) >> shift


def chunk_bound(max_a: int, max_b: int, chunk: int, ha: int, hb: int) -> int:
    """Largest magnitude of any partial sum of ``chunk`` products of the shifted operands."""
    return chunk * shifted_max(max_a, ha) * shifted_max(max_b, hb)


def headroom_shifts(max_a: int, max_b: int, terms: int, chunk_length: int, headroom: int) -> tuple[int, int]:
    """The right shifts ``(ha, hb)`` of two operands with maxima ``max_a``, ``max_b`` for a
    reduction of ``terms`` terms in chunks of ``chunk_length``: the smallest total ``ha + hb``
    with both at least ``headroom`` whose ``chunk_bound`` is at most ``INT32_MAX``; among equal
    totals the smallest bound, then the most even split."""
    chunk = max(1, min(chunk_length, terms))
    for total in range(2 * headroom, 2 * MAX_SHIFT + 1):
        splits = [(ha, total - ha) for ha in range(headroom, total - headroom + 1)
                  if ha <= MAX_SHIFT and total - ha <= MAX_SHIFT]
        ha, hb = min(splits, key=lambda s: (chunk_bound(max_a, max_b, chunk, *s), abs(s[0] - s[1]), -s[0]))
        if chunk_bound(max_a, max_b, chunk, ha, hb) <= INT32_MAX:
            return ha, hb
    raise AssertionError("unreachable: both operands shifted by MAX_SHIFT are zero")


def absmax(t: torch.Tensor) -> int:
    """max |t| as a Python int (0 for an empty tensor)."""
    if t.numel() == 0:
        return 0
    low, high = torch.aminmax(t)
    return max(-int(low), int(high))


def shift_operand(v: torch.Tensor, shift: int) -> torch.Tensor:
    """``v`` shifted right by ``shift`` bits with nearest rounding, in ``v``'s dtype (rounded in
    int32: ``|v| + 2**(shift-1)`` can pass int16's range, the result cannot, ``|v| < 2**15``)."""
    if shift == 0:
        return v
    if v.dtype == torch.int16:
        shifted = native.shift_int16(v, shift)  # one C pass, same bits
        if shifted is not None:
            return shifted
    return shift_round(v.to(torch.int32), shift, "nearest").to(v.dtype)


def shift_operands(args: tuple, shifts: tuple[int, int]) -> tuple:
    """``args`` with its first two entries (a product's operands) shifted by ``shifts``
    (``shift_operand``), the rest as they are."""
    return (shift_operand(args[0], shifts[0]), shift_operand(args[1], shifts[1]), *args[2:])


def headroom_operands(a: torch.Tensor, b: torch.Tensor, terms: int, chunk_length: int,
                      headroom: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(a', b', ha + hb)``: both operands of a product of ``terms`` terms shifted so that its
    int32 chunk sums cannot wrap (``headroom_shifts``); the product of ``a'`` and ``b'`` times
    ``2**(ha + hb)`` stands for the product of ``a`` and ``b``."""
    ha, hb = headroom_shifts(absmax(a), absmax(b), terms, chunk_length, headroom)
    return *shift_operands((a, b), (ha, hb)), ha + hb


def plain_int32_wraps(exact: torch.Tensor) -> int:
    """How many of the exact sums ``exact`` a plain int32 accumulator would get wrong (those
    outside int32's range; see the module docstring)."""
    if exact.dtype != torch.int64:
        return 0  # a narrower result dtype already holds every sum (the kernels' static bound)
    return int(((exact > INT32_MAX) | (exact < -INT32_MAX - 1)).sum())
