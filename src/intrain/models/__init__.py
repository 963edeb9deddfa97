"""Model definitions, built twice from one layer list: the integer model and its float32 twin.

A model is a list of layer specs (``conv``, ``relu``, ``maxpool``, ``flatten``, ``linear``,
``dropout``); ``build_int_model`` turns it into integer layers (int8 weights from integer
initialisation) and ``build_float_model`` into torch.nn layers of the same shapes (with biases and
PyTorch's default initialisation: the float twin gets the standard recipe, not a handicapped one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from intrain.layers import weighted_layers
from intrain.layers.init import init_weight
from intrain.numeric.formats import NITI_INT8, NumberFormat
from intrain.kernels import get_backend
from intrain.layers import (IntConv2d, IntDropout, IntFlatten, IntLinear, IntMaxPool2d, IntReLU,
                            IntSequential)

MODELS = ("mlp", "lenet5", "vgg-small-7", "vgg-small-8", "vgg-small-9")


@dataclass(frozen=True)
class LayerSpec:
    kind: str
    args: tuple = ()


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def mlp_spec(in_shape, num_classes: int, width: float = 1.0) -> list[LayerSpec]:
    """784-512-256-10 style MLP (input size from the data)."""
    c, h, w = in_shape
    sizes = [c * h * w, _scaled(512, width), _scaled(256, width)]
    specs = [LayerSpec("flatten")]
    for fan_in, fan_out in zip(sizes, sizes[1:]):
        specs += [LayerSpec("linear", (fan_in, fan_out)), LayerSpec("relu")]
    return specs + [LayerSpec("linear", (sizes[-1], num_classes))]


def lenet5_spec(in_shape, num_classes: int, width: float = 1.0) -> list[LayerSpec]:
    """LeNet-5 with ReLU and max pooling: conv5x5(6, pad 2)-pool-conv5x5(16)-pool-120-84-classes."""
    c, h, w = in_shape
    if h < 12 or w < 12:
        raise ValueError(f"lenet5 needs images of at least 12x12 pixels, got {h}x{w}: use --model mlp")
    c1, c2 = _scaled(6, width), _scaled(16, width)
    f1, f2 = _scaled(120, width), _scaled(84, width)
    h2, w2 = (h // 2 - 4) // 2, (w // 2 - 4) // 2
    return [
        LayerSpec("conv", (c, c1, 5, 1, 2)), LayerSpec("relu"), LayerSpec("maxpool", (2,)),
        LayerSpec("conv", (c1, c2, 5, 1, 0)), LayerSpec("relu"), LayerSpec("maxpool", (2,)),
        LayerSpec("flatten"),
        LayerSpec("linear", (c2 * h2 * w2, f1)), LayerSpec("relu"),
        LayerSpec("linear", (f1, f2)), LayerSpec("relu"),
        LayerSpec("linear", (f2, num_classes)),
    ]


#: NITI's VGG-small stages (channels per conv layer, each stage followed by 2x2 max pooling), by
#: the number of weight layers (convolutions + the final linear layer). The 8-layer variant adds
#: a third 128-channel convolution to the first stage; the 9-layer one also a third 256-channel
#: convolution to the second stage.
VGG_SMALL_STAGES = {
    7: ((128, 128), (256, 256), (512, 512)),
    8: ((128, 128, 128), (256, 256), (512, 512)),
    9: ((128, 128, 128), (256, 256, 256), (512, 512)),
}

#: Dropout before the final linear layer of VGG-small. NITI drops activations before its
#: classifier; we use the classic VGG classifier value 0.5 for both arithmetics. The integer
#: dropout does not rescale the kept values (the next layer requantises by its own maximum, see
#: ``intrain.layers.dropout``), the float twin's ``torch.nn.Dropout`` does (inverted dropout);
#: either way eval-mode predictions see no dropout.
VGG_DROPOUT = 0.5


def vgg_small_spec(depth: int, in_shape, num_classes: int, width: float = 1.0) -> list[LayerSpec]:
    """NITI's VGG-small without batch norm: conv3x3(pad 1)-ReLU blocks, 2x2 max pooling after
    each stage, dropout, one linear layer. ``width`` scales every channel count; the flatten size
    comes from the actual image size (32 -> 4 for CIFAR-10, 28 -> 3 for MNIST)."""
    c, h, w = in_shape
    if h < 8 or w < 8:
        raise ValueError(f"vgg-small-{depth} needs images of at least 8x8 pixels (three 2x2 poolings), "
                         f"got {h}x{w}: use --model mlp")
    specs: list[LayerSpec] = []
    cin = c
    for stage in VGG_SMALL_STAGES[depth]:
        for channels in stage:
            cout = _scaled(channels, width)
            specs += [LayerSpec("conv", (cin, cout, 3, 1, 1)), LayerSpec("relu")]
            cin = cout
        specs.append(LayerSpec("maxpool", (2,)))
        h, w = h // 2, w // 2
    return specs + [LayerSpec("flatten"), LayerSpec("dropout", (VGG_DROPOUT,)),
                    LayerSpec("linear", (cin * h * w, num_classes))]


def _vgg(depth: int):
    def spec(in_shape, num_classes: int, width: float = 1.0) -> list[LayerSpec]:
        return vgg_small_spec(depth, in_shape, num_classes, width)

    spec.__doc__ = f"VGG-small with {depth} weight layers (see ``vgg_small_spec``)."
    return spec


_SPECS = {"mlp": mlp_spec, "lenet5": lenet5_spec,
          **{f"vgg-small-{depth}": _vgg(depth) for depth in VGG_SMALL_STAGES}}


def model_spec(name: str, in_shape, num_classes: int, width: float = 1.0) -> list[LayerSpec]:
    if name not in _SPECS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(_SPECS)}")
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    return _SPECS[name](tuple(in_shape), num_classes, width)


def _int_layer(spec: LayerSpec, backend, fmt: NumberFormat):
    if spec.kind == "conv":
        cin, cout, k, stride, pad = spec.args
        return IntConv2d(cin, cout, k, backend, stride=stride, padding=pad, fmt=fmt)
    if spec.kind == "linear":
        return IntLinear(*spec.args, backend, fmt=fmt)
    return {"relu": IntReLU, "maxpool": IntMaxPool2d, "flatten": IntFlatten, "dropout": IntDropout}[spec.kind](*spec.args)


def _float_layer(spec: LayerSpec) -> torch.nn.Module:
    if spec.kind == "conv":
        cin, cout, k, stride, pad = spec.args
        return torch.nn.Conv2d(cin, cout, k, stride=stride, padding=pad)
    return {"linear": torch.nn.Linear, "relu": torch.nn.ReLU, "maxpool": torch.nn.MaxPool2d,
            "flatten": torch.nn.Flatten, "dropout": torch.nn.Dropout}[spec.kind](*spec.args)


def build_int_model(name: str, in_shape, num_classes: int, seed: int, backend: str = "auto",
                    device: str | torch.device = "cpu", width: float = 1.0,
                    fmt: NumberFormat = NITI_INT8) -> IntSequential:
    """The integer model in number format ``fmt``, weights initialised from ``seed`` with integer
    arithmetic only (a format with ``master_bits`` gives every weighted layer a master weight)."""
    kernels = get_backend(backend, device)
    layers = (_int_layer(spec, kernels, fmt) for spec in model_spec(name, in_shape, num_classes, width))
    model = IntSequential(*layers)
    model.to(device)
    for layer in weighted_layers(model):
        init_weight(layer, seed)
    return model


def build_float_model(name: str, in_shape, num_classes: int, width: float = 1.0) -> torch.nn.Sequential:
    """The float32 twin (torch.nn, default initialisation from torch's global generator)."""
    return torch.nn.Sequential(*(_float_layer(spec) for spec in model_spec(name, in_shape, num_classes, width)))
