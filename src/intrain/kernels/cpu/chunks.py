"""Requantising a product delivered a chunk of samples at a time (the cpu backend's
``product_to_int8`` and ``product_to_int16``): the same values and shift as
``numeric.requant.requantize`` with nearest rounding, without ever holding the whole accumulator.
For 8-bit results of int8 operands (the int8 fast paths) and 16-bit results of int16 operands
(DFP16 on the int8 GEMM units); other formats go through ``numeric.requant``.

Each chunk is kept with a shift ``k`` of its own, in int16 for 8-bit results and in int32 for
16-bit ones (``STORAGE``), until the overall shift ``s`` is known (the largest magnitude of all
chunks), then rounded by ``s - k`` more bits. Two exact ways of keeping a chunk of exact integers
y (|y| < 2**31 for 8-bit results, < 2**62 for 16-bit ones), both proven in ``requantize_chunks``:

* float chunks (the float path, 8-bit results): ``t = trunc(y / 2**k)`` (a power-of-two scaling,
  exact in floats, and a truncating cast), rounded at the end by ``shift_round(t, s - k,
  "nearest")``;
* integer chunks (int32 from the int8 GEMM, int64 from the int16 halves): ``t = floor(b / 2**k)``
  with ``b = y - 1`` for y < 0 and ``b = y`` otherwise (three integer passes: sign, add, shift;
  one in C, ``native.floor_shift``, where the chunk and its copy share a dense layout), rounded
  at the end (``native.round_kept``, or PyTorch) by ``floor((t + 2**(m-1)) / 2**m)`` with ``m = s - k``, computed as ``u -
  floor(u / 2)`` with ``u = floor(t / 2**(m-1))`` (no intermediate leaves the storage type).

The stored copy and the result take the memory order of the chunks: a channels-last product
(the int8 GEMM's) stays channels-last, with no transposing copy.
"""

from __future__ import annotations

import torch

from intrain.numeric import native
from intrain.numeric.requant import cpu_slices
from intrain.numeric.rounding import max_bit_length, shift_round


#: Result bits -> (storage dtype of a chunk, its magnitude bits, result dtype).
STORAGE = {8: (torch.int16, 15, torch.int8), 16: (torch.int32, 31, torch.int16)}


