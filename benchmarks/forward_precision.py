"""Where an int8 run's accuracy is lost: in the precision of its forward pass, or in the weights it
learned. A trained int8 run (``model.pt``) is evaluated on its own eval split as it was saved, then
with the same int8 weights in a network whose activations are 16-bit with exact sums (DFP16 values,
``accumulator="exact"``: rounding error about 2**-8 of int8's), and, when the run's ``checkpoint.pt``
holds the int32 master weights of ``--update sgd`` or ``adamw`` from the same epoch, with those
masters rounded to 16 bits in that 16-bit network. If the 16-bit rows match the run's accuracy,
the 8-bit forward pass costs nothing and what the int8 model lacks against its float twin is in
the weights training found; if they rise to the float twin's, the forward pass is the loss.

    OMP_NUM_THREADS=1 python benchmarks/forward_precision.py --run RUN_DIR [--batch-size B]

Models with batch normalisation are refused: their running statistics belong to the run's network
and are not rebuilt here. Nothing is written.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from gradient_fidelity import copy_holding  # the benchmarks folder is the script's own

from intrain.layers import weighted_layers
from intrain.layers.norm import IntBatchNorm
from intrain.methods import get_method
from intrain.numeric.formats import DFP16
from intrain.numeric.requant import requantize
from intrain.run import checkpoint
from intrain.run.evaluate import load_run
from intrain.run.loop import predictions
from intrain.run.metrics import accuracy

SIXTEEN_BIT = replace(DFP16, accumulator="exact")


def sixteen_bit_copy(run, weights) -> torch.nn.Module:
    """The run's architecture with 16-bit activations and exact sums, holding ``weights`` (one
    ``(values, exponent)`` pair per weighted layer), in eval mode."""
    return copy_holding(run, SIXTEEN_BIT, weights).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="int8 run directory (model.pt, config.json)")
    parser.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (default: the run's)")
    args = parser.parse_args()
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be 1 or more")
    run = load_run(args.run, batch_size=args.batch_size)
    if run.config["arith"] != "int8":
        parser.error(f"{args.run} is a {run.config['arith']} run; give an int8 run")
    if any(isinstance(m, IntBatchNorm) for m in run.model.modules()):
        parser.error(f"{args.run} has batch normalisation, whose running statistics are not rebuilt here")
    if run.config.get("biases") == "on":
        parser.error(f"{args.run} was trained with --biases on, which this comparison does not pair yet; give a run "
                     "without biases")
    labels = run.splits.eval.labels.to(run.device)

    def score(model, method) -> float:
        preds = predictions(model, method, run.splits.eval, run.mean, run.batch_size, run.device, run.workers)
        return accuracy(int((preds == labels).sum()), len(labels))

    sixteen = get_method("dfp16")
    int8_weights = [(layer.weight, layer.weight_exp) for layer in weighted_layers(run.model)]
    rows = [("int8 weights, 8-bit activations (the run's model)", score(run.model, run.method)),
            ("int8 weights, 16-bit activations", score(sixteen_bit_copy(run, int8_weights), sixteen))]
    path = checkpoint.checkpoint_path(args.run)
    saved = checkpoint.load(path) if path.exists() else None
    update = next((saved[k] for k in ("sgd_update", "adamw_update") if saved and saved.get(k)), None)
    if update is not None and saved["epoch"] == int(run.config["epochs"]) and saved["batch"] == 0:
        masters = [(q.v, q.e) for q in (requantize(v, e, bits=16) for v, e in update["master"])]
        rows.append(("int32 masters at 16 bits, 16-bit activations", score(sixteen_bit_copy(run, masters), sixteen)))
    else:
        rows.append(("int32 masters at 16 bits, 16-bit activations", None))
    print(f"{args.run}: {run.splits.eval_name} split, {len(labels)} images, batch {run.batch_size}")
    for name, acc in rows:
        print(f"{name:52s} {'not in checkpoint.pt' if acc is None else f'{acc:.2f} %'}")


if __name__ == "__main__":
    main()
