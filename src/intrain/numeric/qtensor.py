"""The integer tensor with one shared power-of-two exponent.

A ``QTensor`` is a pair ``(v, e)``: ``v`` is an integer tensor (int8 for activations, errors and
weights; int32/int64 for accumulators) and ``e`` is a 0-d int64 tensor on the same device. The
real value it stands for is ``v * 2**e``. Exponents are kept as tensors, not Python ints, so that
no training step has to copy a number from an accelerator back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QTensor:
    v: torch.Tensor
    e: torch.Tensor

    def __post_init__(self) -> None:
        if self.v.is_floating_point() or self.v.is_complex():
            raise TypeError(f"QTensor values must be integers, got {self.v.dtype}")
        if self.e.dim() != 0 or self.e.dtype != torch.int64:
            raise TypeError("QTensor exponent must be a 0-d int64 tensor")

    @staticmethod
    def of(v: torch.Tensor, e: int | torch.Tensor) -> "QTensor":
        """Build from values and an exponent given as a Python int or a 0-d tensor."""
        if not isinstance(e, torch.Tensor):
            e = torch.tensor(int(e), dtype=torch.int64, device=v.device)
        return QTensor(v, e.to(device=v.device, dtype=torch.int64))

    @property
    def shape(self) -> torch.Size:
        return self.v.shape

    @property
    def device(self) -> torch.device:
        return self.v.device

    def to_float(self) -> torch.Tensor:
        """The real value as float32. For people and float baselines; never used in a step."""
        return self.v.to(torch.float64).mul(torch.pow(2.0, self.e.to(torch.float64))).to(torch.float32)

    def to(self, device: torch.device | str) -> "QTensor":
        return QTensor(self.v.to(device), self.e.to(device))
