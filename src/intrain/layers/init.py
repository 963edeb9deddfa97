"""Integer weight initialisation: no float involved.

Weights are uniform integers in ``[-127, 127]`` drawn from the counter-based generator keyed by
(seed, layer), and the fixed weight exponent ``e_w = -k`` is chosen so that ``127 * 2**e_w`` is
within a factor sqrt(2) of the Kaiming-uniform bound ``sqrt(6 / fan_in)`` for ReLU networks:
``k`` is the smallest integer with ``12 * 4**k >= 127**2 * fan_in``.
"""

from __future__ import annotations

import torch

from intrain.numeric import rng
from intrain.layers.base import WeightedIntModule


def kaiming_exponent(fan_in: int) -> int:
    target = 127 * 127 * fan_in
    k = 0
    while 12 * 4**k < target:
        k += 1
    return -k


def init_weight(layer: WeightedIntModule, seed: int) -> None:
    """Fill ``layer.weight`` (int8, [-127, 127]) and ``layer.weight_exp`` in place."""
    key = rng.derive_key(seed, layer.layer_id, rng.STREAM_INIT)
    draws = rng.uint32(key, layer.weight.shape, layer.weight.device)
    layer.weight.copy_((draws % 255 - 127).to(torch.int8))
    layer.weight_exp.fill_(kaiming_exponent(layer.fan_in))
