"""Integer softmax cross-entropy gradient: ``softmax(z) - onehot(y)`` in a number format (int8
for NITI), no float anywhere.

Input: logits (int8, or any integer format with ``|v| < 2**15``) ``(v, e)`` of shape ``[N, K]``. Steps, all in int64:

1. ``t = z * log2(e)`` in fixed point with ``FRACTION_BITS`` fractional bits: ``v * 47274`` (47274 =
   round(log2(e) * 2**15)) shifted right by ``15 - FRACTION_BITS - e`` (left when negative).
   ``|v * 47274| < 2**23`` for int8 logits (``< 2**31`` for 16-bit ones); left shifts are capped
   at 32 bits, so ``|t| < 2**55`` (``< 2**63``).
2. ``u = max_row(t) - t >= 0`` (in units of 2**-FRACTION_BITS).
3. ``2**(-u)`` scaled by ``2**EXP_PRECISION``: integer part by a right shift, fractional part from a
   table of ``2**FRACTION_BITS`` integers ``round(2**(EXP_PRECISION - k / 2**FRACTION_BITS))``,
   built with integer root extraction (no float). Entries: ``[0, 2**EXP_PRECISION]``; the row
   maximum maps to exactly ``2**EXP_PRECISION``; values below one unit underflow to zero.
4. ``p = (E << PROB_BITS) // sum_row(E)``, in ``[0, 2**PROB_BITS]``; subtract the target ``q``:
   ``2**PROB_BITS`` at the target class, or with label smoothing ``u`` at every class and
   ``2**PROB_BITS - (K - 1) u`` at the target (``q`` sums to exactly ``2**PROB_BITS``): ``g`` in
   ``[-2**PROB_BITS, 2**PROB_BITS]``, exponent ``-PROB_BITS``.
5. Requantise ``g`` to the format's values with stochastic rounding keyed by (seed, step, loss stream).

Steps 1-4 are per sample. For one process's shard of a data-parallel batch (samples
``sample_offset ..``) step 5 takes the whole batch's shift (``collective.max``) and each element
the random number of its position in the whole batch, so the shard gets exactly its rows of the
one-process error.

Label smoothing ``eps`` (the float twin's ``F.cross_entropy(label_smoothing=eps)``: target ``(1 -
eps) onehot + eps / K``) becomes the integer share ``u = round(eps 2**PROB_BITS / K)`` of the exact
rational of its binary64 value (``smoothing_share``, Python integers), so the integer target's
smoothing is ``u K / 2**PROB_BITS``, within ``K / 2**(PROB_BITS + 1)`` of ``eps`` (0.1 at K = 10: u =
164, 0.1001). ``g = p - onehot 2**PROB_BITS - u + K u onehot`` stays in ``[-2**PROB_BITS,
2**PROB_BITS]`` since ``(K - 1) u <= 2**PROB_BITS`` (checked).

NITI uses the floor of ``t`` (FRACTION_BITS = 0), an offset of 10 and a scale of 2**11; the table
makes the exponential finer at no float cost, and the wider scales keep small probabilities.
"""

from __future__ import annotations

import functools

import torch

from intrain.numeric import native, rng
from intrain.numeric.collective import LOCAL, Collective
from intrain.numeric.qtensor import QTensor
from intrain.numeric.formats import NITI_INT8, NumberFormat

LOG2E_Q15 = 47274
FRACTION_BITS = 8
EXP_PRECISION = 24
PROB_BITS = 14


