"""The ``intrain`` command line.

Each subcommand is one ``add_<name>(subparsers)`` function that adds its parser and sets
``handler`` (a function ``args -> exit status``); to add a subcommand, write such a function
and list it in ``SUBCOMMANDS``.

Errors in user input (bad arguments, missing or corrupt data, an output directory that already
holds a run) print exactly one line, ``intrain: error: <what is wrong and what to do>``, on
stderr and exit with status 2, before anything is written. So do damaged run files, a run folder
another command holds, operating-system errors (an unwritable or uncreatable folder, a full disk)
and running out of memory, wherever they happen.
"""

from __future__ import annotations

import argparse
import shlex
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


def _hidden_sizes(text: str) -> list[int]:
    """``--hidden 100,50``: one or more positive integers separated by commas."""
    parts = text.split(",")
    if not all(part.strip().isdigit() and int(part) >= 1 for part in parts):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, e.g. 100,50, "
                                         f"got {text!r}")
    return [int(part) for part in parts]


# ----------------------------------------------------------------------------- train

def add_train(sub) -> None:
    """``intrain train``: train one model (int8 or its float32 twin) and save the run."""
    from intrain.data import DATASETS
    from intrain.methods import METHODS
    from intrain.methods.base import add_option_arguments, positive_float
    from intrain.models import MODELS
    from intrain.run.config import DEVICES

    p = sub.add_parser(
        "train", help="train a model with integer-only arithmetic or its float32 twin",
        description="Train one model and write metrics.csv, config.json and model.pt to the run "
                    "directory. Options left out take the recipe's defaults for the dataset "
                    "(intrain.run.recipes). The last line on stdout is eval_acc=NN.NN (percent). "
                    "Under torchrun (torchrun --nproc-per-node N -m intrain train ...) the int8 methods "
                    "train data-parallel, bit for bit as one process; rank 0 writes the run.")
    # Options default to None here so that ``--resume`` can tell which were given; run_train
    # fills in TRAIN_DEFAULTS for a new run.
    p.add_argument("--dataset", choices=DATASETS,
                   help="data set to train on (default: digits, bundled with scikit-learn)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="folder with the data set's files (default: data/<dataset>; unused for digits); for "
                        "imagefolder DIR/train/<class>/* and DIR/val/<class>/* (JPEG, PNG)")
    p.add_argument("--image-size", type=_int_at_least(1, "an integer >= 1"), metavar="S",
                   help="imagefolder: images are resized (shorter side round(S*8/7)) and cropped to SxS, "
                        "randomly with flips for training when augmenting, centred for evaluation (default: 224); "
                        "moving-mnist-actions: frames of 32x32 or 64x64 pixels (default: 32)")
    p.add_argument("--model", choices=MODELS, help="network (default: mlp)")
    p.add_argument("--width", type=positive_float, metavar="W",
                   help="multiply every layer's channel / unit count by W, e.g. 0.25 for a quarter-width "
                        "VGG-small (default: 1.0)")
    p.add_argument("--hidden", type=_hidden_sizes, metavar="H1,H2,...",
                   help="mlp only: the hidden layers' sizes, e.g. 100,50 for a 784-100-50-10 MLP on MNIST "
                        "(--width scales them too) (default: 512,256)")
    p.add_argument("--arith", choices=tuple(METHODS),
                   help="the training method: " + "; ".join(f"{name}: {m.summary}" for name, m in METHODS.items())
                        + " (default: int8)")
    p.add_argument("--epochs", type=_int_at_least(0, "an integer >= 0"), metavar="N",
                   help="number of epochs (default: from the recipe)")
    p.add_argument("--batch-size", type=_int_at_least(1, "an integer >= 1"), metavar="B",
                   help="training (and evaluation) batch size (default: from the recipe)")
    p.add_argument("--seed", type=_int_at_least(0, "an integer >= 0"), metavar="S",
                   help="seed for initialisation, shuffling and rounding (default: 0)")
    p.add_argument("--val-split", type=_int_at_least(1, "an integer >= 1"), metavar="N",
                   help="hold out the last N training images for validation and evaluate on them "
                        "instead of the test split (needed for fashion-mnist)")
    p.add_argument("--tune-split", type=_int_at_least(1, "an integer >= 1"), metavar="N",
                   help="hold out the N training images just before the validation split (the last N without "
                        "--val-split) and evaluate on them instead: the split to choose recipes on, so the "
                        "validation or test split that results are reported on is never seen")
    p.add_argument("--train-limit", type=_int_at_least(1, "an integer >= 1"), metavar="N",
                   help="train on the first N training images only")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction,
                   help="random crop (4-pixel zero padding; imagefolder: of the resized image) and horizontal "
                        "flip of training images, deterministic by seed, epoch and image (default: on for cifar10 "
                        "and imagefolder, off otherwise)")
    p.add_argument("--workers", type=_int_at_least(0, "an integer >= 0"), metavar="N",
                   help="data loader worker processes; results are identical for any N (default: 0)")
    p.add_argument("--checkpoint-every", type=_int_at_least(1, "an integer >= 1"), metavar="N",
                   help="also write checkpoint.pt every N training steps (it is always written at the end "
                        "of every epoch)")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR from DIR/checkpoint.pt with the options recorded there "
                        "(giving a different value for one of them is an error); the result is bit for bit "
                        "that of an uninterrupted run")
    p.add_argument("--tr-rank", type=_int_at_least(0, "an integer >= 1"), metavar="R",
                   help="tt-lstm and tr-lstm only: rank of the tensor ring (of the inner bonds of the tensor train) "
                        "of the input-to-hidden map (default: 8)")
    p.add_argument("--tr-input-factors", metavar="AxBx..",
                   help="tt-lstm and tr-lstm only: factors of the frame size, e.g. 4x8x8x4 for 32x32 frames "
                        "(default: four factors as equal as possible)")
    p.add_argument("--tr-hidden-factors", metavar="AxBx..",
                   help="tt-lstm and tr-lstm only: factors of the hidden size (128 x --width), e.g. 4x8x4; the "
                        "four gates are one more output factor (default: three factors as equal as possible)")
    p.add_argument("--lstm-forget-bias", type=float, metavar="B",
                   help="lstm, tt-lstm and tr-lstm only: the forget gate's bias, between -8 and 8: the float twin's "
                        "initial value, a fixed offset in the integer LSTM (default: 0)")
    p.add_argument("--device", choices=DEVICES, help="where to train (default: cpu)")
    p.add_argument("--out", metavar="DIR",
                   help="run directory (default: runs/<dataset>-<model>-<arith>-<k>, first free k)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out instead of stopping with an error")
    add_option_arguments(p, METHODS)  # each method's own options; one of another method is an error
    p.set_defaults(handler=run_train)


