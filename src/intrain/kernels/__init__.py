"""The kernel layer: every integer product in intrain goes through one of these backends.

A backend is an object (:class:`~intrain.kernels.base.Backend`) with six products, methods that
are pure functions of their arguments (integer tensors in, integer tensors out, on the inputs'
device, no hidden state); each defaults to the reference one, so a backend overrides only what it
speeds up:

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

Backends: ``reference`` (:class:`ReferenceBackend`: int64, float-free, any device, the ground
truth), ``cpu`` (:class:`CpuBackend`, CPU only: ``torch._int_mm`` where the CPU has AMX-INT8
units, exact integer results through float32/float64 units otherwise; its tuned constants are one
frozen :class:`CpuSettings`) and ``cuda`` (:class:`CudaBackend`: int8 products with int32
accumulation through ``torch._int_mm``: the int8 tensor cores on a GPU; it runs on CPU tensors
too, which is how it is tested without a GPU; :class:`CudaSettings`).

A backend may also offer ``product_to_int8(name, *args)`` for the forward and input-gradient
products: ``requantize(<name>(*args))`` with nearest rounding to int8 (of its positive part with
``rectify=True``), as (values, shift), bit for bit, computed without the integer accumulator;
``requant.requantize_product`` uses it when present.
"""

from __future__ import annotations

import torch

from intrain.kernels.base import PRODUCTS, Backend, ReferenceBackend
from intrain.kernels.cpu import CpuBackend, CpuSettings
from intrain.kernels.cuda import CudaBackend, CudaSettings

BACKENDS = ("reference", "cpu", "cuda")

_CLASSES = {"reference": ReferenceBackend, "cpu": CpuBackend, "cuda": CudaBackend}

__all__ = ["BACKENDS", "PRODUCTS", "Backend", "CpuBackend", "CpuSettings", "CudaBackend",
           "CudaSettings", "ReferenceBackend", "get_backend"]


def get_backend(name: str | Backend, device: torch.device | str = "cpu",
                settings: CpuSettings | CudaSettings | None = None) -> Backend:
    """A new backend called ``name`` (one of :data:`BACKENDS`, or ``"auto"``), with ``settings``
    (:class:`CpuSettings` for ``cpu``, :class:`CudaSettings` for ``cuda``; None: the defaults).

    ``"auto"`` picks ``"cuda"`` for a CUDA ``device`` and ``"cpu"`` otherwise. ``"cpu"`` refuses
    a CUDA device (its exactness argument relies on CPU float kernels: no TF32, no Winograd).
    A :class:`Backend` given as ``name`` is returned as it is, once it accepts ``device``.
    """
    if isinstance(name, Backend):
        if settings is not None:
            raise ValueError("settings go with a backend name; this backend has its own")
        name.check_device(torch.device(device))
        return name
    if not isinstance(name, str):
        raise ValueError(f"backend name must be a string, one of {BACKENDS + ('auto',)}")
    dev = torch.device(device)
    key = name.lower()
    if key == "auto":
        key = "cuda" if dev.type == "cuda" else "cpu"
    if key not in _CLASSES:
        raise ValueError(f"unknown kernel backend {name!r}; valid names: "
                         f"{', '.join(BACKENDS + ('auto',))}")
    if settings is None:
        backend = _CLASSES[key]()
    elif key == "reference":
        raise ValueError("the reference backend takes no settings")
    else:
        backend = _CLASSES[key](settings)  # which checks that they are its kind
    backend.check_device(dev)
    return backend
