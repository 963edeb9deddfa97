"""The training loop shared by the int8 model and its float32 twin.

``run(config)`` does, in this order:

1. ``prepare(config)``: fill defaults from the recipe, check every argument, load the data,
   build the model and its trainer, and decide the output directory. Nothing is written yet,
   so bad input (``ConfigError`` / ``DataError``) leaves the file system untouched.
2. Create the output directory, write ``config.json``, and train: each epoch visits the
   training set in the order ``rng.permutation(n, seed, epoch)`` in batches of ``batch_size``
   (the last one may be smaller), then evaluates on the eval split; one row per epoch goes to
   ``metrics.csv``.
3. Save ``model.pt`` atomically and return a ``RunResult``.

Both arithmetics see the same inputs: ``pixels_to_int8(u8, mean)`` with exponent
``PIXEL_EXPONENT``; the int8 model gets the integers as a ``QTensor``, the float twin their real
values ``v * 2**PIXEL_EXPONENT`` in float32.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from intrain import rng
from intrain.data import DATASETS, DatasetSplits, load_dataset, pixels_to_int8, PIXEL_EXPONENT
from intrain.float_twin import FloatTrainer
from intrain.metrics import MetricsCSV, Running, accuracy, progress
from intrain.models import MODELS, build_float_model, build_int_model
from intrain.qtensor import QTensor
from intrain.recipes import default_recipe

ARITHS = ("int8", "float")
BACKENDS = ("auto", "reference", "cpu", "cuda")
DEVICES = ("cpu", "cuda")
RUN_FILES = ("metrics.csv", "model.pt", "config.json")
CHECKPOINT_FORMAT = "intrain-checkpoint-v1"


class ConfigError(ValueError):
    """Bad user input; the message is one line saying what is wrong and what to do."""


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``None`` means "the recipe's default"."""

    dataset: str = "digits"
    model: str = "mlp"
    arith: str = "int8"
    data_dir: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    seed: int = 0
    val_split: int | None = None
    train_limit: int | None = None
    mu_schedule: str | None = None  # int8 only
    lr: float | None = None  # float only; default scales with the batch size
    backend: str = "auto"  # int8 only
    device: str = "cpu"
    out: str | None = None  # default: runs/<dataset>-<model>-<arith>-<k>, first free k
    overwrite: bool = False

    def resolved(self) -> "TrainConfig":
        """A copy with every recipe default filled in (batch size first: lr depends on it)."""
        recipe = default_recipe(self.dataset, self.model, self.arith)
        batch = recipe.batch_size if self.batch_size is None else self.batch_size
        return replace(
            self,
            epochs=recipe.epochs if self.epochs is None else self.epochs,
            batch_size=batch,
            mu_schedule=recipe.mu_schedule if self.mu_schedule is None else self.mu_schedule,
            lr=recipe.lr_for(batch) if self.lr is None else self.lr,
        )


@dataclass
class RunResult:
    """What a run produced: its directory, per-epoch rows and final eval accuracy (percent)."""

    out_dir: Path
    eval_acc: float
    eval_name: str
    rows: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)


@dataclass
class Prepared:
    """A checked config with its data, model and trainer, before anything is written."""

    config: TrainConfig
    splits: DatasetSplits
    model: torch.nn.Module
    trainer: object  # IntegerTrainer or FloatTrainer
    out_dir: Path | None  # None: pick runs/<name>-<k> when creating it


# ----------------------------------------------------------------------------- checks

def _check_args(c: TrainConfig) -> None:
    """Argument checks that need no data (the CLI's argparse does most of them too)."""
    if c.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {c.dataset!r}: choose one of {', '.join(DATASETS)}")
    if c.model not in MODELS:
        raise ConfigError(f"unknown model {c.model!r}: choose one of {', '.join(MODELS)}")
    if c.arith not in ARITHS:
        raise ConfigError(f"unknown arithmetic {c.arith!r}: choose one of {', '.join(ARITHS)}")
    if c.backend not in BACKENDS:
        raise ConfigError(f"unknown backend {c.backend!r}: choose one of {', '.join(BACKENDS)}")
    if c.epochs < 0:
        raise ConfigError(f"--epochs must be 0 or more, got {c.epochs}")
    if c.batch_size < 1:
        raise ConfigError(f"--batch-size must be 1 or more, got {c.batch_size}")
    if c.seed < 0:
        raise ConfigError(f"--seed must be 0 or more, got {c.seed}")
    if not c.lr > 0:
        raise ConfigError(f"--lr must be a positive number, got {c.lr}")
    if c.device not in DEVICES:
        raise ConfigError(f"unknown device {c.device!r}: choose one of {', '.join(DEVICES)}")
    if c.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available: use --device cpu")
    if c.arith == "int8":
        _mu_schedule(c.mu_schedule)  # raises ConfigError when unreadable


