"""Building a model spec twice: the integer model and its float32 twin.

``build_int_model`` turns a spec tree (``models.zoo``) into integer layers in a number format
(weights from integer initialisation; ``bn`` becomes the integer batch normalisation of
``layers.norm``), ``build_float_model`` into torch.nn layers of the same
shapes (with biases, batch normalisation where the spec has ``bn``, and PyTorch's default
initialisation: the float twin gets the standard recipe, not a handicapped one). With
``biases=False`` the float twin has only the parameters the integer model has: no biases in its
convolutions and linear layers, batch normalisation without its scale and shift (the integer
models have neither, ``layers.conv``, ``layers.norm``), which separates what the arithmetic costs
from what these parameters add.
"""

from __future__ import annotations

import torch

from intrain.kernels import get_backend
from intrain.layers import (IntBatchNorm, IntBias, IntConv2d, IntDropout, IntFlatten, IntGlobalAvgPool2d, IntLinear,
                            IntMaxPool2d, IntReLU, IntResidual, IntSequential, weighted_layers)
from intrain.layers.init import init_weight
from intrain.layers.recurrent import FloatLSTM, IntLSTM
from intrain.layers.tensor_ring import FloatTensorRing, IntTensorRing
from intrain.models.zoo import RecurrentOptions, model_spec
from intrain.numeric.formats import NITI_INT8, NumberFormat


def _int_layers(specs, backend, fmt: NumberFormat, biases: bool = False) -> list:
    layers = []
    for spec in specs:
        if spec.kind == "conv":
            cin, cout, k, stride, pad = spec.args
            layers.append(IntConv2d(cin, cout, k, backend, stride=stride, padding=pad, fmt=fmt, bias=biases))
        elif spec.kind == "linear":
            layers.append(IntLinear(*spec.args, backend, fmt=fmt, bias=biases))
        elif spec.kind == "residual":
            main, shortcut = spec.args
            layers.append(IntResidual(IntSequential(*_int_layers(main, backend, fmt)),
                                      None if shortcut is None else IntSequential(*_int_layers(shortcut, backend, fmt)),
                                      fmt=fmt))
        elif spec.kind == "gap":
            layers.append(IntGlobalAvgPool2d(fmt))
        elif spec.kind == "lstm":
            frame, hidden, shape, forget_bias = spec.args
            input_map = (IntLinear(frame, 4 * hidden, backend, fmt=fmt) if shape is None
                         else IntTensorRing(shape, backend, fmt=fmt))
            layers.append(IntLSTM(input_map, hidden, backend, fmt=fmt, forget_bias=forget_bias))
        elif spec.kind == "bn":
            layers.append(IntBatchNorm(*spec.args, fmt=fmt))
        else:
            layers.append({"relu": IntReLU, "maxpool": IntMaxPool2d, "flatten": IntFlatten,
                           "dropout": IntDropout}[spec.kind](*spec.args))
    return layers


class FloatResidual(torch.nn.Module):
    """``main(x) + shortcut(x)`` (the identity when ``shortcut`` is None)."""

    def __init__(self, main: torch.nn.Module, shortcut: torch.nn.Module | None) -> None:
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + (x if self.shortcut is None else self.shortcut(x))


#: Why an LSTM's float twin cannot drop its biases (``build_float_model``, ``--float-params``).
LSTM_KEEPS_BIASES = ("an LSTM's float twin keeps its gate biases (the integer LSTM has a fixed forget-gate "
                     "offset in their place)")


def _float_layers(specs, biases: bool) -> list[torch.nn.Module]:
    layers = []
    for spec in specs:
        if spec.kind == "conv":
            cin, cout, k, stride, pad = spec.args
            layers.append(torch.nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=biases))
        elif spec.kind == "linear":
            layers.append(torch.nn.Linear(*spec.args, bias=biases))
        elif spec.kind == "bn":
            layers.append(torch.nn.BatchNorm2d(*spec.args, affine=biases))
        elif spec.kind == "residual":
            main, shortcut = spec.args
            layers.append(FloatResidual(torch.nn.Sequential(*_float_layers(main, biases)),
                                        None if shortcut is None
                                        else torch.nn.Sequential(*_float_layers(shortcut, biases))))
        elif spec.kind == "gap":
            layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()]
        elif spec.kind == "lstm":
            if not biases:
                raise ValueError(LSTM_KEEPS_BIASES)
            frame, hidden, shape, forget_bias = spec.args
            input_map = torch.nn.Linear(frame, 4 * hidden, bias=False) if shape is None else FloatTensorRing(shape)
            layers.append(FloatLSTM(input_map, hidden, forget_bias=forget_bias))
        else:
            layers.append({"relu": torch.nn.ReLU, "maxpool": torch.nn.MaxPool2d, "flatten": torch.nn.Flatten,
                           "dropout": torch.nn.Dropout}[spec.kind](*spec.args))
    return layers


def biases_refused(name: str, specs) -> str | None:
    """Why the integer model ``name`` (its spec tree ``specs``) cannot take ``biases``, or None."""
    kinds = set()
    pending = list(specs)
    while pending:
        spec = pending.pop()
        kinds.add(spec.kind)
        if spec.kind == "residual":
            pending += [inner for part in spec.args if part is not None for inner in part]
    if "lstm" in kinds:
        return f"{name} is recurrent: its integer LSTM has a fixed forget-gate offset in place of gate biases"
    if "bn" in kinds:
        return (f"{name} has batch normalisation, which takes every channel's mean out of the layer before it: "
                f"a bias there would learn nothing")
    return None


def build_int_model(name: str, in_shape, num_classes: int, seed: int, backend: str = "auto",
                    device: str | torch.device = "cpu", width: float = 1.0,
                    fmt: NumberFormat = NITI_INT8, hidden: list[int] | None = None,
                    recurrent: RecurrentOptions | None = None, biases: bool = False) -> IntSequential:
    """The integer model in number format ``fmt``, weights initialised from ``seed`` with integer
    arithmetic only (a format with ``master_bits`` gives every weighted layer a master weight).
    ``biases``: every convolution and linear layer gets a bias, zero at the start, where the float
    twin has one (``biases_refused``: not for models with batch normalisation or LSTMs); the
    weights and every random number are those of the model without biases."""
    kernels = get_backend(backend, device)
    specs = model_spec(name, in_shape, num_classes, width, hidden, recurrent)
    if biases and biases_refused(name, specs):
        raise ValueError(biases_refused(name, specs))
    model = IntSequential(*_int_layers(specs, kernels, fmt, biases))
    model.to(device)
    for layer in weighted_layers(model):
        if not isinstance(layer, IntBias):  # biases start at zero
            init_weight(layer, seed)
    return model


def build_float_model(name: str, in_shape, num_classes: int, width: float = 1.0,
                      hidden: list[int] | None = None,
                      recurrent: RecurrentOptions | None = None, biases: bool = True) -> torch.nn.Sequential:
    """The float32 twin (torch.nn, default initialisation from torch's global generator); without
    ``biases``, only the integer model's parameters (module docstring)."""
    return torch.nn.Sequential(*_float_layers(model_spec(name, in_shape, num_classes, width, hidden, recurrent),
                                              biases))
