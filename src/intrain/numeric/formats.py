"""Number formats: how wide the integers of a training step are and how they are rounded.

A ``NumberFormat`` is one value that the layers, the requantisation of products, the integer
loss gradient, initialisation and the update all take, so a method is a choice of format, not a
copy of their code. Its fields are orthogonal:

- ``bits``: value bits of activations, errors and weights, sign included. Values are kept in the
  symmetric range ``[-limit, limit]`` with ``limit = 2**(bits-1) - 1`` (``[-127, 127]`` for 8
  bits, so that negation never overflows and every product of two values is at most
  ``limit**2``), stored in the narrowest torch integer dtype that holds them.
- ``master_bits``: when set, every weight also has a wider master copy of this many bits that
  takes the updates; the ``bits``-wide weight used by the products is its nearest-rounded upper
  ``bits`` bits (NITI's 16-bit weight accumulation behind an 8-bit datapath). The master has
  ``master_bits - bits`` more fraction bits, so updates smaller than one step of the narrow
  weight accumulate instead of being lost.
- ``error_rounding``: rounding of the errors a weighted layer sends down: ``nearest`` (NITI) or
  ``stochastic`` (counter-based, unbiased).
- ``activation_rounding``: rounding of the outputs of convolution and linear layers in a training
  step: ``nearest`` (NITI) or ``stochastic`` (counter-based, unbiased: noise of under one step of
  the output's exponent, tried as a regulariser; it beat nearest on no tuning split
  measured, BENCHMARKS.md, "Issue 17: rounding noise in the int8 step"). Evaluation always rounds to
  nearest, so a trained model's outputs are deterministic.
- ``accumulator``: how products are accumulated. ``exact``: every backend returns the exact
  integer sum (int32 when ``limit**2 * K < 2**31`` is proved statically, else int64).
  ``int32-chunked`` (DFP16's overflow control, ``numeric.accumulate``): the reduction is cut into
  chunks of ``chunk_length`` terms whose int32 partial sums provably cannot wrap, because both
  operands are first shifted right (nearest rounding) by the fewest headroom bits (at least
  ``headroom`` each) that the bound from their actual max ``|x|`` and ``|w|`` needs; the chunk
  sums are added in int64. The result is the exact product of the shifted operands, with the
  shifts added to the exponent.
- ``chunk_length``, ``headroom``: the ``int32-chunked`` accumulator's chunk length (terms per
  int32 partial sum) and minimum right shift of each operand (bits); unused by ``exact``.
- ``exponent``: granularity of the power-of-two exponents: ``tensor``, one per tensor (the only
  one so far; per-channel exponents would be another value here).
- ``relu_scale``: the output exponent of a convolution or linear layer that a ReLU directly
  follows: from its largest magnitude (``magnitude``, NITI's rule for every product) or from its
  largest positive value (``positive``): the ReLU zeroes every negative value whatever its scale,
  and at a given exponent rounding and ReLU commute (round(max(y, 0)) = max(round(y), 0)), so
  rounding ``max(y, 0)`` gives the ReLU's output the whole range where a large negative value
  would have scaled the kept ones down (the layers: ``layers.sequential``; BENCHMARKS.md, "A
  ReLU's range").

Presets: ``NITI_INT8``, ``NITI_INT8_MASTER16`` (NITI) and ``DFP16`` (Das et al. 2018: int16
values with a per-tensor exponent from max ``|x|``, products through the int32-chunked
accumulator; its master weights and momentum belong to its update, ``methods.dfp16``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from intrain.numeric.qtensor import QTensor
from intrain.numeric.requant import add_aligned, requantize

#: Storage dtype by value bits.
_STORAGE = {8: torch.int8, 16: torch.int16}
ERROR_ROUNDINGS = ("nearest", "stochastic")
ACTIVATION_ROUNDINGS = ("nearest", "stochastic")
ACCUMULATORS = ("exact", "int32-chunked")
RELU_SCALES = ("magnitude", "positive")
EXPONENT_GRANULARITIES = ("tensor",)


@dataclass(frozen=True)
class NumberFormat:
    bits: int = 8
    master_bits: int | None = None
    error_rounding: str = "nearest"
    accumulator: str = "exact"
    exponent: str = "tensor"
    chunk_length: int = 16
    headroom: int = 0
    relu_scale: str = "magnitude"
    activation_rounding: str = "nearest"

    def __post_init__(self) -> None:
        if self.bits not in _STORAGE:
            raise ValueError(f"value bits must be one of {', '.join(map(str, _STORAGE))}, got {self.bits}")
        if self.master_bits is not None and (self.master_bits not in _STORAGE or self.master_bits <= self.bits):
            raise ValueError(f"master bits must be wider than the {self.bits} value bits and one of "
                             f"{', '.join(map(str, _STORAGE))}, got {self.master_bits}")
        if self.error_rounding not in ERROR_ROUNDINGS:
            raise ValueError(f"error rounding must be one of {', '.join(ERROR_ROUNDINGS)}, got {self.error_rounding!r}")
        if self.activation_rounding not in ACTIVATION_ROUNDINGS:
            raise ValueError(f"activation rounding must be one of {', '.join(ACTIVATION_ROUNDINGS)}, "
                             f"got {self.activation_rounding!r}")
        if self.accumulator not in ACCUMULATORS:
            raise ValueError(f"accumulator must be one of {', '.join(ACCUMULATORS)}, got {self.accumulator!r}")
        if isinstance(self.chunk_length, bool) or not isinstance(self.chunk_length, int) or self.chunk_length < 1:
            raise ValueError(f"chunk length must be an integer >= 1, got {self.chunk_length!r}")
        if isinstance(self.headroom, bool) or not isinstance(self.headroom, int) or not 0 <= self.headroom < self.bits:
            raise ValueError(f"headroom must be an integer in [0, {self.bits - 1}] bits, got {self.headroom!r}")
        if self.relu_scale not in RELU_SCALES:
            raise ValueError(f"relu scale must be one of {', '.join(RELU_SCALES)}, got {self.relu_scale!r}")
        if self.exponent not in EXPONENT_GRANULARITIES:
            raise ValueError(f"exponent granularity must be one of {', '.join(EXPONENT_GRANULARITIES)}, "
                             f"got {self.exponent!r}")

    @property
    def limit(self) -> int:
        """Largest magnitude of a value: ``2**(bits-1) - 1``."""
        return (1 << (self.bits - 1)) - 1

    @property
    def dtype(self) -> torch.dtype:
        return _STORAGE[self.bits]

    @property
    def master_dtype(self) -> torch.dtype:
        return _STORAGE[self.master_bits]

    @property
    def master_extra_bits(self) -> int:
        """Fraction bits the master weight keeps below the value weight."""
        return self.master_bits - self.bits

    def requantize(self, acc: torch.Tensor, e: torch.Tensor, mode: str = "nearest",
                   key: tuple[int, int] | None = None, *, offset: int = 0, reduce_max=None) -> QTensor:
        """``acc * 2**e`` rounded to this format's values (see ``numeric.requant``; ``offset`` and
        ``reduce_max`` when ``acc`` is a shard of a batch)."""
        return requantize(acc, e, bits=self.bits, mode=mode, key=key, offset=offset, reduce_max=reduce_max)

    def add(self, a: QTensor, b: QTensor, mode: str = "nearest", key: tuple[int, int] | None = None, *,
            offset: int = 0, reduce_max=None) -> QTensor:
        """``a + b`` aligned by exact shifts and rounded once to this format (``numeric.requant.add_aligned``)."""
        return add_aligned(a, b, bits=self.bits, mode=mode, key=key, offset=offset, reduce_max=reduce_max)


NITI_INT8 = NumberFormat(bits=8)
NITI_INT8_MASTER16 = NumberFormat(bits=8, master_bits=16)
DFP16 = NumberFormat(bits=16, accumulator="int32-chunked")