#: Defaults of the common ``train`` options whose parser default is None (see add_train); a
#: method's own options take their defaults from the method and the recipe.
TRAIN_DEFAULTS = dict(dataset="digits", model="mlp", arith="int8", seed=0, device="cpu", width=1.0, workers=0)
_TRAIN_FIELDS = ("dataset", "model", "arith", "data_dir", "epochs", "batch_size", "seed", "val_split",
                 "tune_split", "train_limit", "device", "out", "width", "hidden", "augment", "workers",
                 "checkpoint_every", "image_size", "tr_rank", "tr_input_factors", "tr_hidden_factors",
                 "lstm_forget_bias")


def run_train(args: argparse.Namespace) -> int:
    """Build the TrainConfig from the parsed arguments and run it (or resume a run); prints the summary."""
    from intrain.methods import METHODS
    from intrain.run import dist
    from intrain.run.config import TrainConfig
    from intrain.run.loop import run
    from intrain.run.resume import resume

    option_names = {name for method in METHODS.values() for name in method.option_names()}
    given = {name: getattr(args, name) for name in _TRAIN_FIELDS}
    options = {name: getattr(args, name) for name in sorted(option_names)}
    try:
        if args.resume is not None:
            given["overwrite"] = args.overwrite or None
            result = resume(args.resume, {**given, **options})
        else:
            values = {k: (TRAIN_DEFAULTS[k] if v is None and k in TRAIN_DEFAULTS else v) for k, v in given.items()}
            options = {k: v for k, v in options.items() if v is not None}
            result = run(TrainConfig(overwrite=args.overwrite, options=options, **values))
    finally:
        dist.close()
    if dist.environment()[0] != 0:  # data parallel: rank 0 reports for all
        return 0
    print(f"run directory: {result.out_dir}")
    print(f"{result.eval_name} accuracy after {len(result.rows)} epochs: {result.eval_acc:.2f}%")
    print(f"eval_acc={result.eval_acc:.2f}")
    return 0


