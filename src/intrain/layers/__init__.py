"""Integer layers with explicit forward and backward on QTensors."""

from intrain.layers.activation import IntReLU
from intrain.layers.base import IntBias, IntModule, StepContext, WeightedIntModule, number_layers, weighted_layers
from intrain.layers.conv import IntConv2d
from intrain.layers.dropout import IntDropout
from intrain.layers.flatten import IntFlatten
from intrain.layers.linear import IntLinear
from intrain.layers.norm import IntBatchNorm
from intrain.layers.pooling import IntMaxPool2d
from intrain.layers.residual import IntGlobalAvgPool2d, IntResidual
from intrain.layers.sequential import IntSequential

__all__ = [
    "IntBatchNorm", "IntBias", "IntConv2d", "IntDropout", "IntFlatten", "IntGlobalAvgPool2d", "IntLinear", "IntMaxPool2d", "IntModule",
    "IntReLU", "IntResidual", "IntSequential", "StepContext", "WeightedIntModule", "number_layers", "weighted_layers",
]
