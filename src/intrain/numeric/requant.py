"""Requantisation: from a wide integer accumulator back to int8 (or int16) with a shared exponent.

Given an accumulator ``a`` (int32 or int64) with exponent ``e``: ``b = bit_length(max |a|)``; when
``b`` exceeds ``bits - 1`` the values are shifted right by ``s = b - (bits - 1)`` with the chosen
rounding and the exponent becomes ``e + s``; otherwise they are kept as they are (``s = 0``).
The result is clipped to the symmetric range ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``
(``[-127, 127]`` for int8, ``[-32767, 32767]`` for int16) and stored in int8 or int16.
Rounding may carry one value past the limit (127.5 rounds to 128); the clip absorbs that.

Shards: when ``a`` is one process's shard of a batch split over several processes,
``reduce_max`` (the run's ``Collective.max``) turns the local ``bit_length(max |a|)`` into the
maximum over all shards, which is ``bit_length`` of the whole batch's ``max |a|`` (bit length is
monotone), so every shard takes the shift the whole batch would: the values of each shard are
exactly the rows of the whole batch's result, and the exponent is the same everywhere. Every
shard must call it, in the same order, an empty one included. ``offset`` is the shard's first
element in the whole batch, so that stochastic rounding draws the whole batch's numbers
(``numeric.rounding``).
"""

from __future__ import annotations

import torch

from intrain.numeric import native
from intrain.numeric.qtensor import QTensor
from intrain.numeric.rounding import cpu_max_bit_length, max_bit_length, shift_round

_STORAGE = {8: torch.int8, 16: torch.int16}


def cpu_shift(a: torch.Tensor, bits: int, reduce_max=None) -> int:
    """The requantisation shift of a CPU accumulator ``a`` to ``bits`` bits, as a Python int: the
    bit length of ``max |a|`` (over all processes with ``reduce_max``) above ``bits - 1``."""
    length = cpu_max_bit_length(a)
    if reduce_max is not None:
        length = int(reduce_max(torch.tensor(length, dtype=torch.int64)))
    return max(length - (bits - 1), 0)


def requantize(
    a: torch.Tensor,
    e: torch.Tensor,
    bits: int = 8,
    mode: str = "nearest",
    key: tuple[int, int] | None = None,
    *,
    offset: int = 0,
    reduce_max=None,
) -> QTensor:
    """Round accumulator ``a * 2**e`` to a ``bits``-bit QTensor (see module docstring; ``offset``
    and ``reduce_max`` for a shard of a batch)."""
    if bits not in _STORAGE:
        raise ValueError(f"requantize supports 8 or 16 bits, got {bits}")
    limit = 2 ** (bits - 1) - 1
    if a.device.type == "cpu":
        shift = cpu_shift(a, bits, reduce_max)
        values = native.round_shift(a, shift, mode, limit, _STORAGE[bits], key, offset)  # one C pass
        if values is not None:
            return QTensor(values, e + shift)
        shift = torch.tensor(shift, dtype=torch.int64)
    else:
        length = max_bit_length(a) if reduce_max is None else reduce_max(max_bit_length(a))
        shift = (length - (bits - 1)).clamp(min=0)
    if mode != "nearest" or a.device.type != "cpu":
        v = shift_round(a, shift, mode, key, offset).clamp_(-limit, limit).to(_STORAGE[bits])
        return QTensor(v, e + shift)
    v = torch.empty(a.shape, dtype=_STORAGE[bits])
    for rows in cpu_slices(a):
        v[rows] = shift_round(a[rows], shift, mode).clamp_(-limit, limit)
    return QTensor(v, e + shift)


#: Largest exponent gap bridged exactly by ``add_aligned``: int16 values (< 2**15) shifted left by
#: up to this many bits and added stay below 2**61, and with the rounding constant of the
#: requantisation (< 2**60) below 2**62: no int64 overflow.
ADD_MAX_GAP = 45


