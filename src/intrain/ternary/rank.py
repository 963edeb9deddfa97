"""Which residual edges to add: gains per added bit, and a model-wide ranking (offline, float).

Candidates are the residual group-edges: edge k >= 2 of group g of output o of a layer (every
group's first edge is always on: the plain 8-2 model). A candidate costs ``2 * n_g + 8`` bits
(two bits per ternary weight of its group, ``n_g`` of them, and its 8-bit scale). Its gain is how
much it lowers an error, by one of three rankings:

* ``perturbation``: the output error on a calibration batch of training images, by first-order
  perturbation theory. A change ``dW`` of output unit o's weights changes that unit's
  pre-activation ``y_o`` at every sample and position m by ``dW_og . x_mg`` summed over its groups,
  and the logits z by ``J_mo * dy_mo`` (``J_mo = dz/dy_mo``, from the network at the source
  weights). Treating the quantisation errors of different groups and units as uncorrelated (their
  cross terms average out: the standard additive-noise model of quantisation), the expected
  squared output error is ``E = sum_{m,o,g} |J_mo|^2 (R_og . x_mg)^2`` for remainders R. An edge
  that turns group (o, g)'s remainder from R_{k-1} into R_k gains
  ``sum_m |J_mo|^2 ((R_{k-1} . x_mg)^2 - (R_k . x_mg)^2)``; ``|J_mo|^2`` sums the squared
  gradients of all logits (one backward pass per class).
* ``l2``: data-free: the fall of the group's squared l2 weight error, ``|R_{k-1}|^2 - |R_k|^2``,
  divided by the layer's mean squared weight (each layer's output is requantised by its own
  maximum, so a layer's weight error matters relative to its weights' scale, not in absolute
  terms).
* ``random``: uniform random gains (the baseline the tests compare against).

Ranking: score = gain / bits. A group's edge k can only be on when its edge k-1 is, so scores are
made non-increasing along a group's edges (``s'_k = min(s'_{k-1}, s_k)``) and all candidates are
sorted by s' (descending; ties keep edge order): every prefix of the order then respects the
edges' order, and the model with budget m is the first m of the order, whatever the larger
budget converted. The data are never the evaluation split: calibration images are training
images.
"""

from __future__ import annotations

import torch

from intrain.ternary.quantize import ALPHA_BITS, Decomposition

RANKINGS = ("perturbation", "l2", "random")
#: Rows of the perturbation's projection [rows, O, G] computed at a time (memory bound).
_PROJECTION_ELEMS = 2**23


def candidate_bits(d: Decomposition) -> torch.Tensor:
    """[O, G] float64: the bits one more edge of each group costs."""
    o = d.alpha.shape[1]
    return (2 * d.group_len + ALPHA_BITS).to(torch.float64).expand(o, -1)


def l2_gains(d: Decomposition) -> torch.Tensor:
    """[E - 1, O, G]: the data-free gains of edges 2..E (see the module docstring)."""
    weights = d.group_len.sum() * d.alpha.shape[1]
    scale = d.remainder_sq[0].sum() / weights
    gains = d.remainder_sq[1:-1] - d.remainder_sq[2:]
    return gains / scale if scale > 0 else gains


def output_error(d: Decomposition, patches: torch.Tensor, sensitivity: torch.Tensor) -> torch.Tensor:
    """[E + 1, O, G]: ``sum_m |J_mo|^2 (R_e,og . x_mg)^2`` for the remainders after 0..E edges.

    ``patches`` [M, K] are the layer's inputs (a convolution's im2col rows), ``sensitivity``
    [M, O] the summed squared logit gradients of the layer's outputs at the same rows."""
    e1, o, g, n = d.remainders.shape
    x = torch.zeros((patches.shape[0], g * n), dtype=torch.float64)
    x[:, :patches.shape[1]] = patches
    x = x.reshape(-1, g, n)
    h = sensitivity.to(torch.float64)
    out = torch.zeros((e1, o, g), dtype=torch.float64)
    step = max(1, _PROJECTION_ELEMS // max(1, o * g))
    for r0 in range(0, x.shape[0], step):
        xs, hs = x[r0:r0 + step], h[r0:r0 + step]
        for e in range(e1):
            proj = torch.einsum("mgn,ogn->mog", xs, d.remainders[e])
            out[e] += torch.einsum("mo,mog->og", hs, proj * proj)
    return out


def perturbation_gains(d: Decomposition, patches: torch.Tensor, sensitivity: torch.Tensor) -> torch.Tensor:
    """[E - 1, O, G]: the perturbation gains of edges 2..E."""
    err = output_error(d, patches, sensitivity)
    return err[1:-1] - err[2:]


def random_gains(d: Decomposition, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(d.alpha[1:].shape, generator=generator, dtype=torch.float64)


def rank_edges(decompositions: list[Decomposition], gains: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer [E - 1, O, G] int64: each residual candidate's place in the model-wide order
    (0 first); see the module docstring."""
    scores = []
    for d, g in zip(decompositions, gains):
        s = g / candidate_bits(d)
        s = torch.cummin(s, dim=0).values
        scores.append(s.reshape(-1))
    flat = torch.cat(scores)
    order = torch.sort(-flat, stable=True).indices
    places = torch.empty_like(order)
    places[order] = torch.arange(order.numel())
    out, start = [], 0
    for s, d in zip(scores, decompositions):
        out.append(places[start:start + s.numel()].reshape(d.alpha[1:].shape))
        start += s.numel()
    return out
