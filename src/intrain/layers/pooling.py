"""Integer max pooling with non-overlapping square windows (kernel == stride, as in NITI's VGG).

Forward takes the integer maximum of each window; rows and columns that do not fill a window are
dropped, as ``torch.nn.MaxPool2d`` does. Ties go to the first position in row-major window order on
every backend, so the error routing in backward is the same everywhere. Backward places the error
at that arg-max and zero elsewhere. Values, dtypes and exponents pass through unchanged.
"""

from __future__ import annotations

import torch

from intrain.layers.base import IntModule, StepContext
from intrain.qtensor import QTensor


class IntMaxPool2d(IntModule):
    def __init__(self, kernel_size: int = 2) -> None:
        super().__init__()
        self.kernel_size = int(kernel_size)
        self._argmax: torch.Tensor | None = None
        self._input_hw: tuple[int, int] | None = None

    def _windows(self, v: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size
        n, c, h, w = v.shape
        ho, wo = h // k, w // k
        v = v[:, :, : ho * k, : wo * k].reshape(n, c, ho, k, wo, k)
        return v.permute(0, 1, 2, 4, 3, 5).reshape(n, c, ho, wo, k * k)

    def forward(self, x: QTensor, ctx: StepContext | None = None) -> QTensor:
        windows = self._windows(x.v)
        maxima = windows.amax(dim=-1)
        if self.training:
            window_size = windows.shape[-1]
            # Score the positions holding the maximum by how early they come, so the first wins.
            earliness = torch.arange(window_size, 0, -1, dtype=torch.int64, device=windows.device)
            is_max = windows == maxima.unsqueeze(-1)
            self._argmax = torch.where(is_max, earliness, torch.zeros_like(earliness)).argmax(dim=-1)
            self._input_hw = (x.v.shape[-2], x.v.shape[-1])
        return QTensor(maxima, x.e)

    def backward(self, d: QTensor, ctx: StepContext | None, need_input_grad: bool = True) -> QTensor | None:
        argmax, self._argmax = self._argmax, None
        if argmax is None:
            raise RuntimeError("IntMaxPool2d.backward called without a training-mode forward")
        k = self.kernel_size
        n, c, ho, wo = d.v.shape
        positions = torch.arange(k * k, device=d.v.device)
        routed = torch.where(positions == argmax.unsqueeze(-1), d.v.unsqueeze(-1), torch.zeros_like(d.v).unsqueeze(-1))
        routed = routed.reshape(n, c, ho, wo, k, k).permute(0, 1, 2, 4, 3, 5).reshape(n, c, ho * k, wo * k)
        h, w = self._input_hw
        if (h, w) != (ho * k, wo * k):
            routed = torch.nn.functional.pad(routed, (0, w - wo * k, 0, h - ho * k))
        return QTensor(routed, d.e)

    def clear_saved(self) -> None:
        self._argmax = None

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"