# ----------------------------------------------------------------------------- eval

def add_eval(sub) -> None:
    """``intrain eval``: accuracy and confusion matrix of a saved run."""
    from intrain.data import DATASETS

    p = sub.add_parser(
        "eval", help="evaluate a saved run (accuracy and confusion matrix)",
        description="Load RUN/model.pt and evaluate it on the run's eval split (the same data set "
                    "options as the run unless overridden); prints the accuracy and the confusion "
                    "matrix (rows: true class, columns: predicted class), writes RUN/eval.json. The "
                    "last line on stdout is eval_acc=NN.NN (percent).")
    p.add_argument("--run", metavar="DIR", required=True, help="run directory (holding model.pt and config.json)")
    p.add_argument("--dataset", choices=DATASETS, help="data set to evaluate on (default: the run's)")
    p.add_argument("--data-dir", metavar="DIR", help="folder with the data set's files (default: the run's)")
    p.add_argument("--val-split", type=_int_at_least(1, "an integer >= 1"), metavar="N",
                   help="evaluate on the last N training images instead (default: the run's split)")
    p.add_argument("--batch-size", type=_int_at_least(1, "an integer >= 1"), metavar="B",
                   help="evaluation batch size (default: the run's; int8 results depend on it)")
    p.add_argument("--workers", type=_int_at_least(0, "an integer >= 0"), metavar="N",
                   help="loader processes decoding an image folder; the result is the same for any N "
                        "(default: the run's)")
    p.add_argument("--residuals", type=_fraction, metavar="FRACTION",
                   help="ternary runs (intrain ternarize) only: keep this fraction of the ranked residual edges "
                        "on, the most important first (default: 1, all of them; 0: the plain 8-2 model)")
    p.set_defaults(handler=run_eval)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}")
    return value


def run_eval(args: argparse.Namespace) -> int:
    from intrain.run.evaluate import evaluate_run, format_confusion
    from intrain.ternary.report import is_ternary_run

    if args.residuals is not None or is_ternary_run(args.run):
        return run_eval_ternary(args)
    result = evaluate_run(args.run, dataset=args.dataset, data_dir=args.data_dir, val_split=args.val_split,
                          batch_size=args.batch_size, workers=args.workers)
    print(f"run {args.run}: {result['arith']} {result['model']} on {result['dataset']} "
          f"{result['eval_name']} ({result['eval_size']} images, batch {result['batch_size']})")
    print(f"accuracy: {result['correct']}/{result['eval_size']} = {result['accuracy']:.2f}%")
    print("confusion matrix (rows: true class, columns: predicted class):")
    print(format_confusion(result["confusion"]))
    print(f"eval_acc={result['accuracy']:.2f}")
    return 0


def run_eval_ternary(args: argparse.Namespace) -> int:
    from intrain.run.config import ConfigError
    from intrain.run.evaluate import format_confusion
    from intrain.ternary.report import evaluate_ternary_run

    if args.dataset or args.data_dir or args.val_split or args.workers is not None:
        raise ConfigError("a ternary run is evaluated on its source run's data: drop --dataset, --data-dir, "
                          "--val-split and --workers")
    r = evaluate_ternary_run(args.run, residuals=args.residuals, batch_size=args.batch_size)
    print(f"run {args.run}: 8-2 {r['model']} converted from the {r['source_arith']} run, on {r['dataset']} "
          f"{r['eval_name']} ({r['eval_size']} images, batch {r['batch_size']})")
    print(f"residual edges on: {r['residual_edges_on']} of {r['residual_edges']} "
          f"({r['residual_edges_on'] / r['groups']:.3f} per group, {r['groups']} groups)")
    print("confusion matrix (rows: true class, columns: predicted class):")
    print(format_confusion(r["confusion"]))
    source = "n/a" if r["source_eval_acc"] is None else f"{r['source_eval_acc']:.2f}%"
    print(f"accuracy: {r['correct']}/{r['eval_size']} = {r['accuracy']:.2f}% (source {r['source_arith']} run: "
          f"{source})")
    for what, key in (("model size (bits)", "bits"), ("multiplications / image", "mults"),
                      ("additions / image", "adds")):
        ours, base = r[key], r[key + "_8_8"]
        print(f"{what}: {ours} (8-8: {base}, ratio 8-8 / 8-2 = {base / max(ours, 1):.2f}x)")
    print(f"eval_acc={r['accuracy']:.2f}")
    return 0


