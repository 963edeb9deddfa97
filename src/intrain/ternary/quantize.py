"""Residual ternary decomposition of one layer's weight (offline, in float64).

A weight W [O, K] (K = fan-in; a convolution's [O, C, kh, kw] flattened) is cut into groups of N
consecutive fan-in positions per output (the last group shorter when N does not divide K; N >= K:
one group per output, the whole filter). Edge 1 ternarises W, edge k the remainder
``R_{k-1} = W - sum_{j<k} a_j T_j`` that edges 1..k-1 left:

    T_k = sign(R_{k-1}) on a support S (zero elsewhere),  a_k = mean of |R_{k-1}| over S,

which for a given support is the l2-optimal scale (the least-squares fit of a constant to |R| on
S). The support is chosen by a threshold rule, per group:

* ``optimal``: the l2-optimal support: with |r| sorted, s_1 >= ... >= s_n, keeping the top m
  leaves an error ``||r||^2 - (s_1 + ... + s_m)^2 / m``, so m maximises ``(s_1+...+s_m)^2 / m``
  (an exact search over the n candidates, not an approximation);
* ``mean``: |r| > 0.7 * mean |r| over the group (Li & Liu's ternary weight networks: the
  optimum for a Gaussian-like weight distribution, cheap and data-free).

Scales become integers: per layer and edge one exponent ``e`` (the smallest with
``max a / 2**e <= 127``) and ``alpha = round(a / 2**e)`` in [0, 127], 8 bits with the sign of the
layer-wide exponent known. The next edge ternarises what is left after the *rounded* scale, so
it also corrects the scale's rounding. An edge whose exponent falls more than
``layers.ternary.MAX_EDGE_GAP`` bits below the first edge's would add less than 2**-17 of the
weight's scale: it is left empty (alpha 0), which keeps the layer's integer sum inside int64.

The l2 error ``||W - sum_{j<=k} a_j T_j||^2`` never grows with k (an edge with the least-squares
scale on its support cannot increase it; a rounded scale is within half a unit of it, and a
scale that rounds to 0 changes nothing), and falls strictly while the remainder is non-zero and
the scale does not round to zero (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from intrain.layers.ternary import MAX_EDGE_GAP

THRESHOLD_RULES = ("optimal", "mean")
#: The ``mean`` rule's factor (Li & Liu 2016).
MEAN_RULE_FACTOR = 0.7
#: Largest integer scale: 7 magnitude bits (alpha is stored as one signed 8-bit value).
ALPHA_MAX = 127
ALPHA_BITS = 8


@dataclass(frozen=True)
class Decomposition:
    """The edges of one layer: ``ternary`` [E, O, G, N] int8, ``alpha`` [E, O, G] int16,
    ``alpha_exp`` [E] int64, ``remainder_sq`` [E + 1, O, G] float64 (the group's squared l2
    error after 0, 1, ..., E edges), ``group_len`` [G] int64 (weights per group), and the
    remainders themselves ``remainders`` [E + 1, O, G, N] float64."""

    ternary: torch.Tensor
    alpha: torch.Tensor
    alpha_exp: torch.Tensor
    remainder_sq: torch.Tensor
    group_len: torch.Tensor
    remainders: torch.Tensor


def grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W [O, ...] -> ([O, G, N] float64 with zero padding, [G, N] bool: which are real weights)."""
    w2 = w.reshape(w.shape[0], -1).to(torch.float64)
    o, k = w2.shape
    n = min(group_size, k)
    g = -(-k // n)
    padded = torch.zeros((o, g * n), dtype=torch.float64)
    padded[:, :k] = w2
    valid = torch.zeros(g * n, dtype=torch.bool)
    valid[:k] = True
    return padded.reshape(o, g, n), valid.reshape(g, n)


def _support(r: torch.Tensor, valid: torch.Tensor, rule: str) -> torch.Tensor:
    """[O, G, N] bool: where the edge's ternary value is non-zero (see the module docstring)."""
    mag = r.abs() * valid
    if rule == "mean":
        mean = mag.sum(dim=2, keepdim=True) / valid.sum(dim=1).reshape(1, -1, 1)
        return (mag > MEAN_RULE_FACTOR * mean) & valid
    if rule == "optimal":
        ordered, order = mag.sort(dim=2, descending=True)
        counts = torch.arange(1, r.shape[2] + 1, dtype=torch.float64)
        gain = ordered.cumsum(dim=2) ** 2 / counts
        keep = gain.argmax(dim=2, keepdim=True) + 1  # first maximum: the smallest best support
        ranks = torch.empty_like(order)
        ranks.scatter_(2, order, torch.arange(r.shape[2]).expand_as(order))
        return (ranks < keep) & (mag > 0)
    raise ValueError(f"unknown threshold rule {rule!r}; choose one of {', '.join(THRESHOLD_RULES)}")


def integer_scales(a: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Real scales a [O, G] >= 0 -> (alpha int16 in [0, 127], exponent e) with a ~ alpha * 2**e."""
    top = float(a.max()) if a.numel() else 0.0
    if top <= 0:
        return torch.zeros(a.shape, dtype=torch.int16), 0
    e = int(torch.ceil(torch.log2(torch.tensor(top / ALPHA_MAX, dtype=torch.float64))))
    alpha = torch.round(a / 2.0**e).clamp(0, ALPHA_MAX)
    return alpha.to(torch.int16), e


def decompose(w: torch.Tensor, group_size: int, edges: int, rule: str) -> Decomposition:
    """The first ``edges`` residual ternary edges of weight ``w`` (see the module docstring)."""
    if group_size < 1 or edges < 1:
        raise ValueError(f"need a group size and an edge count of at least 1, got {group_size}, {edges}")
    r, valid = grouped(w, group_size)
    ternaries, alphas, exps, remainders = [], [], [], [r.clone()]
    for edge in range(edges):
        support = _support(r, valid, rule)
        t = torch.where(support, torch.sign(r), torch.zeros_like(r))
        count = support.sum(dim=2)
        a = (r.abs() * support).sum(dim=2) / count.clamp(min=1)
        alpha, e = integer_scales(a)
        if edge and e < exps[0] - MAX_EDGE_GAP:
            alpha, e = torch.zeros_like(alpha), exps[0] - MAX_EDGE_GAP
        t = torch.where(alpha[:, :, None] > 0, t, torch.zeros_like(t))
        r = r - alpha.to(torch.float64)[:, :, None] * 2.0**e * t
        ternaries.append(t.to(torch.int8))
        alphas.append(alpha)
        exps.append(e)
        remainders.append(r.clone())
    stacked = torch.stack(remainders)
    return Decomposition(torch.stack(ternaries), torch.stack(alphas), torch.tensor(exps, dtype=torch.int64),
                         (stacked**2).sum(dim=3), valid.sum(dim=1), stacked)

