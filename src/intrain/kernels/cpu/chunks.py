"""Requantising an int8 product delivered a chunk of samples at a time (the cpu backend's
``product_to_int8``): the same int8 values and shift as ``numeric.requant.requantize`` with
nearest rounding, without ever holding the whole accumulator. Specific to 8-bit results of int8
operands (the cpu backend's fast path); other formats go through ``numeric.requant``.
"""

from __future__ import annotations

import torch

from intrain.numeric.requant import cpu_slices
from intrain.numeric.rounding import shift_round


def requantize_chunks(n: int, chunks, reduce_max=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A product of int8 operands requantised to int8 [N, ...] with nearest rounding, as
    (values, shift), from ``chunks``: (first sample, exact values of a chunk of samples, as int32
    or a float tensor of integers below 2**31 in magnitude, any memory layout) pairs. The whole
    accumulator is never made: each chunk is kept in int16 as ``t = sign(y) * floor(|y| / 2**k)``
    with k = max(bit_length(max |chunk|) - 15, 0), and once the overall shift
    ``s = max(bit_length(max |y|) - 7, 0)`` is known, rounded by a nearest shift of t by s - k.
    That equals rounding y by s directly: floor((floor(z) + c) / m) = floor((z + c) / m) for
    integers c and m >= 1, so with z = |y| / 2**k, c = 2**(s-k-1), m = 2**(s-k),
    floor((t + c) / m) = floor((|y| + 2**(s-1)) / 2**s); c is an integer because s - k >= 1
    whenever k > 0 (s >= bit_length(max |chunk|) - 7 = k + 8).

    ``reduce_max`` (a ``Collective.max``), for a shard of a batch split over processes, turns the
    bit length of the shard's max |y| into the whole batch's (``numeric.requant``), so s is the
    whole batch's shift; it is at least the shard's own, so the argument above holds."""
    kept, dropped, largest = None, [], 0
    for n0, part in chunks:
        low, high = torch.aminmax(part)
        chunk_max = max(-int(low), int(high))
        k = max(chunk_max.bit_length() - 15, 0)
        if kept is None:
            kept = torch.empty((n,) + part.shape[1:], dtype=torch.int16)
        if k and part.is_floating_point():
            part = part.mul_(2.0 ** -k)  # exact; the cast to int16 below truncates toward zero
        elif k:
            sign = part >> 31  # -1 for negative values: |y| = (y ^ sign) - sign
            truncated = ((part ^ sign) - sign) >> k
            part = (truncated ^ sign) - sign
        kept[n0:n0 + part.shape[0]] = part
        dropped.append((n0, part.shape[0], k))
        largest = max(largest, chunk_max)
    length = largest.bit_length()
    if reduce_max is not None:
        length = int(reduce_max(torch.tensor(length, dtype=torch.int64)))
    shift = max(length - 7, 0)
    values = torch.empty(kept.shape, dtype=torch.int8)
    for n0, rows, k in dropped:
        chunk_kept, chunk_values = kept[n0:n0 + rows], values[n0:n0 + rows]
        for sl in cpu_slices(chunk_kept):
            chunk_values[sl] = shift_round(chunk_kept[sl].to(torch.int32), shift - k,
                                           "nearest").clamp_(-127, 127)
    return values, torch.tensor(shift, dtype=torch.int64)
