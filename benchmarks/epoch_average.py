"""The int8 SGD update's runs evaluated from the mean of their last epochs' weights, several
windows from one training run.

``--weight-average last:N`` (``methods.averaging.EpochEndAverage``) evaluates and saves the integer
mean of the int32 masters of ``--update sgd`` or ``adamw`` at the ends of the last N epochs (one
snapshot per epoch, as stochastic weight averaging takes them); training is the same whatever N.
This script measures several N from one training run, which is how a recipe's N is chosen.

``train`` runs ``intrain train`` with the arguments after ``--`` (the same command line, the same
bits: the snapshots are taken outside the step) and writes each epoch's int32 masters with their
exponents to ``--snapshots DIR`` (``after-NN.pt``: after NN epochs; 4 bytes a weight each).
``evaluate`` loads the finished run (``--run``, its ``model.pt`` and split), replaces its weights
by the mean of the masters after epochs FROM..last for each ``--from`` FROM, and prints the
accuracy on the run's evaluation split (a float run: the float64 mean of its parameters, for
comparison); ``--from`` equal to the run's epochs is its latest weights
(it must reproduce the run's own accuracy). Nothing in the run folder is changed.

Integer only: every master ``v_k * 2**e_k`` (``|v_k| < 2**31``) is shifted to the smallest
exponent of the window and summed in int64, exact while ``31 + gap + bit_length(n) < 62`` bits (checked;
the gap is the spread of the window's exponents), then divided by the count with nearest rounding
(``numeric.rounding.divide_round``) and rounded to the run's weight width as the update itself
rounds a master (``requantize``, nearest).

    OMP_NUM_THREADS=1 python benchmarks/epoch_average.py train --snapshots SNAP -- \\
        --dataset fashion-mnist --data-dir DATA --model vgg-small-7 --width 0.25 --val-split 10000 \\
        --tune-split 10000 --seed S --out RUN
    OMP_NUM_THREADS=1 python benchmarks/epoch_average.py evaluate --run RUN --snapshots SNAP \\
        --from 30 29 27 25 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from intrain.cli import TRAIN_DEFAULTS, _TRAIN_FIELDS, build_parser
from intrain.layers import weighted_layers
from intrain.methods import METHODS
from intrain.numeric.requant import requantize
from intrain.numeric.rounding import divide_round
from intrain.run.config import TrainConfig
from intrain.run.evaluate import load_run
from intrain.run.loop import predictions, prepare, train_prepared
from intrain.run.metrics import accuracy


def refuse(message: str) -> None:
    """One line on stderr and exit 2, as intrain's own commands refuse their input."""
    print(f"epoch_average.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def train(snapshots: Path, train_args: list[str]) -> None:
    args = build_parser().parse_args(["train", *train_args])
    option_names = {name for method in METHODS.values() for name in method.option_names()}
    given = {name: getattr(args, name) for name in _TRAIN_FIELDS}
    values = {k: (TRAIN_DEFAULTS[k] if v is None and k in TRAIN_DEFAULTS else v) for k, v in given.items()}
    options = {name: getattr(args, name) for name in sorted(option_names) if getattr(args, name) is not None}
    p = prepare(TrainConfig(overwrite=args.overwrite, options=options, **values))
    method = p.method
    integer = p.config.arith == "int8"
    if p.config.arith not in ("int8", "float") or (integer and getattr(method, "twin", None) is None):
        refuse("needs an int8 run with --update sgd or adamw (integer masters), or a float run")
    if snapshots.exists():
        refuse(f"{snapshots} exists: name a new folder for the snapshots")
    snapshots.mkdir(parents=True)
    averaged, done = method.averaged, [0]

    def snapshot_then_averaged():  # the loop evaluates after every epoch, and once more to save
        done[0] += 1
        if done[0] <= p.config.epochs:
            if integer:
                state = [(m.v.clone(), m.e.clone()) for m in method.twin.master]
            else:
                state = {name: value.clone() for name, value in p.model.state_dict().items()}
            torch.save(state, snapshots / f"after-{done[0]:02d}.pt")
        return averaged()

    method.averaged = snapshot_then_averaged
    result = train_prepared(p)
    print(f"{result.eval_name} accuracy after {len(result.rows)} epochs (latest weights): {result.eval_acc:.2f}%")


def mean_master(masters: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest integer mean of ``v_k * 2**e_k`` at the smallest exponent (int64, exponent),
    written out here, apart from ``EpochEndAverage``, so that the test comparing the two checks one
    against the other."""
    exponents = [int(e) for _, e in masters]
    base, gap = min(exponents), max(exponents) - min(exponents)
    if 31 + gap + len(masters).bit_length() >= 62:
        raise ValueError(f"exponents {min(exponents)}..{max(exponents)} over {len(masters)} epochs overflow int64")
    total = torch.zeros(masters[0][0].shape, dtype=torch.int64)
    for (v, _), e in zip(masters, exponents):
        total += v.to(torch.int64) << (e - base)
    return divide_round(total, len(masters)), torch.tensor(base, dtype=torch.int64)


def evaluate_windows(run_dir: Path, snapshots: Path, starts: list[int]) -> None:
    run = load_run(run_dir)
    epochs = int(run.config["epochs"])
    layers = weighted_layers(run.model) if run.config["arith"] == "int8" else []
    print(f"run {run_dir}: {run.config['model']} seed {run.config['seed']}, {run.splits.eval_name} split "
          f"({len(run.splits.eval)} images)")
    for first in starts:
        if not 1 <= first <= epochs:
            refuse(f"--from {first} is outside the run's epochs 1..{epochs}")
        window = [torch.load(snapshots / f"after-{k:02d}.pt") for k in range(first, epochs + 1)]
        if run.config["arith"] == "float":  # the float twin's mean, in float64
            run.model.load_state_dict({name: (sum(s[name].double() for s in window) / len(window)).to(value.dtype)
                                       if value.is_floating_point() else value
                                       for name, value in window[-1].items()})
        for i, layer in enumerate(layers if run.config["arith"] == "int8" else ()):
            try:
                v, e = mean_master([masters[i] for masters in window])
            except ValueError as err:
                refuse(str(err))
            weight = requantize(v, e, bits=torch.iinfo(layer.weight.dtype).bits)
            layer.weight.copy_(weight.v)
            layer.weight_exp.copy_(weight.e)
        preds = predictions(run.model, run.method, run.splits.eval, run.mean, run.batch_size, run.device, run.workers)
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
        train(args.snapshots, rest)
    else:
        evaluate_windows(args.run, args.snapshots, args.starts)


if __name__ == "__main__":
    main()