def _mu_schedule(text: str):
    from intrain.optim import MuSchedule

    try:
        return MuSchedule.parse(text)
    except ValueError as err:
        raise ConfigError(f"--mu-schedule: {err}") from None


def holds_run(path: Path) -> bool:
    """True when ``path`` already contains any file of a run."""
    return any((path / name).exists() for name in RUN_FILES)


def _check_out(c: TrainConfig) -> Path | None:
    """The explicit output directory, checked; ``None`` when the default is to be picked."""
    if c.out is None:
        return None
    out = Path(c.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} is a file, not a directory: choose another --out")
    if out.is_dir() and holds_run(out) and not c.overwrite:
        raise ConfigError(f"output directory {out} already holds a run: pass --overwrite to replace it "
                          "or choose another --out")
    return out


# ----------------------------------------------------------------------------- building

def _build(c: TrainConfig, splits: DatasetSplits, steps_per_epoch: int):
    """The model and its trainer for ``c`` (ConfigError when the model does not fit the data)."""
    shape, classes = splits.train.image_shape, splits.train.num_classes
    try:
        if c.arith == "int8":
            from intrain.engine import IntegerTrainer

            model = build_int_model(c.model, shape, classes, c.seed, backend=c.backend, device=c.device)
            return model, IntegerTrainer(model, c.seed, _mu_schedule(c.mu_schedule))
        torch.manual_seed(c.seed)
        model = build_float_model(c.model, shape, classes).to(c.device)
    except ValueError as err:
        raise ConfigError(str(err).splitlines()[0] if str(err) else repr(err)) from None
    trainer = FloatTrainer(model, lr=c.lr, epochs=c.epochs, steps_per_epoch=steps_per_epoch)
    return model, trainer


