"""intrain: integer-only neural network training on PyTorch."""

from intrain.numeric.qtensor import QTensor

__all__ = ["QTensor"]
__version__ = "0.1.0"