def _aligned(v: torch.Tensor, e: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``v * 2**(e - base)`` in int64; a value more than ADD_MAX_GAP bits below the other operand
    (``e < base``) enters as its sign (see ``add_aligned``)."""
    wide = v.to(torch.int64)
    s = e - base
    return torch.where(s < 0, wide.sign(), wide << s.clamp(min=0))


def add_aligned(a: QTensor, b: QTensor, bits: int = 8, mode: str = "nearest",
                key: tuple[int, int] | None = None, *, offset: int = 0, reduce_max=None) -> QTensor:
    """``a + b`` for integer QTensors with different exponents, rounded once to ``bits`` bits.

    The operands are aligned to the finer exponent by exact left shifts and added exactly; the
    sum is requantised like a product (one rounding, ``mode``). So the result is the exact sum
    rounded once: rounding the finer operand to the coarser exponent first and then the sum
    again would round twice. An all-zero operand takes the other's exponent (its own is
    meaningless, e.g. a zero-initialised branch). When the exponents differ by more than
    ``ADD_MAX_GAP`` bits, the finer operand is below 2**-30 of the coarser one's unit (far below
    half a unit of the result): it can only decide a tie, so it enters as its sign at the gap's
    limit, which gives the exact sum's nearest rounding (and changes stochastic rounding's
    probabilities by less than 2**-30).

    On CPU the exponents are read as Python integers and the exact sum is held in the narrowest
    integer type that the operands' dtypes and the shift prove wide enough (int16 for int8
    operands up to 7 bits apart: 128 * 2**7 + 128 < 2**15), so a residual add of int8 tensors
    makes 2-byte temporaries instead of 8-byte ones, with the same values; elsewhere the
    exponents stay tensors (no copy to the host) and the sum is int64. Shapes must match.
    """
    if a.v.shape != b.v.shape:
        raise ValueError(f"cannot add QTensors of shapes {tuple(a.v.shape)} and {tuple(b.v.shape)}")
    if a.v.device.type == "cpu":
        total, base = _exact_sum_narrow(a, b, reduce_max)
    else:
        total, base = _exact_sum_int64(a, b, reduce_max)
    return requantize(total, base, bits=bits, mode=mode, key=key, offset=offset, reduce_max=reduce_max)


def _exact_sum_int64(a: QTensor, b: QTensor, reduce_max=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact aligned sum in int64, its exponent) of ``add_aligned``, exponents as tensors."""
    if reduce_max is None:
        a_zero, b_zero = (a.v == 0).all(), (b.v == 0).all()
    else:
        nonzero = reduce_max(torch.stack([(a.v != 0).any(), (b.v != 0).any()]).to(torch.int64))
        a_zero, b_zero = nonzero[0] == 0, nonzero[1] == 0
    ea = torch.where(a_zero, b.e, a.e)
    eb = torch.where(b_zero, ea, b.e)
    base = torch.maximum(torch.minimum(ea, eb), torch.maximum(ea, eb) - ADD_MAX_GAP)
    return _aligned(a.v, ea, base) + _aligned(b.v, eb, base), base


def _all_zero(v: torch.Tensor) -> bool:
    """Whether every value of ``v`` is 0, in one vectorised pass (``aminmax``; ``any`` converts
    to bool first and was 30x slower on an int8 [64, 64, 32, 32] tensor)."""
    if v.numel() == 0:
        return True
    low, high = torch.aminmax(v)
    return int(low) == 0 and int(high) == 0


#: Integer types the exact sum of ``add_aligned`` may be held in on CPU, narrowest first.
_SUM_TYPES = (torch.int16, torch.int32, torch.int64)


