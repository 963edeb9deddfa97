"""intrain: integer-only neural network training on PyTorch."""

from intrain.qtensor import QTensor

__all__ = ["QTensor"]
__version__ = "0.1.0"
