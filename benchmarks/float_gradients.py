"""How close an integer run's weight gradients are to float64's at the same weights: what the
arithmetic of one training step costs, apart from the network and the recipe.

A trained int8 or DFP16 run's weights (``model.pt`` as saved) are put into three networks of the
same architecture: the run's own (its number format, accumulator and rounding), the same with
16-bit activations and errors and exact sums (``16-bit exact``), and the float twin's network
with only the integer model's parameters (``--float-params integer``: no biases) in float64.
Each takes the same training batches (the run's training split, never its evaluation split) and
its weight gradients of the summed cross-entropy are compared with float64's, layer by layer (in
the order of ``weighted_layers``):

- ``cos``: cosine between the integer gradient and float64's;
- ``proj``: the integer gradient projected on float64's, in units of float64's (1.0: the same
  step along float's direction; below 1: a shorter one).

Both for single batches (mean over the batches) and for the gradient summed over all batches:
noise from rounding averages out of the sum, a bias does not. If both rows stay at 1.000 the
step's arithmetic matches float's, and a gap to the float twin comes from elsewhere (the twin's
biases, its initialisation, the recipe). Nothing is written.

    OMP_NUM_THREADS=1 python benchmarks/float_gradients.py --run RUN_DIR [--batches 20] [--batch-size 128]

Networks of convolutions, linear layers, ReLUs, max pooling and, with ``--no-dropout``, dropout
(LeNet-5, the MLP, VGG-small): float dropout would draw other masks than the integer one, so
``--no-dropout`` turns dropout off in every copy (the gradients of the network as evaluated, not
of the one trained); batch normalisation, residual and recurrent layers have no one-to-one float
copy here, and such runs are refused.

    OMP_NUM_THREADS=1 python benchmarks/float_gradients.py --run VGG_RUN_DIR --no-dropout
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from gradient_fidelity import (  # the benchmarks folder is the script's own
    comparison_parser, copy_holding, cos_proj, gradients, load_integer_run, print_cos_proj, training_batches)

from intrain.layers import weighted_layers
from intrain.layers.dropout import IntDropout
from intrain.methods import get_method
from intrain.models import build_float_model
from intrain.numeric.formats import DFP16
from intrain.run.evaluate import recurrent_options
from intrain.run.loop import network_input

SIXTEEN_BIT_EXACT = replace(DFP16, accumulator="exact")
#: The float modules a network may have to be copied one to one.
COPYABLE = (torch.nn.Sequential, torch.nn.Conv2d, torch.nn.Linear, torch.nn.ReLU, torch.nn.MaxPool2d,
            torch.nn.Flatten)
#: The float modules ``--no-dropout`` also accepts (turned off in every copy).
DROPOUT = (torch.nn.Dropout,)


def float64_copy(run, weights, no_dropout: bool = False) -> tuple[torch.nn.Module, list[torch.nn.Module]] | None:
    """The run's architecture in float64 without biases holding ``weights`` (``(values, exponent)``
    per weighted layer), and its weighted modules in order (dropout off where ``no_dropout``);
    None where it has other layers."""
    cfg = run.config
    try:
        model = build_float_model(cfg["model"], tuple(cfg["image_shape"]), int(cfg["num_classes"]),
                                  width=float(cfg.get("width") or 1.0), hidden=cfg.get("hidden"),
                                  recurrent=recurrent_options(cfg), biases=False)
    except ValueError:  # an LSTM's float twin cannot drop its gate biases
        return None
    copyable = COPYABLE + DROPOUT if no_dropout else COPYABLE
    if not all(isinstance(m, copyable) for m in model.modules()):
        return None
    weighted = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    if len(weighted) != len(weights) or any(m.weight.shape != v.shape for m, (v, _) in zip(weighted, weights)):
        return None
    model = model.double().train()
    for module in model.modules():
        if isinstance(module, DROPOUT):
            module.eval()  # passes its input through; the rest stays in training mode
    with torch.no_grad():
        for module, (values, exponent) in zip(weighted, weights):
            module.weight.copy_(values.double() * 2.0 ** int(exponent))  # exact: a power of two
    return model.to(run.device), weighted


def main() -> None:
    parser = comparison_parser(__doc__, batches=20, batch_size=128)
    parser.add_argument("--no-dropout", action="store_true", help="turn dropout off in every copy (VGG-small)")
    args = parser.parse_args()
    run = load_integer_run(parser, args)
    weights = [(layer.weight.clone(), layer.weight_exp.clone()) for layer in weighted_layers(run.model)]
    copied = float64_copy(run, weights, args.no_dropout)
    if copied is None:
        if not args.no_dropout and float64_copy(run, weights, no_dropout=True) is not None:
            parser.error(f"{args.run}: {run.config['model']} has dropout, whose float masks would differ from the "
                         "integer ones: add --no-dropout to turn it off in every copy")
        parser.error(f"{args.run}: {run.config['model']} has layers other than convolutions, linear layers, "
                     "ReLUs, max pooling and dropout; give a LeNet-5, MLP or VGG-small run")
    reference, float_layers = copied
    own = weighted_layers(run.model)[0].fmt
    variants = {f"the run's ({own.bits}-bit)": own, "16-bit exact": SIXTEEN_BIT_EXACT}
    models = {name: copy_holding(run, fmt, weights).train() for name, fmt in variants.items()}
    if args.no_dropout:
        for model in models.values():
            for module in model.modules():
                if isinstance(module, IntDropout):
                    module.eval()  # passes its input through, as the float copies' dropout does
    method = get_method(run.config["arith"])
    single = {name: [] for name in variants}
    summed = {}
    for b, images, labels in training_batches(run, args):
        x = network_input(method, images, run.mean).to_float().double()
        reference.zero_grad(set_to_none=True)
        F.cross_entropy(reference(x), labels, reduction="sum").backward()
        grads = {"float64": [m.weight.grad.detach().clone() for m in float_layers]}
        grads.update({name: gradients(model, variants[name], images, labels, run, step=b)
                      for name, model in models.items()})
        for name, g in grads.items():
            summed[name] = g if name not in summed else [s + t for s, t in zip(summed[name], g)]
        for name in variants:
            single[name].append([cos_proj(g, r) for g, r in zip(grads[name], grads["float64"])])
    print(f"{args.run}: {args.batches} batches of {args.batch_size} training images; cos / proj against float64")
    print_cos_proj(variants, single, summed, "float64", len(float_layers), (5, 4))


if __name__ == "__main__":
    main()
