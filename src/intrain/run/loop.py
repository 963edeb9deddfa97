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

Batches come from ``intrain.data.augment.AugmentedLoader`` (``--workers`` loader processes; the
batches are identical for any number): the order above, with a random crop (4-pixel zero padding)
and horizontal flip per image keyed by (seed, epoch, image index) when augmentation is on (the
default for CIFAR-10 only).

Checkpoints (``intrain.run.checkpoint``): ``checkpoint.pt`` is written atomically at the end of every
epoch (after its evaluation, before its metrics row is appended) and every ``checkpoint_every``
global steps; ``resume(run_dir)`` continues from it so that a run killed at any moment and
resumed ends with the same weights, bit for bit, and the same metrics (except ``seconds``) as an
uninterrupted run. ``metrics.csv`` is rewritten from the checkpoint's rows on resume.

Both arithmetics see the same inputs: ``pixels_to_int8(u8, mean)`` with exponent
``PIXEL_EXPONENT``; the int8 model gets the integers as a ``QTensor``, the float twin their real
values ``v * 2**PIXEL_EXPONENT`` in float32.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from intrain.numeric import rng
from intrain.run.config import RESUME_FREE, ConfigError, TrainConfig, check_args, mu_schedule
from intrain.data import DatasetSplits, load_dataset, pixels_to_int8, PIXEL_EXPONENT
from intrain.methods.float_twin import FloatTrainer
from intrain.run.metrics import MetricsCSV, Running, accuracy, progress
from intrain.models import build_float_model, build_int_model
from intrain.numeric.qtensor import QTensor

RUN_FILES = ("metrics.csv", "model.pt", "config.json", "checkpoint.pt")
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_FORMAT = "intrain-checkpoint-v1"


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


# ----------------------------------------------------------------------------- output directory

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
            from intrain.methods.niti import IntegerTrainer

            model = build_int_model(c.model, shape, classes, c.seed, backend=c.backend, device=c.device,
                                    width=c.width, weight_bits=c.weight_bits,
                                    error_rounding=c.error_rounding)
            return model, IntegerTrainer(model, c.seed, mu_schedule(c.mu_schedule),
                                         weight_average=c.weight_average)
        torch.manual_seed(c.seed)
        model = build_float_model(c.model, shape, classes, width=c.width).to(c.device)
    except ValueError as err:
        raise ConfigError(str(err).splitlines()[0] if str(err) else repr(err)) from None
    trainer = FloatTrainer(model, lr=c.lr, epochs=c.epochs, steps_per_epoch=steps_per_epoch)
    return model, trainer


def prepare(config: TrainConfig, resuming: bool = False) -> Prepared:
    """Check everything and load everything; writes nothing (see the module docstring).
    ``resuming``: ``config.out`` is the run being resumed, so it may hold a run."""
    c = config.resolved()
    check_args(c)
    out_dir = Path(c.out) if resuming else _check_out(c)
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
            shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)
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

