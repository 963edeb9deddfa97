"""Integer weight initialisation: no float involved.

Weights are uniform integers in ``[-L, L]`` (``L`` the layer's format limit, 127 for 8 bits)
drawn from the counter-based generator keyed by (seed, layer), and the fixed weight exponent
``e_w = -k`` is chosen so that ``L * 2**e_w`` is within a factor sqrt(2) of the Kaiming-uniform
bound ``sqrt(6 / fan_in)`` for ReLU networks: ``k`` is the smallest integer with
``12 * 4**k >= L**2 * fan_in``. A layer with a master weight starts it from the weight, exactly.
"""

from __future__ import annotations


from intrain.numeric import rng
from intrain.layers.base import WeightedIntModule


def kaiming_exponent(fan_in: int, limit: int) -> int:
    target = limit * limit * fan_in
    k = 0
    while 12 * 4**k < target:
        k += 1
    return -k


def init_weight(layer: WeightedIntModule, seed: int) -> None:
    """Fill ``layer.weight`` ([-L, L]), ``layer.weight_exp`` and any master weight in place."""
    limit = layer.fmt.limit
    key = rng.derive_key(seed, layer.layer_id, rng.STREAM_INIT)
    draws = rng.uint32(key, layer.weight.shape, layer.weight.device)
    layer.weight.copy_((draws % (2 * limit + 1) - limit).to(layer.fmt.dtype))
    layer.weight_exp.fill_(kaiming_exponent(layer.fan_in, limit))
    if layer.has_master_weight:
        layer.start_master_from_weight()