def _integer_root(value: int, degree: int) -> int:
    """Largest integer r with r**degree <= value (Python ints, exact)."""
    low, high = 0, 1 << (value.bit_length() // degree + 1)
    while low < high:
        mid = (low + high + 1) // 2
        if mid**degree <= value:
            low = mid
        else:
            high = mid - 1
    return low


def _exp2_fraction_table() -> list[int]:
    """round(2**(EXP_PRECISION - k / 2**FRACTION_BITS)) for k in [0, 2**FRACTION_BITS)."""
    steps = 1 << FRACTION_BITS
    # 2 * 2**(P - k/steps) = (2**((P + 1) * steps - k)) ** (1/steps); halve with round-half-up.
    return [(_integer_root(1 << ((EXP_PRECISION + 1) * steps - k), steps) + 1) >> 1 for k in range(steps)]


EXP2_FRACTION_TABLE = _exp2_fraction_table()


@functools.cache
def _exp2_table(device: torch.device) -> torch.Tensor:
    """``EXP2_FRACTION_TABLE`` as an int64 tensor on ``device``, made once (read only: indexed)."""
    return torch.tensor(EXP2_FRACTION_TABLE, dtype=torch.int64, device=device)


def softmax_scaled(logits: QTensor) -> torch.Tensor:
    """Integer softmax of each row scaled to ``2**PROB_BITS`` (int64, rows sum to about that)."""
    v = logits.v.to(torch.int64) * LOG2E_Q15
    shift = 15 - FRACTION_BITS - logits.e
    t = torch.where(shift >= 0, v >> shift.clamp(min=0), v << (-shift).clamp(min=0, max=32))
    u = t.amax(dim=1, keepdim=True) - t
    table = _exp2_table(v.device)
    whole = (u >> FRACTION_BITS).clamp(max=62)
    exp = table[u & ((1 << FRACTION_BITS) - 1)] >> whole
    return torch.div(exp << PROB_BITS, exp.sum(dim=1, keepdim=True), rounding_mode="floor")


def smoothing_share(label_smoothing: float, classes: int) -> int:
    """``u = round(label_smoothing 2**PROB_BITS / classes)`` (half up) of the exact rational of
    ``label_smoothing`` in [0, 1): each class's part of the smoothed target in units of
    ``2**-PROB_BITS``; Python integers only."""
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label smoothing must be in [0, 1), got {label_smoothing}")
    num, den = label_smoothing.as_integer_ratio()
    share = ((num << (PROB_BITS + 1)) + den * classes) // (2 * den * classes)
    if (classes - 1) * share > 1 << PROB_BITS:  # only for thousands of classes: the target would go negative
        raise ValueError(f"label smoothing {label_smoothing} over {classes} classes rounds to a target below 0 "
                         f"at {PROB_BITS} bits: use a smaller one")
    return share


def cross_entropy_grad(logits: QTensor, target: torch.Tensor, seed: int, step: int,
                       fmt: NumberFormat = NITI_INT8, *, sample_offset: int = 0,
                       collective: Collective = LOCAL, label_smoothing: float = 0) -> QTensor:
    """The error ``softmax(z) - q`` in ``fmt`` for a batch of logits, or for the shard of one
    starting at sample ``sample_offset``; ``q`` is ``onehot(y)``, smoothed by ``label_smoothing``
    (see module docstring)."""
    if logits.v.dim() != 2:
        raise ValueError(f"logits must be [batch, classes], got shape {tuple(logits.v.shape)}")
    g = None
    if logits.v.device.type == "cpu":  # one C pass per row where it applies, same integers
        g = native.softmax_gradient(logits.v, int(logits.e), target, _exp2_table(logits.v.device),
                                    LOG2E_Q15, FRACTION_BITS, PROB_BITS)
    if g is None:
        g = softmax_scaled(logits)
        rows = torch.arange(g.shape[0], device=g.device)
        g[rows, target] -= 1 << PROB_BITS
    share = smoothing_share(label_smoothing, logits.v.shape[1])
    if share:
        rows = torch.arange(g.shape[0], device=g.device)
        g -= share
        g[rows, target] += logits.v.shape[1] * share
    key = rng.derive_key(seed, step, rng.STREAM_LOSS_ROUNDING)
    exponent = torch.full((), -PROB_BITS, dtype=torch.int64, device=g.device)
    return fmt.requantize(g, exponent, mode="stochastic", key=key, offset=sample_offset * g.shape[1],
                          reduce_max=collective.max)