def _exact_sum_narrow(a: QTensor, b: QTensor, reduce_max=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same (exact aligned sum, exponent) as ``_exact_sum_int64``, on CPU, in the narrowest
    of ``_SUM_TYPES`` that holds every possible sum: an operand of a ``w``-bit type has
    magnitude at most 2**(w-1), 2**(w-1+s) after a left shift by s, and 1 when it enters as its
    sign; the two bounds added must not exceed the type's maximum."""
    ea, eb = int(a.e), int(b.e)
    a_zero, b_zero = _all_zero(a.v), _all_zero(b.v)
    if reduce_max is not None:
        nonzero = reduce_max(torch.tensor([not a_zero, not b_zero], dtype=torch.int64))
        a_zero, b_zero = int(nonzero[0]) == 0, int(nonzero[1]) == 0
    if a_zero:
        ea = eb
    if b_zero:
        eb = ea
    base = max(min(ea, eb), max(ea, eb) - ADD_MAX_GAP)
    sa, sb = ea - base, eb - base  # at most one is nonzero; negative: enters as its sign

    def bound(v: torch.Tensor, shift: int) -> int:
        return 1 if shift < 0 else 2 ** (torch.iinfo(v.dtype).bits - 1 + shift)

    largest = bound(a.v, sa) + bound(b.v, sb)
    dtype = next(t for t in _SUM_TYPES if largest <= torch.iinfo(t).max)

    def aligned(v: torch.Tensor, shift: int) -> torch.Tensor:
        if shift < 0:
            return v.sign().to(dtype)
        wide = v.to(dtype)
        return wide.bitwise_left_shift_(shift) if shift else wide

    total = torch.empty(a.v.shape, dtype=dtype)
    for rows in cpu_slices(total):  # temporaries of one slice, reused from the allocator's cache
        torch.add(aligned(a.v[rows], sa), aligned(b.v[rows], sb), out=total[rows])
    return total, torch.tensor(base, dtype=torch.int64)


#: Largest left shift of a bias in ``add_bias``: a bias below 2**15 in magnitude shifted by it stays
#: below 2**55, and an accumulator below 2**62 - 2**55 keeps the sum in int64.
BIAS_MAX_SHIFT = 40


def add_bias(total: torch.Tensor, e: torch.Tensor, bias: torch.Tensor, bias_exp: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``total * 2**e + bias * 2**bias_exp`` as (integer values, exponent), the bias ([C], |b| <
    2**15) broadcast along dimension 1 of the accumulator ``total`` (|total| < 2**61); the values
    are int64, or on CPU the accumulator's own type where the sum fits it (below).

    The sum is held at ``base = max(e, bias_exp - BIAS_MAX_SHIFT)``: the bias enters shifted left
    by ``bias_exp - base <= BIAS_MAX_SHIFT`` bits (exact) or, when it is finer than the
    accumulator, rounded to nearest at the accumulator's unit (an error of at most half a unit of
    the accumulator, which the output's requantisation, ``bits - 1`` bits of the largest value,
    rounds at a unit 2**(L - bits + 1) times coarser for an accumulator of L bits); only when the
    bias unit is more than ``BIAS_MAX_SHIFT`` bits above the accumulator's is the accumulator first
    rounded to ``base`` (which moves the sum by at most 2**-41 of one bias unit). An all-zero
    bias adds nothing and keeps ``(total, e)`` (its exponent means nothing, e.g. before the first
    update). Exact otherwise: the result's requantisation is the layer's one rounding.

    ``total`` is consumed (it may be changed in place). On CPU, whenever ``base = e`` (the bias at
    most ``BIAS_MAX_SHIFT`` bits coarser), the exponents are read as Python integers and the
    aligned bias (a [C] tensor) is added in place, in the accumulator's own integer type when the
    sum provably fits it (``max|total| + max|aligned bias|``, one ``aminmax`` pass), else in
    int64: the same values as the general path without its full-size int64 rounding pass, which
    tripled a LeNet-5 int8 step while its biases were finer than the accumulator (``python
    benchmarks/speed.py --update sgd --biases on``)."""
    if not bool(bias.any()):
        return total, e
    if total.device.type == "cpu" and not total.is_floating_point():
        aligned = aligned_bias(bias, bias_exp, e)
        if aligned is not None:
            if not bool(aligned.any()) or total.numel() == 0:  # nothing to add; an empty shard
                return total, e
            return with_bias(total, aligned), e
    return add_bias_by_tensors(total, e, bias, bias_exp)


def aligned_bias(bias: torch.Tensor, bias_exp: torch.Tensor, e) -> torch.Tensor | None:
    """The bias at the accumulator's exponent ``e`` as int64 (``add_bias``: shifted left, or
    rounded to nearest when finer), or None when it is more than ``BIAS_MAX_SHIFT`` bits coarser
    (``add_bias`` then rounds the accumulator first). Reads the exponents on the host."""
    gap = int(bias_exp) - int(e)
    if gap > BIAS_MAX_SHIFT:
        return None
    b = bias.to(torch.int64)
    return b << gap if gap >= 0 else shift_round(b, -gap, "nearest")


def add_bias_by_tensors(total: torch.Tensor, e: torch.Tensor, bias: torch.Tensor, bias_exp: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_bias`` on any device, the exponents kept as tensors (no copy to the host), in int64."""
    base = torch.maximum(e, bias_exp - BIAS_MAX_SHIFT)
    total = shift_round(total.to(torch.int64), base - e, "nearest")
    b = bias.to(torch.int64)
    gap = bias_exp - base
    aligned = torch.where(gap >= 0, b << gap.clamp(min=0), shift_round(b, (-gap).clamp(min=0), "nearest"))
    shape = (1, -1) + (1,) * (total.dim() - 2)
    return total.add_(aligned.reshape(shape)), base


