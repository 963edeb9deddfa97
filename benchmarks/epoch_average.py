"""The int8 SGD update's runs evaluated from the mean of their last epochs' weights, several
windows from one training run.

``--weight-average last:N`` (``methods.averaging.EpochEndAverage``) evaluates and saves the integer
mean of the int32 masters of ``--update sgd`` or ``adamw`` at the ends of the last N epochs (one
snapshot per epoch, as stochastic weight averaging takes them); training is the same whatever N.
This script measures several N from one training run, which is how a recipe's N is chosen.

``train`` runs ``intrain train`` with the arguments after ``--`` (the same command line, the same
bits: the snapshots are taken at each epoch's end, outside the step) and writes each epoch's int32
masters with their exponents to ``--snapshots DIR`` (``after-NN.pt``: after NN epochs; 4 bytes a
weight each). ``evaluate`` loads the finished run (``--run``, its ``model.pt`` and split), puts the
mean of the masters after epochs FROM..last into its layers for each ``--from`` FROM
(``EpochEndAverage``, the option's own code), and prints the accuracy on the run's evaluation
split (a float run: the float64 mean of its parameters, for comparison); ``--from`` equal to the
run's epochs is its latest weights (it must reproduce the run's own accuracy). Nothing in the run
folder is changed.

    OMP_NUM_THREADS=1 python benchmarks/epoch_average.py train --snapshots SNAP -- \\
        --dataset fashion-mnist --data-dir DATA --model vgg-small-7 --width 0.25 --val-split 10000 \\
        --tune-split 10000 --seed S --out RUN
    OMP_NUM_THREADS=1 python benchmarks/epoch_average.py evaluate --run RUN --snapshots SNAP \\
        --from 30 29 27 25 20
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from intrain.cli import main as intrain_main
from intrain.layers import weighted_layers
from intrain.methods.averaging import EpochEndAverage
from intrain.numeric.qtensor import QTensor
from intrain.run import loop
from intrain.run.evaluate import load_run
from intrain.run.metrics import accuracy


def refuse(message: str) -> None:
    """One line on stderr and exit 2, as intrain's own commands refuse their input."""
    print(f"epoch_average.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def train(snapshots: Path, train_args: list[str]) -> int:
    """``intrain train train_args`` with each epoch's masters (a float run: parameters) saved in
    ``snapshots`` by the run's ``end_epoch``; returns its exit status."""
    if snapshots.exists():
        refuse(f"{snapshots} exists: name a new folder for the snapshots")
    prepare = loop.prepare

    def prepare_with_snapshots(config, resuming=False):
        p = prepare(config, resuming)
        method = p.method
        integer = p.config.arith == "int8"
        if p.config.arith not in ("int8", "float") or (integer and getattr(method, "twin", None) is None):
            refuse("needs an int8 run with --update sgd or adamw (integer masters), or a float run")
        snapshots.mkdir(parents=True)
        end_epoch = method.end_epoch

        def snapshot_at_end(epoch: int, epochs: int) -> None:
            end_epoch(epoch, epochs)
            if integer:
                state = [(m.v.clone(), m.e.clone()) for m in method.twin.master]
            else:
                state = {name: value.clone() for name, value in p.model.state_dict().items()}
            torch.save(state, snapshots / f"after-{epoch + 1:02d}.pt")

        method.end_epoch = snapshot_at_end
        return p

    loop.prepare = prepare_with_snapshots  # loop.run looks it up when it runs
    return intrain_main(["train", *train_args])


def evaluate_windows(run_dir: Path, snapshots: Path, starts: list[int]) -> None:
    run = load_run(run_dir)
    epochs = int(run.config["epochs"])
    integer = run.config["arith"] == "int8"
    layers = weighted_layers(run.model) if integer else []
    print(f"run {run_dir}: {run.config['model']} seed {run.config['seed']}, {run.splits.eval_name} split "
          f"({len(run.splits.eval)} images)")
    for first in starts:
        if not 1 <= first <= epochs:
            refuse(f"--from {first} is outside the run's epochs 1..{epochs}")
        window = [torch.load(snapshots / f"after-{k:02d}.pt") for k in range(first, epochs + 1)]
        average = nullcontext()
        if integer:
            average = EpochEndAverage(layers, lambda: None, len(window), torch.iinfo(layers[0].weight.dtype).bits)
            for masters in window:
                average.add([QTensor(v, e) for v, e in masters])
            average = average.applied()
        else:  # the float twin's mean, in float64
            run.model.load_state_dict({name: (sum(s[name].double() for s in window) / len(window)).to(value.dtype)
                                       if value.is_floating_point() else value
                                       for name, value in window[-1].items()})
        with average:
            preds = loop.predictions(run.model, run.method, run.splits.eval, run.mean, run.batch_size, run.device,
                                     run.workers)
        labels = torch.as_tensor(run.splits.eval.labels)
        acc = accuracy(int((preds.cpu() == labels).sum()), len(labels))
        print(f"mean of the weights after epochs {first}..{epochs} ({len(window)}): {acc:.2f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--snapshots", type=Path, required=True)
    t.add_argument("train_args", nargs=argparse.REMAINDER)
    e = sub.add_parser("evaluate")
    e.add_argument("--run", type=Path, required=True)
    e.add_argument("--snapshots", type=Path, required=True)
    e.add_argument("--from", dest="starts", type=int, nargs="+", required=True)
    args = parser.parse_args()
    if args.command == "train":
        rest = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
        sys.exit(train(args.snapshots, rest))
    else:
        evaluate_windows(args.run, args.snapshots, args.starts)


if __name__ == "__main__":
    main()