def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """Write ``path`` via a temp file in the same directory: ``write(f)``, flush, fsync, replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
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


def predictions(predict, images: torch.Tensor, mean, arith: str, batch_size: int) -> torch.Tensor:
    """Predicted classes (int64, on ``images``' device) of ``images`` in order, in batches of
    ``batch_size``; ``predict`` maps network inputs to logits in eval mode."""
    preds = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = _inputs(images[start:start + batch_size], mean, arith)
            preds.append(_as_float(predict(x)).argmax(dim=1))
    if not preds:
        return torch.zeros(0, dtype=torch.int64, device=images.device)
    return torch.cat(preds)


def evaluate(trainer, images: torch.Tensor, labels: torch.Tensor, mean, arith: str, batch_size: int) -> float:
    """Accuracy (percent) on ``images``/``labels`` in order, in batches of ``batch_size``.

    The int8 model requantises with a shift chosen per tensor, so its outputs depend on what
    else is in the batch; evaluating with the training batch size in a fixed order keeps the
    figure reproducible and the activation statistics like those of training.
    """
    pred = predictions(trainer.predict, images, mean, arith, batch_size)
    return accuracy(int((pred == labels).sum()), len(labels))


def _config_dict(p: Prepared, out_dir: Path) -> dict:
    d = asdict(p.config)
    d.update(out=str(out_dir), eval_name=p.splits.eval_name, train_size=len(p.splits.train),
             eval_size=len(p.splits.eval), image_shape=list(p.splits.train.image_shape),
             num_classes=p.splits.train.num_classes, torch_version=str(torch.__version__),
             channel_mean=None if p.splits.channel_mean is None else list(p.splits.channel_mean))
    if p.config.arith == "float":
        d["mu_schedule"] = None
        d["backend"] = None
        d["weight_bits"] = None
        d["error_rounding"] = None
        d["weight_average"] = None
    else:
        d["lr"] = None
    return d


def _batches(loader):
    """Iterate ``loader`` without letting torch's DataLoader change torch's global generator.

    Every DataLoader iterator draws a base seed from the global CPU generator when it starts,
    which would shift the float twin's dropout stream by one draw per epoch, and differently for
    an epoch resumed half way. Our batches use no torch randomness (augmentation is
    counter-based), so the generator's state is put back once the iterator has started.
    """
    state = torch.get_rng_state()
    it = iter(loader)
    try:
        first = next(it)
    except StopIteration:
        return
    finally:
        torch.set_rng_state(state)
    yield first
    yield from it


def _tensorboard(out_dir: Path, purge_step: int | None):
    """A SummaryWriter in ``out_dir/tensorboard`` when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    try:
        return SummaryWriter(log_dir=str(out_dir / TENSORBOARD_DIR), purge_step=purge_step)
    except Exception:
        return None


@dataclass
class _Start:
    """Where the loop starts: a fresh run, or a checkpoint's position and partial epoch."""

    epoch: int = 0
    batch: int = 0  # batches of ``epoch`` already done
    global_step: int = 0
    rows: list = field(default_factory=list)
    running: dict | None = None  # Running's sums for the partial epoch
    seconds: float = 0.0  # training time already spent on the partial epoch


def _running_state(running: Running) -> dict:
    def cpu(v):
        return v.detach().cpu() if isinstance(v, torch.Tensor) else v

    return {"n": running.n, "loss_sum": cpu(running.loss_sum), "correct": cpu(running.correct)}


def _restore_running(state: dict | None, dev: torch.device) -> Running:
    running = Running()
    if state:
        running.n = int(state["n"])
        for name in ("loss_sum", "correct"):
            v = state[name]
            setattr(running, name, v.to(dev) if isinstance(v, torch.Tensor) else v)
    return running


def _save_resume(out_dir: Path, p: Prepared, cfg: dict, position: dict) -> None:
    from intrain.run import checkpoint

    payload = {"format": checkpoint.MAGIC.decode().strip(), "version": checkpoint.VERSION,
               "train_config": asdict(p.config), "config": cfg, "seed": p.config.seed}
    payload.update(position)
    payload.update(checkpoint.trainer_state(p.model, p.trainer, p.config.device))
    checkpoint.save(checkpoint.checkpoint_path(out_dir), payload)


def train_prepared(p: Prepared, log=None, start: _Start | None = None, cfg: dict | None = None,
                   out_dir: Path | None = None) -> RunResult:
    """Create the output directory and run the training prepared by ``prepare``; progress
    lines go to ``log`` (default: ``sys.stderr``). ``start``/``cfg``/``out_dir`` are given by
    ``resume`` to continue a run (the model and trainer already restored)."""
    from intrain.data.augment import AugmentedLoader

    log = sys.stderr if log is None else log
    c, splits, trainer = p.config, p.splits, p.trainer
    resuming = start is not None
    start = _Start() if start is None else start
    if not resuming:
        out_dir = _make_out_dir(c, p.out_dir)
        cfg = _config_dict(p, out_dir)
        save_json(out_dir / "config.json", cfg)
    metrics = MetricsCSV(out_dir / "metrics.csv")  # on resume: rewritten from the checkpoint's rows
    for row in start.rows:
        metrics.append(**row)
    what = (f"resuming at epoch {start.epoch + 1}, batch {start.batch}" if resuming else
            f"{c.epochs} epochs of batch {c.batch_size}")
    print(f"intrain: {c.arith} {c.model} on {c.dataset}: {len(splits.train)} training images, "
          f"{len(splits.eval)} {splits.eval_name} images, {what} -> {out_dir}", file=log)

    dev = torch.device(c.device)
    eval_x, eval_y = splits.eval.images.to(dev), splits.eval.labels.to(dev)
    mean, n, bs = splits.channel_mean, len(splits.train), c.batch_size
    n_batches = -(-n // bs)
    rows, step = list(start.rows), start.global_step
    eval_acc = rows[-1]["eval_acc"] if rows else None
    board = _tensorboard(out_dir, start.epoch + 1 if resuming else None)
    try:
        for epoch in range(start.epoch, c.epochs):
            first_batch = start.batch if epoch == start.epoch else 0
            carried = start.seconds if epoch == start.epoch else 0.0
            t0 = time.perf_counter()
            running = _restore_running(start.running if epoch == start.epoch else None, dev)
            if first_batch == 0:  # a resumed partial epoch keeps its checkpointed weight sums
                trainer.begin_epoch(epoch)
            order = rng.permutation(n, c.seed, epoch)
            loader = AugmentedLoader(splits.train, order, bs, c.seed, epoch, c.augment,
                                     num_workers=c.workers, start_batch=first_batch)
            with progress(n_batches, f"epoch {epoch + 1}/{c.epochs}") as bar:
                bar.update(first_batch)
                for b, (images, labels, _) in enumerate(_batches(loader), start=first_batch):
                    y = labels.to(dev, non_blocking=True)
                    x = _inputs(images.to(dev, non_blocking=True), mean, c.arith)
                    logits = trainer.train_step(x, y, step, epoch)
                    running.update(_as_float(logits), y)
                    step += 1
                    bar.update(1)
                    if not bar.disable and (step % 20 == 0 or b + 1 == n_batches):
                        bar.set_postfix(loss=f"{running.loss:.4f}", acc=f"{running.acc:.2f}%", refresh=False)
                    if c.checkpoint_every and step % c.checkpoint_every == 0 and b + 1 < n_batches:
                        _save_resume(out_dir, p, cfg, dict(
                            epoch=epoch, batch=b + 1, global_step=step, rows=rows,
                            running=_running_state(running),
                            seconds=carried + time.perf_counter() - t0))
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds = carried + time.perf_counter() - t0
            with trainer.averaged():  # int8: the mean weights (intrain.methods.averaging)
                eval_acc = evaluate(trainer, eval_x, eval_y, mean, c.arith, bs)
            row = dict(epoch=epoch + 1, train_loss=running.loss, train_acc=running.acc, eval_acc=eval_acc,
                       seconds=seconds)
            rows.append(row)
            _save_resume(out_dir, p, cfg, dict(epoch=epoch + 1, batch=0, global_step=step, rows=rows,
                                               running=None, seconds=0.0))
            metrics.append(**row)
            if board is not None:
                for key in ("train_loss", "train_acc", "eval_acc"):
                    board.add_scalar(f"{key}/{c.arith}", row[key], epoch + 1)
                board.flush()
            print(f"epoch {epoch + 1}/{c.epochs}: loss {row['train_loss']:.4f}, train {row['train_acc']:.2f}%, "
                  f"{splits.eval_name} {eval_acc:.2f}%, {seconds:.1f}s", file=log)
    finally:
        if board is not None:
            board.close()
    if eval_acc is None:  # zero epochs: report the untrained model
        eval_acc = evaluate(trainer, eval_x, eval_y, mean, c.arith, bs)
    with trainer.averaged():
        save_checkpoint(out_dir / "model.pt", cfg, p.model)
    return RunResult(out_dir=out_dir, eval_acc=eval_acc, eval_name=splits.eval_name, rows=rows, config=cfg)


def run(config: TrainConfig, log=None) -> RunResult:
    """Check, load, train, save (see the module docstring). Raises ConfigError or DataError
    for bad input, before anything is written."""
    return train_prepared(prepare(config), log=log)


# ----------------------------------------------------------------------------- resuming

def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def resume_config(payload: dict, run_dir: Path, given: dict | None = None) -> TrainConfig:
    """The checkpoint's config, with the explicitly ``given`` options checked against it:
    those in ``RESUME_FREE`` replace the saved values, any other that differs is refused."""
    from intrain.run.checkpoint import CheckpointError, checkpoint_path

    path = checkpoint_path(run_dir)
    try:
        saved = TrainConfig(**payload["train_config"])
    except TypeError:
        raise CheckpointError(f"{path} holds a config this intrain does not know: refusing to resume from it") from None
    changes = {}
    for name, value in (given or {}).items():
        if value is None:
            continue
        if name in RESUME_FREE:
            changes[name] = value
        elif name == "overwrite":
            if value:
                raise ConfigError("--overwrite cannot be combined with --resume: a resumed run continues "
                                  "in its own directory")
        elif name == "out":
            if Path(value).resolve() != Path(run_dir).resolve():
                raise ConfigError(f"--out {value} conflicts with --resume {run_dir}: a resumed run continues "
                                  "in its own directory; leave --out out")
        elif not hasattr(saved, name):
            raise ConfigError(f"unknown option {_option(name)} for --resume")
        elif value != getattr(saved, name):
            raise ConfigError(f"{_option(name)} {value} conflicts with {getattr(saved, name)} recorded in {path}: "
                              "leave it out when resuming (a resumed run keeps its options)")
    return replace(saved, out=str(run_dir), overwrite=False, **changes)


def resume(run_dir, given: dict | None = None, log=None) -> RunResult:
    """Continue the run in ``run_dir`` from ``run_dir/checkpoint.pt`` (see the module docstring).
    Raises CheckpointError / ConfigError / DataError before anything is written."""
    from intrain.run import checkpoint

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist: pass the directory of the run to resume")
    path = checkpoint.checkpoint_path(run_dir)
    payload = checkpoint.load(path)
    config = resume_config(payload, run_dir, given)
    p = prepare(config, resuming=True)
    cfg = payload["config"]
    if len(p.splits.train) != cfg.get("train_size") or len(p.splits.eval) != cfg.get("eval_size"):
        raise ConfigError(f"the {config.dataset} data now has {len(p.splits.train)} training and {len(p.splits.eval)} "
                          f"eval images, the run in {run_dir} had {cfg.get('train_size')} and {cfg.get('eval_size')}: "
                          "resume with the same data")
    steps_per_epoch = -(-len(p.splits.train) // config.batch_size)
    epoch, batch, step = int(payload["epoch"]), int(payload["batch"]), int(payload["global_step"])
    if not (0 <= epoch <= config.epochs and 0 <= batch < max(steps_per_epoch, 1)
            and step == epoch * steps_per_epoch + batch and len(payload["rows"]) == epoch):
        raise checkpoint.CheckpointError(f"{path} records an impossible position (epoch {epoch}, batch {batch}, "
                                         f"step {step}): refusing to resume from it")
    checkpoint.restore_trainer(payload, p.model, p.trainer, config.device, path)
    for name in RUN_FILES:  # temp files of writes the kill interrupted
        for stale in run_dir.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    if "out" in cfg and Path(cfg["out"]).resolve() != run_dir.resolve():
        cfg = dict(cfg, out=str(run_dir))  # the run was moved
    start = _Start(epoch=epoch, batch=batch, global_step=step, rows=[dict(r) for r in payload["rows"]],
                   running=payload.get("running"), seconds=float(payload.get("seconds") or 0.0))
    return train_prepared(p, log=log, start=start, cfg=cfg, out_dir=run_dir)