# ----------------------------------------------------------------------------- ternarize

def add_ternarize(sub) -> None:
    """``intrain ternarize``: convert a finished run into an 8-2 model with residual ternary edges."""
    from intrain.ternary.convert import MAX_EDGES
    from intrain.ternary.quantize import THRESHOLD_RULES
    from intrain.ternary.rank import RANKINGS

    p = sub.add_parser(
        "ternarize", help="convert a finished int8 or float run into an 8-2 model with residual ternary edges",
        description="Ternarise every weighted layer of RUN's model in groups of N weights (values -1, 0, +1 and "
                    "one integer scale per group), add residual edges where a perturbation analysis on training "
                    "images says they lower the output error most per bit, and save the 8-2 model as a run in "
                    "OUT (evaluate it with intrain eval --run OUT [--residuals FRACTION]).")
    p.add_argument("--run", metavar="DIR", required=True, help="the finished int8 or float run to convert")
    p.add_argument("--group-size", type=_int_at_least(1, "an integer >= 1"), metavar="N", required=True,
                   help="weights per group (consecutive along a unit's inputs; N >= fan-in: one group per filter)")
    p.add_argument("--budget", type=_budget(MAX_EDGES - 1), metavar="B", required=True,
                   help=f"residual edges per group on average, on top of every group's first edge (0 to "
                        f"{MAX_EDGES - 1}; 0: the plain 8-2 model)")
    p.add_argument("--out", metavar="DIR", required=True, help="output run directory")
    p.add_argument("--threshold", choices=THRESHOLD_RULES, default="optimal",
                   help="which weights of a group become +-1: the l2-optimal support, or |w| > 0.7 mean |w| "
                        "(default: optimal)")
    p.add_argument("--ranking", choices=RANKINGS, default="perturbation",
                   help="how residual edges are chosen: output error on calibration images, the data-free l2 "
                        "error of the weights, or at random (default: perturbation)")
    p.add_argument("--calibration-images", type=_int_at_least(1, "an integer >= 1"), default=256, metavar="M",
                   help="training images for the perturbation ranking (default: 256, the first ones)")
    p.add_argument("--seed", type=_int_at_least(0, "an integer >= 0"), default=0, metavar="S",
                   help="seed of the random ranking (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.set_defaults(handler=run_ternarize)


def _budget(top: int):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of edges per group, got {text!r}") from None
        if not 0 <= value <= top:
            raise argparse.ArgumentTypeError(f"expected a budget between 0 and {top} edges per group, got {text!r}")
        return value

    return parse


def run_ternarize(args: argparse.Namespace) -> int:
    from intrain.ternary.convert import TernarySettings, ternarize_run

    settings = TernarySettings(group_size=args.group_size, budget=args.budget, threshold=args.threshold,
                               ranking=args.ranking, calibration_images=args.calibration_images, seed=args.seed)
    section = ternarize_run(args.run, args.out, settings, overwrite=args.overwrite)
    print(f"8-2 model of {args.run} in {args.out}: groups of {args.group_size}, {section['groups']} groups, "
          f"{section['residual_edges']} residual edges ({args.ranking} ranking, {args.threshold} threshold)")
    return 0


# ----------------------------------------------------------------------------- plot

def add_plot(sub) -> None:
    """``intrain plot``: accuracy and loss curves of runs on one figure."""
    p = sub.add_parser(
        "plot", help="plot accuracy and loss curves of one or more runs",
        description="Read RUN/metrics.csv of each run and draw train and eval accuracy (top) and "
                    "train loss (bottom) by epoch on one figure, one colour per run, labelled with "
                    "the run's name and arithmetic.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories")
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="image file to write, e.g. curves.png")
    p.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    p.set_defaults(handler=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    from intrain.plot import plot_runs

    path = plot_runs(args.runs, args.output, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------- download

def add_download(sub) -> None:
    """``intrain download``: fetch a data set that is not bundled."""
    p = sub.add_parser(
        "download", help="download a data set (cifar10)",
        description="Download and unpack a data set into --data-dir (resumable, checksum-verified).")
    p.add_argument("dataset", choices=("cifar10",), help="data set to download")
    p.add_argument("--data-dir", metavar="DIR", help="target folder (default: data/<dataset>)")
    p.add_argument("--url", help=argparse.SUPPRESS)  # tests point it at a local address
    p.set_defaults(handler=run_download)


def run_download(args: argparse.Namespace) -> int:
    from intrain.data import default_data_dir
    from intrain.data.download import CIFAR10_URL, download_cifar10

    data_dir = args.data_dir or default_data_dir(args.dataset)
    folder = download_cifar10(data_dir, url=args.url or CIFAR10_URL, progress=sys.stderr.isatty())
    print(f"cifar10 is ready in {folder}")
    return 0


# ----------------------------------------------------------------------------- main

SUBCOMMANDS = (add_train, add_eval, add_ternarize, add_plot, add_download)


def build_parser() -> Parser:
    """The ``intrain`` parser with every subcommand in ``SUBCOMMANDS``."""
    parser = Parser(prog="intrain",
                    description="Train neural networks with integer-only arithmetic (NITI int8, DFP16 "
                                "int16) on PyTorch, on one process or several (torchrun), convert them to "
                                "ternary 8-2 models, and train their float32 twins for comparison.")
    from intrain import __version__

    parser.add_argument("--version", action="version", version=f"intrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=Parser)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _one_line(message: str) -> str:
    return " ".join(str(message).split()) or "unknown error"


def _os_error_line(err: OSError) -> str:
    """An operating-system error no boundary worded: the system's reason and the path(s)."""
    what = err.strerror or str(err) or type(err).__name__
    paths = [p for p in (err.filename, err.filename2) if p is not None]
    return f"{what}: {' -> '.join(map(str, paths))}" if paths else what


def _out_of_memory(err: BaseException) -> str | None:
    """The first line of ``err`` when it is an allocation failure (Python's or torch's), else None."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return text
    if isinstance(err, RuntimeError) and any(s in str(err) for s in ("can't allocate memory", "out of memory",
                                                                     "not enough memory")):
        return text
    return None


def _interrupted(err: KeyboardInterrupt) -> str:
    run_dir = getattr(err, "run_dir", None)
    if run_dir is None:
        return "intrain: interrupted"
    from intrain.run.checkpoint import checkpoint_path

    if checkpoint_path(run_dir).is_file():
        return f"intrain: interrupted; continue the run with: intrain train --resume {shlex.quote(str(run_dir))}"
    return (f"intrain: interrupted before the first checkpoint of {run_dir}: nothing to resume; start again with "
            "--overwrite")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``intrain`` console script; returns the exit status.

    Every error a user can cause or meet (bad input, damaged files, a run folder in use, an
    operating-system refusal, too little memory) is one line on stderr and exit status 2."""
    from intrain.data.errors import DataError
    from intrain.run.checkpoint import CheckpointError
    from intrain.run.config import ConfigError
    from intrain.run.files import RunFileError
    from intrain.run.lock import RunFolderBusy

    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except (UsageError, ConfigError, DataError, CheckpointError, RunFileError, RunFolderBusy) as err:
        line = _one_line(err)
    except OSError as err:
        line = _one_line(_os_error_line(err))
    except KeyboardInterrupt as err:
        print(_interrupted(err), file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as err:
        reason = _out_of_memory(err)
        if reason is None:
            raise
        line = _one_line(f"out of memory ({reason}): choose a smaller --width or --batch-size")
    print(f"intrain: error: {line}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