def prepare(config: TrainConfig) -> Prepared:
    """Check everything and load everything; writes nothing (see the module docstring)."""
    c = config.resolved()
    _check_args(c)
    out_dir = _check_out(c)
    splits = load_dataset(c.dataset, c.data_dir, c.val_split, c.train_limit)
    if len(splits.train) == 0:
        raise ConfigError(f"the {c.dataset} training set is empty: check --data-dir and --train-limit")
    steps_per_epoch = -(-len(splits.train) // c.batch_size)
    model, trainer = _build(c, splits, steps_per_epoch)
    return Prepared(c, splits, model, trainer, out_dir)


def _make_out_dir(c: TrainConfig, out: Path | None) -> Path:
    """Create the output directory: the explicit one (clearing an old run when overwriting)
    or ``runs/<dataset>-<model>-<arith>-<k>`` with the first ``k`` not taken."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if c.overwrite:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
        return out
    Path("runs").mkdir(exist_ok=True)
    k = 1
    while True:
        candidate = Path("runs") / f"{c.dataset}-{c.model}-{c.arith}-{k}"
        try:
            candidate.mkdir()  # atomic: two runs started together never share a directory
            return candidate
        except FileExistsError:
            k += 1


# ----------------------------------------------------------------------------- files

def atomic_write(path: Path, write) -> None:
    """Write ``path`` via a temp file in the same directory: ``write(f)``, flush, fsync, replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, config: dict, model: torch.nn.Module) -> None:
    """``torch.save`` of ``{"format", "config", "state_dict"}`` (tensors on the CPU), atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "config": config, "state_dict": state}
    atomic_write(path, lambda f: torch.save(payload, f))


def save_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


# ----------------------------------------------------------------------------- the loop

def _inputs(images_u8: torch.Tensor, mean, arith: str):
    """Network inputs for uint8 images: an int8 QTensor, or the same real values in float32."""
    v = pixels_to_int8(images_u8, mean)
    if arith == "int8":
        return QTensor.of(v, PIXEL_EXPONENT)
    return v.to(torch.float32) * (2.0 ** PIXEL_EXPONENT)


def _as_float(logits) -> torch.Tensor:
    return logits.to_float() if isinstance(logits, QTensor) else logits


def evaluate(trainer, images: torch.Tensor, labels: torch.Tensor, mean, arith: str, batch_size: int) -> float:
    """Accuracy (percent) on ``images``/``labels`` in order, in batches of ``batch_size``.

    The int8 model requantises with a shift chosen per tensor, so its outputs depend on what
    else is in the batch; evaluating with the training batch size in a fixed order keeps the
    figure reproducible and the activation statistics like those of training.
    """
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            x = _inputs(images[start:start + batch_size], mean, arith)
            pred = _as_float(trainer.predict(x)).argmax(dim=1)
            correct += int((pred == labels[start:start + batch_size]).sum())
    return accuracy(correct, len(labels))


def _config_dict(p: Prepared, out_dir: Path) -> dict:
    d = asdict(p.config)
    d.update(out=str(out_dir), eval_name=p.splits.eval_name, train_size=len(p.splits.train),
             eval_size=len(p.splits.eval), image_shape=list(p.splits.train.image_shape),
             num_classes=p.splits.train.num_classes, torch_version=str(torch.__version__))
    if p.config.arith == "float":
        d["mu_schedule"] = None
        d["backend"] = None
    else:
        d["lr"] = None
    return d


def train_prepared(p: Prepared, log=None) -> RunResult:
    """Create the output directory and run the training prepared by ``prepare``; progress
    lines go to ``log`` (default: ``sys.stderr``)."""
    log = sys.stderr if log is None else log
    c, splits, trainer = p.config, p.splits, p.trainer
    out_dir = _make_out_dir(c, p.out_dir)
    cfg = _config_dict(p, out_dir)
    save_json(out_dir / "config.json", cfg)
    metrics = MetricsCSV(out_dir / "metrics.csv")
    print(f"intrain: {c.arith} {c.model} on {c.dataset}: {len(splits.train)} training images, "
          f"{len(splits.eval)} {splits.eval_name} images, {c.epochs} epochs of batch {c.batch_size} -> {out_dir}",
          file=log)

    dev = torch.device(c.device)
    train_x, train_y = splits.train.images.to(dev), splits.train.labels.to(dev)
    eval_x, eval_y = splits.eval.images.to(dev), splits.eval.labels.to(dev)
    mean, n, bs = splits.channel_mean, len(splits.train), c.batch_size
    rows, step, eval_acc = [], 0, None
    for epoch in range(c.epochs):
        start = time.perf_counter()
        order = rng.permutation(n, c.seed, epoch, device=dev)
        running = Running()
        with progress(-(-n // bs), f"epoch {epoch + 1}/{c.epochs}") as bar:
            for i in range(0, n, bs):
                idx = order[i:i + bs]
                y = train_y[idx]
                logits = trainer.train_step(_inputs(train_x[idx], mean, c.arith), y, step, epoch)
                running.update(_as_float(logits), y)
                step += 1
                bar.update(1)
                if not bar.disable and (step % 20 == 0 or i + bs >= n):
                    bar.set_postfix(loss=f"{running.loss:.4f}", acc=f"{running.acc:.2f}%", refresh=False)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
        eval_acc = evaluate(trainer, eval_x, eval_y, mean, c.arith, bs)
        row = dict(epoch=epoch + 1, train_loss=running.loss, train_acc=running.acc, eval_acc=eval_acc, seconds=seconds)
        metrics.append(**row)
        rows.append(row)
        print(f"epoch {epoch + 1}/{c.epochs}: loss {row['train_loss']:.4f}, train {row['train_acc']:.2f}%, "
              f"{splits.eval_name} {eval_acc:.2f}%, {seconds:.1f}s", file=log)
    if eval_acc is None:  # zero epochs: report the untrained model
        eval_acc = evaluate(trainer, eval_x, eval_y, mean, c.arith, bs)
    save_checkpoint(out_dir / "model.pt", cfg, p.model)
    return RunResult(out_dir=out_dir, eval_acc=eval_acc, eval_name=splits.eval_name, rows=rows, config=cfg)


def run(config: TrainConfig, log=None) -> RunResult:
    """Check, load, train, save (see the module docstring). Raises ConfigError or DataError
    for bad input, before anything is written."""
    return train_prepared(prepare(config), log=log)