def requantize_chunks(n: int, chunks, reduce_max=None, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A product requantised to ``bits`` (8 or 16) bits [N, ...] with nearest rounding, as
    (values, shift), from ``chunks``: (first sample, exact values of a chunk of samples, any memory
    layout) pairs, all of one layout: int32 or a float tensor of integers below 2**31 in magnitude
    for 8 bits, int64 below 2**62 for 16 bits. A chunk may be a buffer the next one reuses. The
    whole accumulator is never made: chunk c is kept in the storage type of ``STORAGE`` (Q
    magnitude bits: 15 or 31) with its own ``k = max(bit_length(max |chunk c|) - Q, 0)``; the
    overall shift is ``s = max(bit_length(max |y|) - (bits - 1), 0)``. When k > 0, s - k >= 1 (s >=
    bit_length(max |chunk|) - (bits - 1) = k + Q - bits + 1, and Q - bits + 1 is 8 or 16). The
    identity behind both representations: floor((floor(z) + c) / m) = floor((z + c) / m) for real
    z, integers c and m >= 1.

    Float chunks keep ``t = sign(y) * floor(|y| / 2**k)`` (|t| < 2**15): with z = |y| / 2**k,
    c = 2**(s-k-1), m = 2**(s-k), the nearest shift of t by s - k is floor((|y| + 2**(s-1)) /
    2**s) with y's sign, which is requantize's rounding (for k = 0, t = y).

    Integer chunks keep ``t = floor(b / 2**k)``, b as in the module docstring (b >= -2**31, or
    -2**62 for int64 chunks: no wrap; -2**Q <= t < 2**Q since |y| < 2**(Q+k)). Nearest rounding of y by s with ties away
    from zero is floor((b + 2**(s-1)) / 2**s) (``numeric.rounding._nearest``: for y >= 0 b = y,
    for y < 0 it is ceil((y - 2**(s-1)) / 2**s) = floor((y - 1 + 2**(s-1)) / 2**s)); by the
    identity with z = b / 2**k that is floor((t + 2**(m-1)) / 2**m), m = s - k >= 1; and with
    u = floor(t / 2**(m-1)), floor((t + 2**(m-1)) / 2**m) = floor((u + 1) / 2) = u - floor(u / 2)
    (the identity again). When s = 0, every |y| fits the result, k = 0 and y = t + 1 where t < 0.

    ``reduce_max`` (a ``Collective.max``), for a shard of a batch split over processes, turns the
    largest bit length of the shard's chunks into the whole batch's (``numeric.requant``), so s is
    the whole batch's shift; it is at least the shard's own, so the arguments above hold (they
    need only s >= bit_length(max |chunk|) - 7).
    """
    storage, storage_bits, result = STORAGE[bits]
    limit = 2 ** (bits - 1) - 1
    kept, largest_bits = [], 0  # (first sample, kept chunk, k, truncated) in the chunks' order
    for n0, part in chunks:
        chunk_bits = int(max_bit_length(part))  # reads a channels-last view in place
        k = max(chunk_bits - storage_bits, 0)
        kept.append((n0, _keep(part, k, storage), k, part.is_floating_point()))
        largest_bits = max(largest_bits, chunk_bits)
    if reduce_max is not None:
        largest_bits = int(reduce_max(torch.tensor(largest_bits, dtype=torch.int64)))
    shift = max(largest_bits - (bits - 1), 0)
    # Each kept chunk is rounded into a result chunk of its own and dropped at once, and the
    # result is joined from them after the last: the whole kept product (twice the result's size)
    # is never alive beside the whole result (DFP16's peak memory lay there).
    kept.sort(key=lambda entry: entry[0])
    pieces = []
    while kept:
        _, chunk_kept, k, truncated = kept.pop(0)
        pieces.append(_round_kept(chunk_kept, shift - k, truncated, limit, storage_bits, result))
        del chunk_kept  # before the next chunk's result is made
    if len(pieces) == 1:
        return pieces[0], torch.tensor(shift, dtype=torch.int64)
    values = torch.empty_strided((n,) + pieces[0].shape[1:], _layout_strides(pieces[0], n), dtype=result)
    torch.cat(pieces, out=values)
    return values, torch.tensor(shift, dtype=torch.int64)


def _keep(part: torch.Tensor, k: int, storage: torch.dtype) -> torch.Tensor:
    """A chunk kept in ``storage`` with shift ``k`` (the two ways of ``requantize_chunks``), in
    the chunk's memory layout; a float chunk is scaled in place."""
    kept_chunk = torch.empty_strided(part.shape, _layout_strides(part, part.shape[0]), dtype=storage)
    if part.is_floating_point():
        if k:
            part = part.mul_(2.0 ** -k)  # exact; the cast to the storage type truncates toward zero
        kept_chunk.copy_(part)
    elif not native.floor_shift(part, k, kept_chunk):
        sign_bit = torch.iinfo(part.dtype).bits - 1
        floored = (part >> sign_bit).add_(part)  # b: y - 1 where y < 0
        kept_chunk.copy_(floored.bitwise_right_shift_(k) if k else floored)
    return kept_chunk


def _round_kept(chunk_kept: torch.Tensor, m: int, truncated: bool, limit: int, storage_bits: int,
                result: torch.dtype) -> torch.Tensor:
    """A kept chunk rounded by ``m`` more bits to the result dtype, clipped to +-``limit`` (the
    proof is in ``requantize_chunks``), in the chunk's memory layout."""
    chunk_values = torch.empty_like(chunk_kept, dtype=result)  # a dense tensor keeps its strides
    if not truncated and native.round_kept(chunk_kept, m, limit, chunk_values):
        return chunk_values
    for sl in cpu_slices(chunk_kept):
        t = chunk_kept[sl]
        if truncated:
            rounded = shift_round(t, m, "nearest")
        elif m == 0:
            rounded = t - (t >> storage_bits)  # y = b + 1 where b < 0
        else:
            rounded = t >> (m - 1)
            rounded -= rounded >> 1
        chunk_values[sl] = rounded.clamp_(-limit, limit)
    return chunk_values


def _layout_strides(part: torch.Tensor, n: int) -> tuple[int, ...]:
    """Strides of a dense tensor of ``n`` samples shaped like ``part`` with ``part``'s memory order
    of dimensions (the samples outermost): channels-last chunks give a channels-last result."""
    inner = sorted(range(1, part.dim()), key=lambda i: -part.stride(i))
    strides, size = [0] * part.dim(), 1
    for i in reversed(inner):
        strides[i] = size
        size *= part.shape[i]
    strides[0] = size
    return tuple(strides)
