"""The kernel layer: every integer product in intrain goes through one of these backends.

A backend is a module with six pure functions (integer tensors in, integer tensors out, on the
inputs' device, no hidden state):

=============================================================  ===============================
``linear_forward(x, w)``                                        x [N,I], w [O,I] -> [N,O]
``linear_backward_input(d, w)``                                 d [N,O], w [O,I] -> [N,I]
``linear_backward_weight(d, x)``                                d [N,O], x [N,I] -> [O,I]
``conv2d_forward(x, w, stride, padding)``                       -> [N,O,Ho,Wo]
``conv2d_backward_input(d, w, input_hw, stride, padding)``      -> [N,C,H,W]
``conv2d_backward_weight(d, x, kernel_hw, stride, padding)``    -> [O,C,kh,kw]
=============================================================  ===============================

Operands are int8 (|v| <= 127) or int16 tensors. Integer ranges guaranteed by every backend:
forward and backward-input results are int32 when both operands are int8 (|sum| <= 2**14 * K <
2**31, checked statically for reduction lengths K <= 131,071) and int64 when an operand is
int16; weight gradients (reduction over the batch, times Ho*Wo) likewise: int32 for int8
operands and reductions of at most 131,071 terms, else int64 (``im2col.weight_grad_dtype``). Every
result is the exact integer sum, bit-identical across backends. stride/padding are ints or
(h, w) pairs with the semantics of ``torch.nn.functional.conv2d`` and its gradients.

Backends: ``reference`` (int64, float-free, any device, the ground truth), ``cpu`` (CPU only:
``torch._int_mm`` where the CPU has AMX-INT8 units, exact integer results through float32/float64
units otherwise) and ``cuda`` (int8 products with int32 accumulation through ``torch._int_mm``:
the int8 tensor cores on a GPU; it runs on CPU tensors too, which is how it is tested without a
GPU).

A backend may also offer ``product_to_int8(name, *args)`` for the forward and input-gradient
products: ``requantize(<name>(*args))`` with nearest rounding to int8, as (values, shift), bit for
bit, computed without the integer accumulator; ``requant.requantize_product`` uses it when present.
"""

from __future__ import annotations

from types import ModuleType

import torch

BACKENDS = ("reference", "cpu", "cuda")

FUNCTIONS = (
    "linear_forward",
    "linear_backward_input",
    "linear_backward_weight",
    "conv2d_forward",
    "conv2d_backward_input",
    "conv2d_backward_weight",
)

__all__ = ["BACKENDS", "FUNCTIONS", "get_backend"]


def get_backend(name: str, device: torch.device | str = "cpu") -> ModuleType:
    """The backend module called ``name`` (one of :data:`BACKENDS`, or ``"auto"``).

    ``"auto"`` picks ``"cuda"`` for a CUDA ``device`` and ``"cpu"`` otherwise. ``"cpu"`` refuses
    a CUDA device (its exactness argument relies on CPU float kernels: no TF32, no Winograd).
    """
    if not isinstance(name, str):
        raise ValueError(f"backend name must be a string, one of {BACKENDS + ('auto',)}")
    dev = torch.device(device)
    key = name.lower()
    if key == "auto":
        key = "cuda" if dev.type == "cuda" else "cpu"
    if key == "reference":
        from intrain.kernels import reference

        return reference
    if key == "cpu":
        if dev.type != "cpu":
            raise ValueError(f"the cpu backend runs on CPU tensors only, not on {dev}; "
                             f"use 'reference' or 'cuda'")
        from intrain.kernels import cpu

        return cpu
    if key == "cuda":
        from intrain.kernels import cuda

        return cuda
    raise ValueError(f"unknown kernel backend {name!r}; valid names: "
                     f"{', '.join(BACKENDS + ('auto',))}")
