"""How close int8 weight gradients are to those of a 16-bit network holding the same weights: the
evidence for the error rounding of a recipe (``run.recipes``) where it is chosen this way.

A trained run's weights (``model.pt``, int8 or DFP16) are rounded to int8 (nearest, one exponent
per tensor) and put into five models of the same architecture: the reference, DFP16 values with
exact sums (16-bit activations and errors, no headroom shifts), and four variants: int8 with
nearest error rounding, int8 with stochastic error rounding, the same with the layers before a
ReLU scaled from their positive side (``relu_scale="positive"``, "ReLU +"), and DFP16 with its
int32-chunked accumulator. Each takes the same training batches (the run's training split, never
its evaluation split) with the same random keys (dropout masks, loss rounding), and its weight gradients are
compared with the reference's, layer by layer (in the order of ``weighted_layers``):

- ``cos``: cosine between a variant's gradient and the reference's;
- ``proj``: the variant's gradient projected on the reference's, in units of the reference's
  (1.0: the reference's step along its own direction; below 1: a shorter step).

Both are printed for single batches (mean over the batches) and for the gradient summed over all
batches: noise from rounding averages out of the sum, a bias does not. The last column is the
cosine between the reference gradients of consecutive batches (how much one batch's gradient
varies anyway). Last, for each ReLU in order and for the int8 variants with nearest rounding and
with the positive scale: the fraction of the units the reference passes
(positive) that are zero in int8 (they rounded to zero at the 8-bit scale, so no error flows back
through them and they add nothing to the next weight gradient), and the largest int8 value there
(of 127: a ReLU whose input's scale came from a larger negative side uses less). Nothing is
written.

    OMP_NUM_THREADS=2 python benchmarks/gradient_fidelity.py --run RUN_DIR [--batches 24]
    OMP_NUM_THREADS=2 python benchmarks/gradient_fidelity.py --run RUN_DIR --checkpoint

``--checkpoint`` takes the weights of the run's ``checkpoint.pt`` (the last finished epoch of a run
still going or stopped) instead of its ``model.pt``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from tqdm import tqdm

from intrain.layers import IntReLU, StepContext, weighted_layers
from intrain.methods.loss import cross_entropy_grad
from intrain.models import build_int_model
from intrain.numeric.formats import DFP16, NITI_INT8
from intrain.numeric.qtensor import QTensor
from intrain.numeric.requant import requantize
from intrain.run import checkpoint, evaluate
from intrain.run.evaluate import load_run, recurrent_options
from intrain.run.loop import network_input
from intrain.methods import get_method

REFERENCE = "16-bit exact"
VARIANTS = {
    REFERENCE: replace(DFP16, accumulator="exact"),
    "int8 nearest": NITI_INT8,
    "int8 stochastic": replace(NITI_INT8, error_rounding="stochastic"),
    "int8 stoch., ReLU +": replace(NITI_INT8, error_rounding="stochastic", relu_scale="positive"),
    "DFP16 int32-chunked": DFP16,
}
#: The int8 variants whose ReLU outputs are compared with the reference's (see the module docstring).
RELU_COMPARED = ("int8 nearest", "int8 stoch., ReLU +")


def copy_holding(run, fmt, weights) -> torch.nn.Module:
    """The run's architecture in ``fmt`` holding ``weights``: one ``(values, exponent)`` pair per
    weighted layer, in ``weighted_layers`` order (also ``forward_precision.py``'s)."""
    cfg = run.config
    model = build_int_model(cfg["model"], tuple(cfg["image_shape"]), int(cfg["num_classes"]), 0, fmt=fmt,
                            width=float(cfg.get("width") or 1.0), device=run.device, hidden=cfg.get("hidden"),
                            recurrent=recurrent_options(cfg))
    for layer, (values, exponent) in zip(weighted_layers(model), weights, strict=True):
        layer.weight.copy_(values.to(layer.weight.dtype))
        layer.weight_exp.fill_(int(exponent))
    return model


def int8_copy(run, fmt):
    """The run's architecture in ``fmt`` holding the run's weights rounded to int8."""
    rounded = (requantize(src.weight.to(torch.int32), src.weight_exp, 8) for src in weighted_layers(run.model))
    return copy_holding(run, fmt, [(q.v, q.e) for q in rounded]).train()


def gradients(model, fmt, images, labels, run, step: int) -> list[torch.Tensor]:
    """float64 weight gradients of the summed loss for one batch."""
    method = get_method("dfp16" if fmt.bits == 16 else "int8")
    x = network_input(method, images, run.mean)
    ctx = StepContext(seed=0, step=step)
    logits = model(x, ctx)
    model.backward(cross_entropy_grad(logits, labels, 0, step, fmt), ctx)
    return [layer.weight_grad.double() * 2.0 ** int(layer.weight_grad_exp) for layer in weighted_layers(model)]


def cos_proj(g: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    dot = float((g * ref).sum())
    return dot / max(float(g.norm() * ref.norm()), 1e-300), dot / max(float((ref * ref).sum()), 1e-300)


def comparison_parser(doc: str, batches: int, batch_size: int) -> argparse.ArgumentParser:
    """The options every gradient comparison takes (this script's and ``float_gradients.py``'s)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory with model.pt (int8 or DFP16)")
    parser.add_argument("--batches", type=int, default=batches, help=f"training batches to compare on ({batches})")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"images per batch ({batch_size})")
    parser.add_argument("--seed", type=int, default=5, help="which training images are drawn (5)")
    return parser


def load_integer_run(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The run of ``args.run`` after checking the batch options; a float run is refused."""
    if args.batches < 2 or args.batch_size < 1:
        parser.error("--batches must be 2 or more and --batch-size 1 or more")
    run = load_run(args.run)
    if not getattr(run.method, "integer", False):
        parser.error(f"{args.run} is a float run; give an int8 or DFP16 run")
    if run.config.get("biases") == "on":
        parser.error(f"{args.run} was trained with --biases on, which this comparison does not pair yet; give a run "
                     "without biases")
    return run


def training_batches(run, args: argparse.Namespace):
    """``(index, images, labels)`` of ``args.batches`` batches drawn from the run's training split
    (never its evaluation split), the same for the same ``args.seed``, with a progress bar."""
    train = run.splits.train
    draw = torch.Generator().manual_seed(args.seed)
    for b in tqdm(range(args.batches), desc="batches", unit="batch"):
        rows = torch.randint(0, len(train), (args.batch_size,), generator=draw)
        yield b, train.images[rows].to(run.device), train.labels[rows].to(run.device)


def print_cos_proj(names, single: dict, summed: dict, reference: str, layers: int, digits: tuple[int, int],
                   between: list | None = None) -> None:
    """The two tables: per layer, each name's mean ``cos_proj`` over single batches (``single``:
    one list of per-layer pairs per batch) and that of its gradient summed over the batches
    (``summed``) against ``reference``'s; ``between``: a last column of the single table."""
    cos_digits, proj_digits = digits
    for title, table in (("single batches (mean)", None), ("gradient summed over the batches", summed)):
        print(f"\n{title}")
        print("layer" + "".join(f"{name:>24}" for name in names)
              + ("   cos(batch, next batch)" if table is None and between is not None else ""))
        for i in range(layers):
            cells = []
            for name in names:
                if table is None:
                    cos = sum(r[i][0] for r in single[name]) / len(single[name])
                    proj = sum(r[i][1] for r in single[name]) / len(single[name])
                else:
                    cos, proj = cos_proj(table[name][i], table[reference][i])
                cells.append(f"{cos:.{cos_digits}f} / {proj:.{proj_digits}f}")
            tail = f"   {sum(r[i] for r in between) / len(between):.3f}" if table is None and between is not None else ""
            print(f"{i:5d}" + "".join(f"{c:>24}" for c in cells) + tail)


def main() -> None:
    parser = comparison_parser(__doc__, batches=24, batch_size=64)
    parser.add_argument("--checkpoint", action="store_true", help="the weights of checkpoint.pt, not model.pt")
    args = parser.parse_args()
    if args.checkpoint:  # load_run reads the checkpoint's payload, which has the same two fields it uses
        evaluate.read_model = lambda run_dir: checkpoint.load(checkpoint.checkpoint_path(run_dir))
    run = load_integer_run(parser, args)
    models = {name: int8_copy(run, fmt) for name, fmt in VARIANTS.items()}
    relu_outputs = {name: [] for name in (REFERENCE, *RELU_COMPARED)}
    for name, outputs in relu_outputs.items():
        for module in models[name].modules():
            if isinstance(module, IntReLU):
                module.register_forward_hook(lambda module, args, out, outputs=outputs: outputs.append(out.v))
    positive = []
    flushed, largest = {name: [] for name in RELU_COMPARED}, {name: [] for name in RELU_COMPARED}
    single = {name: [] for name in VARIANTS if name != REFERENCE}
    summed, previous, between = {}, None, []
    for b, images, labels in training_batches(run, args):
        grads = {name: gradients(m, VARIANTS[name], images, labels, run, step=b) for name, m in models.items()}
        for i, ref in enumerate(relu_outputs[REFERENCE]):
            if i == len(positive):
                positive.append(0)
                for name in RELU_COMPARED:
                    flushed[name].append(0), largest[name].append(0)
            passed = ref > 0
            positive[i] += int(passed.sum())
            for name in RELU_COMPARED:
                low = relu_outputs[name][i]
                flushed[name][i] += int((passed & (low == 0)).sum())
                largest[name][i] = max(largest[name][i], int(low.max()))
        for outputs in relu_outputs.values():
            outputs.clear()
        for name, g in grads.items():
            summed[name] = g if name not in summed else [s + x for s, x in zip(summed[name], g)]
        for name in single:
            single[name].append([cos_proj(g, r) for g, r in zip(grads[name], grads[REFERENCE])])
        if previous is not None:
            between.append([cos_proj(g, r)[0] for g, r in zip(grads[REFERENCE], previous)])
        previous = grads[REFERENCE]
    source = f"checkpoint.pt (epoch {checkpoint.load(checkpoint.checkpoint_path(args.run))['epoch']})" if args.checkpoint else "model.pt"
    print(f"{args.run}, {source}: {args.batches} batches of {args.batch_size} training images; cos / proj against {REFERENCE}")
    print_cos_proj(single, single, summed, REFERENCE, len(summed[REFERENCE]), (3, 3), between)

    for name in RELU_COMPARED:
        print(f"\n{name}\nReLU  units the reference passes that are zero in int8  largest int8 value")
        for i in range(len(positive)):
            print(f"{i:4d}  {flushed[name][i] / max(positive[i], 1):>50.3f}  {largest[name][i]:>18d}")


if __name__ == "__main__":
    main()