#: On CPU, element-wise passes over large tensors work on slices of about this many elements:
#: their temporaries then stay small and are reused by the allocator instead of page-faulting
#: fresh memory (measured: requantising a [64, 128, 32, 32] int32 accumulator 15.2 -> 5.0 ms).
CPU_SLICE_ELEMENTS = 2**18


def cpu_slices(t: torch.Tensor) -> list:
    """Indices of slices of ``t``'s first dimension holding about CPU_SLICE_ELEMENTS elements
    each (at least one row; the whole tensor when it has no dimension or no rows)."""
    if t.dim() == 0 or t.shape[0] == 0:
        return [...]
    per_row = max(1, t[0].numel())
    step = max(1, CPU_SLICE_ELEMENTS // per_row)
    return [slice(i, i + step) for i in range(0, t.shape[0], step)]


def requantize_product(backend, name: str, args: tuple, e: torch.Tensor, bits: int = 8, *,
                       reduce_max=None, shifts: tuple[int, int] = (0, 0), rectify: bool = False,
                       bias: torch.Tensor | None = None) -> QTensor:
    """``requantize(backend.shifted_product(name, args, shifts), e, bits, reduce_max=reduce_max)``
    with nearest rounding (``shifts``: the right shifts of the two operands, DFP16's headroom);
    ``bias``: an int64 [C] tensor at the product's exponent ``e`` (``aligned_bias``) added along
    dimension 1 before the rounding; ``rectify``: of the (biased) product's positive part ``max(y,
    0)`` (a ReLU follows: the exponent then comes from the largest positive value,
    ``numeric.formats``). The cpu backend offers ``product_to_int8`` and ``product_to_int16``,
    which give the same bits without making the whole integer accumulator; other backends are
    requantised here."""
    fused = getattr(backend, {8: "product_to_int8", 16: "product_to_int16"}.get(bits, ""), None)
    if fused is None:
        exact = backend.shifted_product(name, args, shifts) if any(shifts) else getattr(backend, name)(*args)
        if bias is not None:
            exact = with_bias(exact, bias)
        return requantize(exact.clamp_(min=0) if rectify else exact, e, bits=bits, reduce_max=reduce_max)
    values, shift = fused(name, *args, reduce_max=reduce_max, shifts=shifts, rectify=rectify, bias=bias)
    return QTensor(values, e + shift)


def with_bias(exact: torch.Tensor, bias: torch.Tensor, room: int | None = None,
              bound: int | None = None) -> torch.Tensor:
    """The tensor of integers ``exact`` (any memory layout; consumed) plus the int64 [C] ``bias``
    along dimension 1, exactly: in place in ``exact``'s own type when ``max|exact| + max|bias|``
    is at most ``room``, the largest magnitude that type holds exactly (default: an integer type's
    maximum), else in int64 (|exact| < 2**61, |bias| < 2**55). ``bound``, where given, is an upper
    bound on ``max|exact|`` known without reading it (the cpu backend's, from its operands' types
    and the terms each entry sums: ``kernels.cpu.backend.exact_with_bias``); where it leaves the
    room the sum is made without the ``aminmax`` pass that measures ``max|exact|`` otherwise. The
    cpu backend's exact products held in floats pass their room too."""
    shape = (1, -1) + (1,) * (exact.dim() - 2)
    if room is None:
        room = torch.iinfo(exact.dtype).max
    if exact.numel():
        bias_max = int(bias.abs().max())
        if bound is None or bound + bias_max > room:
            low, high = torch.aminmax(exact)
            bound = max(-int(low), int(high))
        if bound + bias_max <= room:
            return exact.add_(bias.to(exact.dtype).reshape(shape))
    return exact.to(torch.int64).add_(bias.reshape(shape))
