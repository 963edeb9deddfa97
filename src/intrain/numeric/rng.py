"""Counter-based integer random numbers: the same stream on every device and backend.

Every random number in intrain is a pure function of ``(seed, step, layer, stream, element index)``.
There is no generator state to carry, save or restore: replaying step ``k`` of a run needs only the
seed and ``k``. All arithmetic is on int64 tensors holding unsigned 32-bit values; every product is
of a value below 2**32 with a constant below 2**31, so no intermediate reaches 2**63 and the result
is the same on any machine.

Guarantees: ``uint32`` returns int64 values in ``[0, 2**32)``; ``uniform_bits(..., bits=s)``
returns values in ``[0, 2**s)`` for ``0 <= s <= 62``.

Element offset: ``uint32(key, shape, offset=k)`` is elements ``k, k+1, ...`` of the stream that
``offset=0`` starts at element 0, so a tensor cut into contiguous pieces (a data-parallel shard
of a batch is one, ``offset`` = its first element's position in the whole) draws, piece by piece,
exactly the numbers the whole tensor draws. ``offset=0`` is the stream as it always was.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D  # odd multipliers below 2**31, so x * _MUL < 2**63 for x < 2**32
_MUL2 = 0x2C1B3C6D

# Stream identifiers: one per purpose, so two uses never share numbers.
STREAM_INIT = 1
STREAM_SHUFFLE = 2
STREAM_DROPOUT = 3
STREAM_LOSS_ROUNDING = 4
STREAM_ROUNDING = 5
STREAM_AUGMENT = 6
# 7: moving-MNIST clips (``data.moving_mnist``)
STREAM_WEIGHT_DECAY = 8
STREAM_ACTIVATION_ROUNDING = 9


def _mix_int(x: int) -> int:
    x &= MASK32
    x ^= x >> 16
    x = (x * _MUL1) & MASK32
    x ^= x >> 15
    x = (x * _MUL2) & MASK32
    x ^= x >> 16
    return x


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Bijective avalanche hash of int64 tensor values in [0, 2**32); same as ``_mix_int``.
    Works in place on one copy of ``x``: on CPU each fresh temporary costs more than the
    arithmetic on it (``python benchmarks/rng_speed.py``)."""
    x = x ^ (x >> 16)
    x.mul_(_MUL1).bitwise_and_(MASK32)
    x.bitwise_xor_(x >> 15)
    x.mul_(_MUL2).bitwise_and_(MASK32)
    return x.bitwise_xor_(x >> 16)


def derive_key(*parts: int) -> tuple[int, int]:
    """Fold any number of non-negative integers (seed, step, layer, stream...) into two 32-bit keys."""
    k1, k2 = 0x243F6A88, 0x85A308D3
    for part in parts:
        if part < 0:
            raise ValueError(f"random key parts must be non-negative, got {part}")
        while True:
            k1 = _mix_int(k1 ^ (part & MASK32))
            k2 = _mix_int(k2 ^ k1 ^ 0x9E3779B9)
            part >>= 32
            if part == 0:
                break
    return k1, k2


#: Elements hashed at once on CPU: chunks whose int64 temporaries (256 KiB each) stay in cache
#: run the ~20 elementwise passes of the hash 1.4-2x faster than one pass over a 600,000-element
#: tensor (``python benchmarks/rng_speed.py``: chunk rows; 2**14 to 2**16 were alike on the
#: Xeon of BENCHMARKS.md, and 2**15 leaves room in the smaller L2 caches of other CPUs). Other
#: devices hash in one go.
CPU_CHUNK_ELEMENTS = 2**15


def _hashed(key: tuple[int, int], numel: int, device, offset: int, chunk_elements: int, shift: int,
            dtype: torch.dtype) -> torch.Tensor:
    """Elements ``offset .. offset + numel - 1`` of the stream of ``key``, each shifted right by
    ``shift`` bits, as a flat tensor of ``dtype`` (which must hold ``2**(32 - shift) - 1``)."""
    if offset < 0 or offset + numel > 2**32:
        raise ValueError("uint32 supports element positions in [0, 2**32): a smaller tensor or offset")
    k1, k2 = key

    def words(start: int, stop: int) -> torch.Tensor:
        index = torch.arange(offset + start, offset + stop, dtype=torch.int64, device=device)
        return mix32(mix32(index.bitwise_xor_(k1)).bitwise_xor_(k2)).bitwise_right_shift_(shift)

    if torch.device(device).type != "cpu" or numel <= chunk_elements:
        return words(0, numel).to(dtype)
    out = torch.empty(numel, dtype=dtype)
    for start in range(0, numel, chunk_elements):
        stop = min(numel, start + chunk_elements)
        out[start:stop] = words(start, stop)
    return out


def _numel(shape) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel


def uint32(key: tuple[int, int], shape: tuple[int, ...] | torch.Size, device="cpu", offset: int = 0,
           chunk_elements: int = CPU_CHUNK_ELEMENTS) -> torch.Tensor:
    """One uniform 32-bit integer per element (int64 tensor), element ``i`` a function of
    ``key, offset + i`` (see the module docstring); ``chunk_elements`` changes only the speed."""
    return _hashed(key, _numel(shape), device, offset, chunk_elements, 0, torch.int64).reshape(tuple(shape))


def uniform_bits(key: tuple[int, int], shape, bits: torch.Tensor | int, device="cpu", offset: int = 0,
                 dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Uniform integers in ``[0, 2**bits)``, ``bits`` from 0 to 62, possibly a 0-d tensor;
    element ``i`` is element ``offset + i`` of the stream. ``dtype`` (default int64) must hold
    ``2**bits - 1``.

    The value is the top ``bits`` bits of a 63-bit word ``high * 2**32 + low`` (``high``: the
    top 31 bits of one 32-bit draw, ``low``: another draw). For ``bits <= 31`` those are the top
    bits of ``high`` alone, so ``low`` is not drawn when ``bits`` is known on the host to be at
    most 31: the same numbers for half the hashing (rounding shifts of int32 sums are below 32)."""
    if (not isinstance(bits, torch.Tensor) or bits.device.type == "cpu") and int(bits) <= 31:
        short = _hashed(key, _numel(shape), device, offset, CPU_CHUNK_ELEMENTS, 32 - int(bits), dtype)
        return short.reshape(tuple(shape))
    high = uint32(key, shape, device, offset) >> 1  # 31 bits
    low = uint32((key[0] ^ 0x5BD1E995, key[1]), shape, device, offset)
    word = (high << 32) | low  # uniform in [0, 2**63)
    return (word >> (63 - bits)).to(dtype)


def permutation(n: int, seed: int, epoch: int, device="cpu") -> torch.Tensor:
    """A shuffle of ``range(n)`` (int64) that depends only on ``(seed, epoch)``."""
    keys = uint32(derive_key(seed, epoch, STREAM_SHUFFLE), (n,), device)
    return torch.argsort(keys, stable=True)
