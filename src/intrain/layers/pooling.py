"""Integer max pooling with non-overlapping square windows (kernel == stride, as in NITI's VGG).

Forward takes the integer maximum of each window; rows and columns that do not fill a window are
dropped, as ``torch.nn.MaxPool2d`` does. Ties go to the first position in row-major window order on
every backend, so the error routing in backward is the same everywhere; training keeps only that
position (int8, one per output value). Backward places the error at that arg-max and zero
elsewhere (and in the dropped rows and columns). Values, dtypes and exponents pass through unchanged.
On contiguous CPU tensors both directions run as one C pass each (``numeric.native``; the code
below stays the reference and the path elsewhere, ``tests/test_native.py`` compares the two).

After a ReLU (``masks_relu``, set by ``layers.sequential``) the pooling also applies the ReLU's
derivative, so that the ReLU need not keep its full-size output: the error routed to a window's
arg-max is kept where the pooled value is positive and zeroed where it is 0. Exact: the window
holds ReLU outputs (``>= 0``); a positive maximum sits where the ReLU's input was positive
(derivative 1); a zero maximum means every input of the window was ``<= 0`` (derivative 0 at
the first position, where the error goes). The pooled output it keeps for this is the tensor the
next layer (a convolution or linear layer) keeps as its input, so it costs nothing there.
"""

from __future__ import annotations

import torch

from intrain.layers.activation import through_relu
from intrain.layers.base import IntModule, StepContext
from intrain.numeric import native
from intrain.numeric.qtensor import QTensor


class IntMaxPool2d(IntModule):
    def __init__(self, kernel_size: int = 2) -> None:
        super().__init__()
        self.kernel_size = int(kernel_size)
        self._argmax: torch.Tensor | None = None
        self._input_hw: tuple[int, int] | None = None
        #: Set when the layer before is a ReLU whose mask this layer applies (module docstring).
        self.masks_relu = False
        self._output: torch.Tensor | None = None

    def _positions(self, v: torch.Tensor):
        """The k*k strided views of ``v``, one per position in the window, in row-major order."""
        k = self.kernel_size
        ho, wo = v.shape[2] // k, v.shape[3] // k
        return [v[:, :, i: ho * k: k, j: wo * k: k] for i in range(k) for j in range(k)]

    def forward(self, x: QTensor, ctx: StepContext | None = None) -> QTensor:
        pooled = native.max_pool(x.v, self.kernel_size, self.training)  # one pass in C, same bits
        if pooled is not None:
            maxima, argmax = pooled
        else:
            # Elementwise maxima of strided views: much faster than a reduction over the window axes.
            views = self._positions(x.v)
            maxima = views[0]
            for view in views[1:]:
                maxima = torch.maximum(maxima, view)
            maxima, argmax = maxima.contiguous(), None
            if self.training:
                # The window position (0 .. k*k-1, int8) of the first maximum, by the recursion
                # P_i = (v_i != max) * (1 + P_{i+1}), P_last = 0: in-place int8 arithmetic on one
                # tensor, about twice as fast as a chain of torch.where (measured, LeNet-5 sizes).
                argmax = torch.zeros(maxima.shape, dtype=torch.int8, device=x.v.device)
                for position in range(len(views) - 2, -1, -1):
                    argmax.add_(1).mul_(views[position] != maxima)
        if self.training:
            self._argmax, self._input_hw = argmax, tuple(x.v.shape[2:])
            self._output = maxima if self.masks_relu else None
        return QTensor(maxima, x.e)

    def backward(self, d: QTensor, ctx: StepContext | None, need_input_grad: bool = True) -> QTensor | None:
        argmax, self._argmax = self._argmax, None
        if argmax is None:
            raise RuntimeError("IntMaxPool2d.backward called without a training-mode forward")
        output, self._output = self._output, None
        if self.masks_relu:  # the ReLU's derivative at each arg-max: 1 where the maximum is positive
            d = through_relu(d, output)
        routed = native.max_pool_backward(d.v, argmax, self._input_hw, self.kernel_size)
        if routed is not None:
            return QTensor(routed, d.e)
        n, c = argmax.shape[:2]
        routed = torch.zeros((n, c, *self._input_hw), dtype=d.v.dtype, device=d.v.device)
        for position, view in enumerate(self._positions(routed)):
            torch.mul(d.v, argmax == position, out=view)  # written straight into the strided view
        return QTensor(routed, d.e)

    def clear_saved(self) -> None:
        self._argmax = self._output = None

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"
