"""The model zoo: each model is a tree of layer specs, built twice by ``models.build``.

Specs: ``conv (cin, cout, kernel, stride, padding)``, ``linear (fan_in, fan_out)``, ``relu``,
``maxpool (k)`` (non-overlapping k x k windows), ``flatten``, ``dropout (p)``, ``gap`` (global
average pooling to [N, C]), ``bn (channels)`` (batch normalisation: torch's BatchNorm2d in the float
twin, the integer one of ``layers.norm`` in the integer model), ``residual (main, shortcut)``: two
tuples of specs whose outputs are added (``shortcut`` None: the identity), and ``lstm (frame_size,
hidden, input_map, forget_bias)``: an LSTM over clips ``[N, T, ...]`` returning its last hidden
state, whose input-to-hidden map is dense (``input_map`` None) or a
``layers.tensor_ring.TensorRingShape``.

Recurrent models (``lstm``, ``tt-lstm``, ``tr-lstm``; ``RecurrentOptions``): an LSTM of
``round(128 x width)`` hidden units over the frames of a clip, then a linear classifier of the last
hidden state. The tensor models factorise the frame size (``input_factors``, default: into four
factors as equal as the primes allow, 4x4x8x8 ordered 4x8x8x4 for 32x32 frames) and the hidden
size (``hidden_factors``, default three factors, 4x8x4 for 128); the output factors are the four
gates as one factor followed by the hidden factors; ``rank`` (default 8) is every rank of the
ring, or the inner ranks of the train (end ranks 1). ``forget_bias`` (every LSTM, default 0) is
added to the forget gate's pre-activation: the float twin's initial forget-gate bias, a fixed
offset of the integer LSTM, which has no biases (``layers.recurrent``). 1, the usual choice, did
not make the float TR-LSTM learn which way a digit turns or zooms more often (validation split,
20 epochs: 95.27 / 80.38 / 84.29 % on seeds 3-5 against 76.10 / 78.36 / 96.36 % with 0) and
slowed the int8 one (74.33 against 87.51 % after 13 epochs, seed 1; BENCHMARKS.md, "TR-LSTM:
what the forget-gate bias and the run's length do").

Residual networks: ``resnet18``, the CIFAR layout (3x3 stride-1 stem, no max pooling) for images
smaller than 64 pixels and the ImageNet layout (7x7 stride-2 stem, then pooling) from 64 pixels
up. Pooling is always non-overlapping 2x2 (the integer max pooling's windows do not overlap):
where the reference networks use 3x3 windows with stride 2 (ResNet's stem, AlexNet), the output
sizes are the same for even inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from intrain.layers.tensor_ring import TensorRingShape, check_factors

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
#: classifier; we use the classic VGG classifier value 0.5 for both arithmetics. Both dropouts
#: scale the kept values by 1 / (1 - p) in training (inverted dropout; the integer one through
#: the exponent, ``intrain.layers.dropout``); eval-mode predictions see no dropout.
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


@dataclass(frozen=True)
class RecurrentOptions:
    """Options of the recurrent models (None: the default, see the module docstring)."""

    rank: int | None = None
    input_factors: str | None = None   # e.g. "4x8x8x4"
    hidden_factors: str | None = None  # e.g. "4x4x8"
    forget_bias: float | None = None   # every LSTM; None: DEFAULT_FORGET_BIAS

    @property
    def given(self) -> list[str]:
        names = {"rank": "--tr-rank", "input_factors": "--tr-input-factors", "hidden_factors": "--tr-hidden-factors"}
        return [flag for name, flag in names.items() if getattr(self, name) is not None]


DEFAULT_RANK = 8
#: The forget gate's bias (float: initial; integer: fixed offset). 1 is the usual LSTM choice (Gers
#: et al. 2000; Jozefowicz et al. 2015); it did not help here (module docstring), so 0, as before.
DEFAULT_FORGET_BIAS = 0
#: Largest |forget bias|: the integer LSTM's pre-activations are Q11 in int16 (range +-16), and an
#: offset past 8 would leave the gate saturated whatever the inputs.
FORGET_BIAS_LIMIT = 8
DEFAULT_HIDDEN = 128
GATES = 4


def balanced_factors(size: int, count: int) -> tuple[int, ...]:
    """``size`` as ``count`` factors as equal as its prime factors allow (largest primes placed
    first, each on the smallest product so far), ordered small, large..., small: 1024 ->
    (4, 8, 8, 4), 128 -> (4, 4, 8)."""
    primes, rest, p = [], size, 2
    while rest > 1:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    bins = [1] * count
    for prime in sorted(primes, reverse=True):
        bins[bins.index(min(bins))] *= prime
    bins.sort()
    return tuple(bins[0::2] + bins[1::2][::-1]) if count > 2 else tuple(bins)


def parse_factors(text: str, what: str) -> tuple[int, ...]:
    try:
        factors = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"cannot read {what} factors {text!r}: write them as 4x8x8x4") from None
    return factors


def _lstm(input_map: str | None):
    def spec(in_shape, num_classes: int, width: float = 1.0, recurrent: RecurrentOptions | None = None):
        options = recurrent or RecurrentOptions()
        name = {None: "lstm", "ring": "tr-lstm", "train": "tt-lstm"}[input_map]
        if input_map is None and options.given:
            raise ValueError(f"{options.given[0]} applies to tt-lstm and tr-lstm only: leave it out for {name}")
        if len(in_shape) < 2:
            raise ValueError(f"{name} needs clips [frames, height, width], got images of shape {in_shape}")
        frame = 1
        for size in in_shape[1:]:
            frame *= int(size)
        hidden = _scaled(DEFAULT_HIDDEN, width)
        shape = None
        if input_map is not None:
            in_factors = (balanced_factors(frame, 4) if options.input_factors is None
                          else parse_factors(options.input_factors, "input"))
            hidden_factors = (balanced_factors(hidden, 3) if options.hidden_factors is None
                              else parse_factors(options.hidden_factors, "hidden"))
            for flag, factors, size, what in (("--tr-input-factors", in_factors, frame, "input"),
                                              ("--tr-hidden-factors", hidden_factors, hidden, "hidden")):
                try:
                    check_factors(factors, size, what)
                except ValueError as err:
                    raise ValueError(f"{flag}: {err} (frames of {'x'.join(map(str, in_shape[1:]))}, "
                                     f"{hidden} hidden units)") from None
            rank = DEFAULT_RANK if options.rank is None else options.rank
            if rank < 1:
                raise ValueError(f"--tr-rank must be 1 or more, got {rank}")
            shape = TensorRingShape(in_factors, (GATES,) + hidden_factors, rank, ring=input_map == "ring")
        forget_bias = DEFAULT_FORGET_BIAS if options.forget_bias is None else options.forget_bias
        if not -FORGET_BIAS_LIMIT <= forget_bias <= FORGET_BIAS_LIMIT:
            raise ValueError(f"--lstm-forget-bias must be between -{FORGET_BIAS_LIMIT:g} and {FORGET_BIAS_LIMIT:g}, "
                             f"got {forget_bias:g}")
        return [LayerSpec("lstm", (frame, hidden, shape, forget_bias)), LayerSpec("linear", (hidden, num_classes))]

    spec.__doc__ = f"LSTM with a {input_map or 'dense'} input-to-hidden map (see the module docstring)."
    return spec


def input_to_hidden_parameters(specs: list[LayerSpec]) -> int | None:
    """Weights of the input-to-hidden map of the model's LSTM, or None without one."""
    for spec in specs:
        if spec.kind == "lstm":
            frame, hidden, shape, _ = spec.args
            return frame * GATES * hidden if shape is None else shape.parameters
    return None


