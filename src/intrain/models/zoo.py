"""The model zoo: each model is a tree of layer specs, built twice by ``models.build``.

Specs: ``conv (cin, cout, kernel, stride, padding)``, ``linear (fan_in, fan_out)``, ``relu``,
``maxpool (k)`` (non-overlapping k x k windows), ``flatten``, ``dropout (p)``, ``gap`` (global
average pooling to [N, C]), ``bn (channels)`` (batch normalisation: torch's BatchNorm2d in the float
twin, the integer one of ``layers.norm`` in the integer model), and ``residual (main, shortcut)``: two tuples of
specs whose outputs are added (``shortcut`` None: the identity).

Residual networks: ``resnet18``, the CIFAR layout (3x3 stride-1 stem, no max pooling) for images
smaller than 64 pixels and the ImageNet layout (7x7 stride-2 stem, then pooling) from 64 pixels
up. Pooling is always non-overlapping 2x2 (the integer max pooling's windows do not overlap):
where the reference networks use 3x3 windows with stride 2 (ResNet's stem, AlexNet), the output
sizes are the same for even inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class LayerSpec:
    kind: str
    args: tuple = ()


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


#: The MLP's hidden layer sizes unless ``hidden`` gives others.
MLP_HIDDEN = (512, 256)


def mlp_spec(in_shape, num_classes: int, width: float = 1.0,
             hidden: tuple[int, ...] | list[int] | None = None) -> list[LayerSpec]:
    """An MLP with the input size from the data and hidden layers of ``hidden`` units (default
    ``MLP_HIDDEN``: 784-512-256-10 on MNIST), each scaled by ``width``."""
    c, h, w = in_shape
    sizes = [c * h * w] + [_scaled(units, width) for units in (MLP_HIDDEN if hidden is None else hidden)]
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


def _conv_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _basic_block(cin: int, cout: int, stride: int) -> list[LayerSpec]:
    """ResNet's basic block: two 3x3 convolutions around a ReLU, added to the input (through a
    strided 1x1 convolution when the shape changes), then ReLU."""
    main = (LayerSpec("conv", (cin, cout, 3, stride, 1)), LayerSpec("bn", (cout,)), LayerSpec("relu"),
            LayerSpec("conv", (cout, cout, 3, 1, 1)), LayerSpec("bn", (cout,)))
    shortcut = None
    if stride != 1 or cin != cout:
        shortcut = (LayerSpec("conv", (cin, cout, 1, stride, 0)), LayerSpec("bn", (cout,)))
    return [LayerSpec("residual", (main, shortcut)), LayerSpec("relu")]


#: ResNet-18's stages: (channels, stride of the first block), two basic blocks each.
RESNET18_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))
#: Images at least this large (height and width) get ResNet's ImageNet layout.
IMAGENET_LAYOUT_MIN_SIZE = 64


def resnet18_spec(in_shape, num_classes: int, width: float = 1.0) -> list[LayerSpec]:
    """ResNet-18 (He et al.), batch normalisation after every convolution."""
    c, h, w = in_shape
    if h < 8 or w < 8:
        raise ValueError(f"resnet18 needs images of at least 8x8 pixels, got {h}x{w}: use --model mlp")
    stem = _scaled(64, width)
    if min(h, w) >= IMAGENET_LAYOUT_MIN_SIZE:
        specs = [LayerSpec("conv", (c, stem, 7, 2, 3)), LayerSpec("bn", (stem,)), LayerSpec("relu"),
                 LayerSpec("maxpool", (2,))]
    else:
        specs = [LayerSpec("conv", (c, stem, 3, 1, 1)), LayerSpec("bn", (stem,)), LayerSpec("relu")]
    cin = stem
    for channels, stride in RESNET18_STAGES:
        cout = _scaled(channels, width)
        specs += _basic_block(cin, cout, stride) + _basic_block(cout, cout, 1)
        cin = cout
    return specs + [LayerSpec("gap"), LayerSpec("linear", (cin, num_classes))]


#: AlexNet's classifier dropout (Krizhevsky et al.).
ALEXNET_DROPOUT = 0.5


def alexnet_spec(in_shape, num_classes: int, width: float = 1.0) -> list[LayerSpec]:
    """AlexNet as NITI trains it on ImageNet: five convolutions (11x11 stride 4, 5x5, three 3x3) with
    ReLU and 2x2 max pooling after the first, second and fifth, then three linear layers with
    dropout; no local response normalisation (NITI's integer layers have none)."""
    c, h, w = in_shape
    c1, c2, c3, c4, c5 = (_scaled(n, width) for n in (64, 192, 384, 256, 256))
    f = _scaled(4096, width)
    specs = [LayerSpec("conv", (c, c1, 11, 4, 2)), LayerSpec("relu"), LayerSpec("maxpool", (2,)),
             LayerSpec("conv", (c1, c2, 5, 1, 2)), LayerSpec("relu"), LayerSpec("maxpool", (2,)),
             LayerSpec("conv", (c2, c3, 3, 1, 1)), LayerSpec("relu"),
             LayerSpec("conv", (c3, c4, 3, 1, 1)), LayerSpec("relu"),
             LayerSpec("conv", (c4, c5, 3, 1, 1)), LayerSpec("relu"), LayerSpec("maxpool", (2,))]
    h, w = _conv_size(h, 11, 4, 2) // 8, _conv_size(w, 11, 4, 2) // 8  # after three 2x2 poolings
    if h < 1 or w < 1:
        raise ValueError(f"alexnet needs images of at least 63x63 pixels, got {in_shape[1]}x{in_shape[2]}: "
                         "use a smaller model")
    return specs + [LayerSpec("flatten"), LayerSpec("dropout", (ALEXNET_DROPOUT,)),
                    LayerSpec("linear", (c5 * h * w, f)), LayerSpec("relu"), LayerSpec("dropout", (ALEXNET_DROPOUT,)),
                    LayerSpec("linear", (f, f)), LayerSpec("relu"), LayerSpec("linear", (f, num_classes))]


_SPECS = {"mlp": mlp_spec, "lenet5": lenet5_spec,
          **{f"vgg-small-{depth}": _vgg(depth) for depth in VGG_SMALL_STAGES},
          "resnet18": resnet18_spec, "alexnet": alexnet_spec}
MODELS = tuple(_SPECS)


def check_hidden(name: str, hidden) -> None:
    """Refuse (ValueError, one line) hidden sizes that are not one or more positive integers, or
    hidden sizes for a model other than the MLP (the others' layer sizes are fixed)."""
    if hidden is None:
        return
    if name != "mlp":
        raise ValueError(f"--hidden applies to --model mlp only ({name} has fixed layer sizes; "
                         "--width scales them): leave it out")
    if (not isinstance(hidden, (list, tuple)) or not hidden
            or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden)):
        raise ValueError(f"--hidden must be one or more positive integers separated by commas, "
                         f"e.g. 100,50, got {hidden!r}")


def model_spec(name: str, in_shape, num_classes: int, width: float = 1.0,
               hidden: tuple[int, ...] | list[int] | None = None) -> list[LayerSpec]:
    """The spec tree of model ``name``; ``hidden``: the MLP's hidden sizes (None: its default)."""
    if name not in _SPECS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(_SPECS)}")
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    check_hidden(name, hidden)
    if hidden is not None:
        return mlp_spec(tuple(in_shape), num_classes, width, hidden)
    return _SPECS[name](tuple(in_shape), num_classes, width)


