"""The ``intrain`` command line.

Each subcommand is one ``add_<name>(subparsers)`` function that adds its parser and sets
``handler`` (a function ``args -> exit status``); to add a subcommand, write such a function
and list it in ``SUBCOMMANDS``.

Errors in user input (bad arguments, missing or corrupt data, an output directory that already
holds a run) print exactly one line, ``intrain: error: <what is wrong and what to do>``, on
stderr and exit with status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2


class UsageError(Exception):
    """Raised instead of argparse's print-usage-and-exit, so errors stay one line."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are raised as ``UsageError`` (one line, no usage dump)."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


# ----------------------------------------------------------------------------- train

def add_train(sub) -> None:
    """``intrain train``: train one model (int8 or its float32 twin) and save the run."""
    from intrain.data import DATASETS
    from intrain.models import MODELS
    from intrain.train import ARITHS, BACKENDS, DEVICES

    p = sub.add_parser(
        "train", help="train a model with integer-only arithmetic or its float32 twin",
        description="Train one model and write metrics.csv, config.json and model.pt to the run "
                    "directory. Options left out take the recipe's defaults for the dataset "
                    "(intrain.recipes). The last line on stdout is eval_acc=NN.NN (percent).")
    p.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="data set to train on (default: digits, bundled with scikit-learn)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="folder with the data set's files (default: data/<dataset>; unused for digits)")
    p.add_argument("--model", choices=MODELS, default="mlp", help="network (default: mlp)")
    p.add_argument("--arith", choices=ARITHS, default="int8",
                   help="int8: integer-only training (NITI); float: the float32 twin with SGD "
                        "(default: int8)")
    p.add_argument("--epochs", type=_int_at_least(0, "an integer >= 0"), metavar="N",
                   help="number of epochs (default: from the recipe)")
    p.add_argument("--batch-size", type=_int_at_least(1, "an integer >= 1"), metavar="B",
                   help="training (and evaluation) batch size (default: from the recipe)")
    p.add_argument("--seed", type=_int_at_least(0, "an integer >= 0"), default=0, metavar="S",
                   help="seed for initialisation, shuffling and rounding (default: 0)")
    p.add_argument("--val-split", type=_int_at_least(1, "an integer >= 1"), metavar="N",
                   help="hold out the last N training images for validation and evaluate on them "
                        "instead of the test split (needed for fashion-mnist)")
    p.add_argument("--train-limit", type=_int_at_least(1, "an integer >= 1"), metavar="N",
                   help="train on the first N training images only")
    p.add_argument("--mu-schedule", metavar="SPEC",
                   help="int8 only: update bit width by epoch as epoch:mu pairs, e.g. "
                        "'0:5,100:4,150:3' (default: from the recipe)")
    p.add_argument("--lr", type=_positive_float, metavar="LR",
                   help="float only: peak learning rate (default: 0.05 x batch size / 64)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="int8 only: integer kernels to use (default: auto, the fastest for the device)")
    p.add_argument("--device", choices=DEVICES, default="cpu", help="where to train (default: cpu)")
    p.add_argument("--out", metavar="DIR",
                   help="run directory (default: runs/<dataset>-<model>-<arith>-<k>, first free k)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out instead of stopping with an error")
    p.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Build the TrainConfig from the parsed arguments and run it; prints the summary."""
    from intrain.train import TrainConfig, run

    config = TrainConfig(
        dataset=args.dataset, model=args.model, arith=args.arith, data_dir=args.data_dir,
        epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, val_split=args.val_split,
        train_limit=args.train_limit, mu_schedule=args.mu_schedule, lr=args.lr,
        backend=args.backend, device=args.device, out=args.out, overwrite=args.overwrite)
    result = run(config)
    print(f"run directory: {result.out_dir}")
    print(f"{result.eval_name} accuracy after {len(result.rows)} epochs: {result.eval_acc:.2f}%")
    print(f"eval_acc={result.eval_acc:.2f}")
    return 0


# ----------------------------------------------------------------------------- main

SUBCOMMANDS = (add_train,)


def build_parser() -> Parser:
    """The ``intrain`` parser with every subcommand in ``SUBCOMMANDS``."""
    parser = Parser(prog="intrain",
                    description="Train neural networks with integer-only arithmetic (NITI) on "
                                "PyTorch, and their float32 twins for comparison.")
    from intrain import __version__

    parser.add_argument("--version", action="version", version=f"intrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=Parser)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _one_line(message: str) -> str:
    return " ".join(str(message).split()) or "unknown error"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``intrain`` console script; returns the exit status."""
    from intrain.data.errors import DataError
    from intrain.train import ConfigError

    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except (UsageError, ConfigError, DataError) as err:
        print(f"intrain: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("intrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