RECURRENT_MODELS = ("lstm", "tt-lstm", "tr-lstm")

_SPECS = {"mlp": mlp_spec, "lenet5": lenet5_spec,
          **{f"vgg-small-{depth}": _vgg(depth) for depth in VGG_SMALL_STAGES},
          "resnet18": resnet18_spec, "alexnet": alexnet_spec,
          "lstm": _lstm(None), "tt-lstm": _lstm("train"), "tr-lstm": _lstm("ring")}
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
               hidden: tuple[int, ...] | list[int] | None = None,
               recurrent: RecurrentOptions | None = None) -> list[LayerSpec]:
    """The spec tree of model ``name``; ``hidden``: the MLP's hidden sizes (None: its default);
    ``recurrent``: the recurrent models' options."""
    if name not in _SPECS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(_SPECS)}")
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    check_hidden(name, hidden)
    if hidden is not None:
        return mlp_spec(tuple(in_shape), num_classes, width, hidden)
    if name in RECURRENT_MODELS:
        return _SPECS[name](tuple(in_shape), num_classes, width, recurrent)
    if recurrent is not None and recurrent.given:
        raise ValueError(f"{recurrent.given[0]} applies to tt-lstm and tr-lstm only: leave it out for {name}")
    if recurrent is not None and recurrent.forget_bias is not None:
        raise ValueError(f"--lstm-forget-bias applies to lstm, tt-lstm and tr-lstm only: leave it out for {name}")
    return _SPECS[name](tuple(in_shape), num_classes, width)


