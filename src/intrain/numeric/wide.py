"""Wide dynamic fixed point: int32 values with one power-of-two exponent per tensor, the master
weights and momentum of the integer-only SGD update (``methods.sgd_fixed``: DFP16's, NITI's
``--update sgd``).

A wide tensor is a ``QTensor`` whose values are int32 with ``|v| <= 2**31 - 1``. Each operation
computes its exact result in int64 and rounds it once, to nearest (ties away from zero), to 31
bits of magnitude, moving the exponent by the shift (``requantize``):

- ``scale(a, (f, e))``: ``a * f * 2**e`` for an integer factor ``|f| < 2**31``; ``|v * f| < 2**62``,
  exact in int64.
- ``add(a, b)``: both operands are aligned to ``base = max(min(ea, eb), max(ea, eb) - 30)``: the
  coarser one by a left shift of at most 30 bits (``< 2**61``), the finer one by a left shift too
  when it is at most 30 bits finer (exact), else by a nearest right shift to ``base`` (a first
  rounding, of at most half a unit of ``2**base``, that is at most ``2**-31`` of one unit of the
  coarser operand's exponent); the int64 sum (``< 2**62``) is rounded once. An all-zero operand
  takes the other's exponent (its own means nothing, e.g. a momentum that starts at zero).

Exponents are 0-d int64 tensors on the values' device (no copy to the host).
"""

from __future__ import annotations

import torch

from intrain.numeric.qtensor import QTensor
from intrain.numeric import native
from intrain.numeric.rounding import cpu_max_bit_length, max_bit_length, shift_round

#: Magnitude bits of a wide value.
VALUE_BITS = 31
LIMIT = 2**VALUE_BITS - 1
#: Largest left shift ``add`` applies: a 31-bit value shifted by it stays below 2**61.
MAX_ALIGN = 30


def requantize(a: torch.Tensor, e: torch.Tensor) -> QTensor:
    """``a * 2**e`` (any integer dtype, ``|a| < 2**62``) rounded to a wide tensor."""
    a = a.to(torch.int64)
    if a.device.type == "cpu":
        shift = max(cpu_max_bit_length(a) - VALUE_BITS, 0)
        values = native.round_shift(a, shift, "nearest", LIMIT, torch.int32)  # one C pass, same bits
        if values is not None:
            return QTensor(values, e + shift)
    shift = (max_bit_length(a) - VALUE_BITS).clamp(min=0)
    return QTensor(shift_round(a, shift, "nearest").clamp_(-LIMIT, LIMIT).to(torch.int32), e + shift)


def from_values(v: torch.Tensor, e: torch.Tensor) -> QTensor:
    """The integer tensor ``v * 2**e`` (int8 or int16) as a wide tensor, exactly, with its values
    moved to the top of int32 (``v << (31 - bits)``, below 2**30) so that later updates keep the
    bits below them."""
    shift = VALUE_BITS - torch.iinfo(v.dtype).bits
    return QTensor(v.to(torch.int32) << shift, e - shift)


def scale(a: QTensor, factor: tuple[int, int]) -> QTensor:
    """``a * f * 2**fe`` for ``factor = (f, fe)``, ``|f| < 2**31``, rounded once."""
    f, fe = factor
    if not abs(f) <= LIMIT:
        raise ValueError(f"a wide factor must be below 2**31 in magnitude, got {f}")
    if a.v.device.type == "cpu":
        fused = native.wide_scale(a.v, f)  # C: the same bits, no int64 temporary
        if fused is not None:
            return QTensor(fused[0], a.e + (fe + fused[1]))
    return requantize(a.v.to(torch.int64) * f, a.e + fe)


def _aligned(v: torch.Tensor, e: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    wide = v.to(torch.int64)
    s = e - base
    if s.device.type == "cpu":  # no device to stay on: pick the one alignment needed on the host
        shift = int(s)
        return wide << shift if shift >= 0 else shift_round(wide, min(-shift, 62), "nearest")
    # a right shift by 62 already rounds every 31-bit value to 0; larger ones would overflow 1 << s
    return torch.where(s >= 0, wide << s.clamp(min=0), shift_round(wide, (-s).clamp(0, 62), "nearest"))


def add(a: QTensor, b: QTensor) -> QTensor:
    """``a + b`` for wide tensors of one shape, aligned and rounded once (module docstring)."""
    if a.v.shape != b.v.shape:
        raise ValueError(f"cannot add wide tensors of shapes {tuple(a.v.shape)} and {tuple(b.v.shape)}")
    if a.v.device.type == "cpu":
        fused = _add_on_cpu(a, b)
        if fused is not None:
            return fused
    ea = torch.where((a.v == 0).all(), b.e, a.e)
    eb = torch.where((b.v == 0).all(), ea, b.e)
    base = torch.maximum(torch.minimum(ea, eb), torch.maximum(ea, eb) - MAX_ALIGN)
    return requantize(_aligned(a.v, ea, base) + _aligned(b.v, eb, base), base)


def _add_on_cpu(a: QTensor, b: QTensor) -> QTensor | None:
    """``add`` by the C kernels (``native.wide_add``: the same exponents and bits, in two passes
    with no int64 temporaries), or None where they do not apply."""
    max_a, max_b = native.max_abs(a.v), native.max_abs(b.v)
    if max_a is None or max_b is None:
        return None
    ea = int(b.e) if max_a == 0 else int(a.e)
    eb = ea if max_b == 0 else int(b.e)
    base = max(min(ea, eb), max(ea, eb) - MAX_ALIGN)
    fused = native.wide_add(a.v, ea - base, b.v, eb - base)
    if fused is None:
        return None
    return QTensor(fused[0], torch.tensor(base + fused[1], dtype=torch.int64))
