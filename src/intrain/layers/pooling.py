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
        self._selected: torch.Tensor | None = None
        self._input_hw: tuple[int, int] | None = None

    def forward(self, x: QTensor, ctx: StepContext | None = None) -> QTensor:
        k = self.kernel_size
        n, c, h, w = x.v.shape
        ho, wo = h // k, w // k
        windows = x.v[:, :, : ho * k, : wo * k].reshape(n, c, ho, k, wo, k)
        maxima = windows.amax(dim=(3, 5))
        if self.training:
            # One-hot (int8) of the first maximum in each window, laid out like ``windows``.
            selected = torch.zeros(windows.shape, dtype=torch.int8, device=x.v.device)
            taken = torch.zeros(maxima.shape, dtype=torch.int8, device=x.v.device)
            for i in range(k):
                for j in range(k):
                    hit = (windows[:, :, :, i, :, j] == maxima).to(torch.int8) * (1 - taken)
                    selected[:, :, :, i, :, j] = hit
                    taken += hit
            self._selected = selected
            self._input_hw = (h, w)
        return QTensor(maxima, x.e)

    def backward(self, d: QTensor, ctx: StepContext | None, need_input_grad: bool = True) -> QTensor | None:
        selected, self._selected = self._selected, None
        if selected is None:
            raise RuntimeError("IntMaxPool2d.backward called without a training-mode forward")
        n, c, ho, k, wo, _ = selected.shape
        routed = (selected * d.v[:, :, :, None, :, None]).reshape(n, c, ho * k, wo * k)
        h, w = self._input_hw
        if (h, w) != (ho * k, wo * k):
            routed = torch.nn.functional.pad(routed, (0, w - wo * k, 0, h - ho * k))
        return QTensor(routed, d.e)

    def clear_saved(self) -> None:
        self._selected = None

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"
