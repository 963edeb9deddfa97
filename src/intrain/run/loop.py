"""The training loop shared by the int8 model and its float32 twin.

``run(config)`` does, in this order:

1. ``prepare(config)``: fill defaults from the recipe, check every argument, load the data,
   build the model and its trainer, and decide the output directory. Nothing is written yet,
   so bad input (``ConfigError`` / ``DataError``) leaves the file system untouched.
2. Create the output directory and lock it (``intrain.run.lock``; a second command writing into
   it stops with one line naming this one), list the run's files in its manifest, write
   ``config.json``, and train: each epoch visits the
   training set in the order ``rng.permutation(n, seed, epoch)`` in batches of ``batch_size``
   (the last one may be smaller), then evaluates on the eval split; one row per epoch goes to
   ``metrics.csv``.
3. Save ``model.pt`` atomically and return a ``RunResult``.

Batches come from ``intrain.data.augment.AugmentedLoader`` (``--workers`` loader processes; the
batches are identical for any number): the order above, with a random crop (4-pixel zero padding)
and horizontal flip per image keyed by (seed, epoch, image index) when augmentation is on (the
default for CIFAR-10; an image folder decodes each batch from its files, with its own random
crops and flips, ``intrain.data.imagefolder``). Evaluation reads the eval split in index order in
batches (``intrain.data.augment.in_order``), so a folder of images is never held in memory whole.

Checkpoints (``intrain.run.checkpoint``): ``checkpoint.pt`` is written atomically at the end of every
epoch (after its evaluation, before its metrics row is appended) and every ``checkpoint_every``
global steps; ``resume(run_dir)`` continues from it so that a run killed at any moment and
resumed ends with the same weights, bit for bit, and the same metrics (except ``seconds``) as an
uninterrupted run. ``metrics.csv`` is rewritten from the checkpoint's rows on resume.

Every method sees the same inputs: ``pixels_to_int8(u8, mean)`` with exponent
``PIXEL_EXPONENT`` as a ``QTensor``, which the method turns into its network's input
(``Method.network_input``: the integers themselves, or for the float twin their real values
``v * 2**PIXEL_EXPONENT`` in float32). Resuming is in ``intrain.run.resume``.

Data parallel (``torchrun --nproc-per-node N -m intrain train ...``, ``intrain.run.dist``): every
process prepares the same run and joins the process group; each global batch (the same batches
as one process, of ``batch_size`` images) is cut into N contiguous shards
(``numeric.collective.shard_range``: sizes differ by at most one, a batch of fewer than N images
leaves some shards empty), process r loads and trains on shard r with the step's reductions done
over all processes (``methods.niti``), so every process holds the one-process weights after
every step. The training metrics are computed from the whole batch's logits and labels
(``dist.gather_batch``: integers, exact), so they are the one-process figures too. Evaluation is
split by whole eval batches (process r takes batches r, r + N, ...; an int8 model's outputs
depend on the batch, so batches are never cut) and the correct counts are summed. Rank 0 alone
writes: the run folder, its lock, ``config.json``, ``metrics.csv``, checkpoints, TensorBoard,
``model.pt``, the log lines and the progress bar; the others write nothing. A checkpoint is the
global state, so any number of processes resumes it (every process reads it).
"""


from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from intrain.data import PIXEL_EXPONENT, DatasetSplits, load_dataset, pixels_to_int8
from intrain.layers import StepContext
from intrain.layers.norm import REBUILD_BATCHES, norm_layers, rebuild_running_statistics
from intrain.methods import Method
from intrain.models.zoo import input_to_hidden_parameters, model_spec
from intrain.numeric import rng
from intrain.numeric.collective import LOCAL, Collective, shard_range
from intrain.numeric.qtensor import QTensor
from intrain.run import checkpoint, dist
from intrain.run.config import ConfigError, TrainConfig, check_args
from intrain.run.files import (TENSORBOARD_DIR, RunFileError, check_out, data_fingerprint, lock_run_dir,
                                make_out_dir, record_files, remove_stale_temp_files, save_json, save_model)
from intrain.run.memory import check_memory
from intrain.run.metrics import MetricsCSV, Running, accuracy, progress


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
    """A checked config with its data, model and method, before anything is written."""

    config: TrainConfig
    splits: DatasetSplits
    model: torch.nn.Module
    method: Method
    out_dir: Path | None  # None: pick runs/<name>-<k> when creating it
    collective: Collective = LOCAL  # the processes of a data-parallel run


#: Without a terminal (stderr to a log file) the progress bar is silent; a line this often says
#: how far a long epoch has got (a ResNet-18 epoch on two cores takes a quarter of an hour).
LOG_PROGRESS_SECONDS = 60


# ----------------------------------------------------------------------------- building

def _build(c: TrainConfig, splits: DatasetSplits, steps_per_epoch: int,
           collective: Collective) -> tuple[torch.nn.Module, Method]:
    """The model and its method for ``c`` (ConfigError when the model does not fit the data)."""
    method_cls = c.method
    options = c.method_options()
    try:
        model = method_cls.build_model(options, c.model, splits.train.image_shape, splits.train.num_classes,
                                       seed=c.seed, width=c.width, device=c.device, hidden=c.hidden,
                                       recurrent=c.recurrent)
    except ValueError as err:
        raise ConfigError(str(err).splitlines()[0] if str(err) else repr(err)) from None
    return model, method_cls(model, options, seed=c.seed, total_steps=c.epochs * steps_per_epoch,
                             collective=collective)


def prepare(config: TrainConfig, resuming: bool = False) -> Prepared:
    """Check everything and load everything; writes nothing (see the module docstring).
    ``resuming``: ``config.out`` is the run being resumed, so it may hold a run. In a
    data-parallel run the output folder is rank 0's to check, and the process group is joined
    last, once every check has passed."""
    c = config.resolved()
    check_args(c)
    rank, world, _ = dist.environment()
    if world > 1 and not c.method.data_parallel:
        raise ConfigError(f"--arith {c.arith} does not train data-parallel: run it in one process, without "
                          "torchrun (only --arith int8 reduces everything it computes over the batch across "
                          "processes, so that N processes give the one-process result)")
    if resuming or rank != 0:
        out_dir = None if c.out is None else Path(c.out)
    else:
        out_dir = check_out(c.out, c.overwrite)
    splits = load_dataset(c.dataset, c.data_dir, c.val_split, c.train_limit, c.image_size,
                          tune_split=c.tune_split)
    if len(splits.train) == 0:
        raise ConfigError(f"the {c.dataset} training set is empty: check --data-dir and --train-limit")
    steps_per_epoch = -(-len(splits.train) // c.batch_size)
    check_memory(c, splits.train.image_shape, splits.train.num_classes)
    collective = dist.from_environment(c.device)
    model, method = _build(c, splits, steps_per_epoch, collective)
    return Prepared(c, splits, model, method, out_dir, collective)


# ----------------------------------------------------------------------------- the loop

def network_input(method: type[Method] | Method, images_u8: torch.Tensor, mean):
    """What ``method``'s network takes for a batch of uint8 images (see the module docstring)."""
    return method.network_input(QTensor.of(pixels_to_int8(images_u8, mean), PIXEL_EXPONENT))


def _predicted_batches(predict, method: type[Method] | Method, dataset, mean, batch_size: int, device,
                       workers: int, every: tuple[int, int] = (0, 1)):
    """``(predicted classes, labels)`` of the batches of ``dataset`` in index order (or of every
    k-th from the r-th, ``every=(r, k)``), both int64 on ``device``."""
    from intrain.data.augment import in_order

    with torch.no_grad():
        for images, labels in in_order(dataset, batch_size, workers, every):
            x = network_input(method, images.to(device), mean)
            yield method.logits_as_float(predict(x)).argmax(dim=1), labels.to(device)


def predictions(predict, method: type[Method] | Method, dataset, mean, batch_size: int, device="cpu",
                workers: int = 0) -> torch.Tensor:
    """Predicted classes (int64, on ``device``) of the images of ``dataset`` in index order, in
    batches of ``batch_size`` (read by ``workers`` loader processes when the data set is decoded
    from files); ``predict`` maps ``method``'s network inputs to logits in eval mode."""
    preds = [pred for pred, _ in _predicted_batches(predict, method, dataset, mean, batch_size, device, workers)]
    if not preds:
        return torch.zeros(0, dtype=torch.int64, device=device)
    return torch.cat(preds)


@contextmanager
def latest_statistics(method: Method, dataset, mean, batch_size: int, seed: int, epoch: int, augment: bool,
                      device="cpu", workers: int = 0, collective: Collective = LOCAL):
    """Within the block, the model's integer batch normalisation holds running statistics rebuilt
    from its current weights (``layers.norm``): over the first ``REBUILD_BATCHES`` batches of
    epoch ``epoch``'s training order, as training read them (augmentation, this process's shard);
    afterwards the statistics gathered in training are back, bit for bit. A model without
    batch normalisation is left as it is."""
    from intrain.data.augment import AugmentedLoader

    layers = norm_layers(method.model)
    if not layers:
        yield
        return
    gathered = [{name: t.clone() for name, t in layer.state_dict().items()} for layer in layers]
    order = rng.permutation(len(dataset), seed, epoch)[:REBUILD_BATCHES * batch_size]
    loader = AugmentedLoader(dataset, order, batch_size, seed, epoch, augment, num_workers=workers,
                             shard=(collective.rank, collective.world))
    inputs = (network_input(method, images.to(device), mean) for images, _, _ in _batches(loader))
    try:
        rebuild_running_statistics(method.model, inputs, StepContext(seed, 0, collective=collective))
        yield
    finally:
        for layer, state in zip(layers, gathered):
            layer.load_state_dict(state)


def evaluate(method: Method, dataset, mean, batch_size: int, device="cpu", workers: int = 0,
             collective: Collective = LOCAL) -> float:
    """Accuracy (percent) on ``dataset`` in index order, in batches of ``batch_size``; the
    processes of ``collective`` share the batches and sum their correct counts.

    The int8 model requantises with a shift chosen per tensor, so its outputs depend on what
    else is in the batch; evaluating with the training batch size in a fixed order keeps the
    figure reproducible and the activation statistics like those of training.
    """
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for pred, labels in _predicted_batches(method.predict, method, dataset, mean, batch_size, device, workers,
                                           (collective.rank, collective.world)):
        correct += (pred == labels).sum()
    return accuracy(int(collective.sum(correct)), len(dataset))


def config_dict(p: Prepared, out_dir: Path) -> dict:
    """config.json: the resolved options (the method's beside the common ones) and the data."""
    d = p.config.as_flat_dict()
    d.update(out=str(out_dir), eval_name=p.splits.eval_name, train_size=len(p.splits.train),
             eval_size=len(p.splits.eval), image_shape=list(p.splits.train.image_shape),
             num_classes=p.splits.train.num_classes, torch_version=str(torch.__version__),
             channel_mean=None if p.splits.channel_mean is None else list(p.splits.channel_mean),
             data_fingerprint=data_fingerprint(p.splits))
    parameters = input_to_hidden_parameters(
        model_spec(p.config.model, p.splits.train.image_shape, p.splits.train.num_classes, p.config.width,
                   p.config.hidden, p.config.recurrent))
    if parameters is not None:
        d["input_to_hidden_parameters"] = parameters
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
    """A SummaryWriter in ``out_dir/tensorboard`` when tensorboard is installed, else None; the
    folder (when this run creates it) and the event file go into the run's manifest."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    folder = out_dir / TENSORBOARD_DIR
    before = set(folder.iterdir()) if folder.is_dir() else None
    try:
        board = SummaryWriter(log_dir=str(folder), purge_step=purge_step)
    except Exception:
        return None
    made = [f"{TENSORBOARD_DIR}/{p.name}" for p in sorted(folder.iterdir()) if p not in (before or ())]
    record_files(out_dir, *made, *([] if before is not None else [f"{TENSORBOARD_DIR}/"]))
    return board


@dataclass
class Start:
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
    payload = {"format": checkpoint.MAGIC.decode().strip(), "version": checkpoint.VERSION,
               "train_config": asdict(p.config), "config": cfg, "seed": p.config.seed}
    payload.update(position)
    payload.update(checkpoint.method_state(p.model, p.method))
    checkpoint.save(checkpoint.checkpoint_path(out_dir), payload)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; ``run_dir`` is the folder to ``--resume`` (see ``intrain.cli``)."""

    def __init__(self, run_dir: Path):
        super().__init__(str(run_dir))
        self.run_dir = run_dir


def _resume_hint(out_dir: Path) -> str:
    if checkpoint.checkpoint_path(out_dir).is_file():
        return f"continue with intrain train --resume {out_dir}"
    return f"no checkpoint was written yet: start again with --out {out_dir} --overwrite"


def train_prepared(p: Prepared, log=None, start: Start | None = None, cfg: dict | None = None,
                   out_dir: Path | None = None) -> RunResult:
    """Create and lock the output directory and run the training prepared by ``prepare``;
    progress lines go to ``log`` (default: ``sys.stderr``). ``start``/``cfg``/``out_dir`` are
    given by ``resume`` to continue a run (the model and method already restored).

    The folder's lock (``intrain.run.lock``) is held from before the first write to the end;
    what the run writes is listed in the folder's manifest first (``intrain.run.files``). In a
    data-parallel run only rank 0 does any of that; the others train and write nothing."""
    c = p.config
    if p.collective.rank != 0:
        return _train(p, log, start, cfg, out_dir)
    if start is None:
        out_dir, held = make_out_dir(p.out_dir, c.overwrite, f"{c.dataset}-{c.model}-{c.arith}")
        cfg = config_dict(p, out_dir)
    else:
        held = lock_run_dir(out_dir, "intrain train --resume")
    try:
        remove_stale_temp_files(out_dir)
        record_files(out_dir, "config.json", "metrics.csv", "checkpoint.pt", "model.pt")
        save_json(out_dir / "config.json", cfg)
        return _train(p, log, start, cfg, out_dir)
    except KeyboardInterrupt:
        raise RunInterrupted(out_dir) from None
    except RunFileError as err:
        raise RunFileError(f"{err}; {_resume_hint(out_dir)}") from None
    finally:
        held.release()


def _train(p: Prepared, log, start: Start | None, cfg: dict | None, out_dir: Path | None) -> RunResult:
    """The loop of ``train_prepared``, in the locked folder whose config.json is written (rank 0;
    the other processes of a data-parallel run write nothing, see the module docstring)."""
    from intrain.data.augment import AugmentedLoader

    c, splits, method, collective = p.config, p.splits, p.method, p.collective
    writes = collective.rank == 0
    log = sys.stderr if log is None else log

    def say(line: str) -> None:
        if writes:
            print(line, file=log)

    resuming = start is not None
    start = Start() if start is None else start
    metrics = MetricsCSV(out_dir / "metrics.csv") if writes else None  # on resume: rewritten from the checkpoint's rows
    for row in start.rows if writes else ():
        metrics.append(**row)
    what = (f"resuming at epoch {start.epoch + 1}, batch {start.batch}" if resuming else
            f"{c.epochs} epochs of batch {c.batch_size}")
    processes = f" over {collective.world} processes" if collective.world > 1 else ""
    say(f"intrain: {c.arith} {c.model} on {c.dataset}: {len(splits.train)} training images, "
        f"{len(splits.eval)} {splits.eval_name} images, {what}{processes} -> {out_dir}")
    if cfg and "input_to_hidden_parameters" in cfg:  # cfg: rank 0 only
        say(f"intrain: {c.model} input-to-hidden parameters: {cfg['input_to_hidden_parameters']}")

    dev = torch.device(c.device)
    mean, n, bs = splits.channel_mean, len(splits.train), c.batch_size
    n_batches = -(-n // bs)
    rows, step = list(start.rows), start.global_step
    eval_acc = rows[-1]["eval_acc"] if rows else None
    board = _tensorboard(out_dir, start.epoch + 1 if resuming else None) if writes else None
    try:
        for epoch in range(start.epoch, c.epochs):
            first_batch = start.batch if epoch == start.epoch else 0
            carried = start.seconds if epoch == start.epoch else 0.0
            t0 = last_line = time.perf_counter()
            running = _restore_running(start.running if epoch == start.epoch else None, dev)
            if first_batch == 0:  # a resumed partial epoch keeps its checkpointed method state
                method.begin_epoch(epoch)
            order = rng.permutation(n, c.seed, epoch)
            loader = AugmentedLoader(splits.train, order, bs, c.seed, epoch, c.augment, num_workers=c.workers,
                                     start_batch=first_batch, shard=(collective.rank, collective.world))
            with progress(n_batches, f"epoch {epoch + 1}/{c.epochs}", shown=writes) as bar:
                bar.update(first_batch)
                for b, (images, labels, _) in enumerate(_batches(loader), start=first_batch):
                    y = labels.to(dev, non_blocking=True)
                    x = network_input(method, images.to(dev, non_blocking=True), mean)
                    if collective.world == 1:
                        logits = method.train_step(x, y, step, epoch)
                    else:  # only data-parallel methods get here (prepare), and they take the offset
                        rows_in_batch = min(bs, n - b * bs)
                        first, _ = shard_range(rows_in_batch, collective.rank, collective.world)
                        logits = method.train_step(x, y, step, epoch, sample_offset=first)
                        # the whole batch's logits and labels, for the metrics
                        logits = QTensor(dist.gather_batch(collective, logits.v, rows_in_batch, first), logits.e)
                        y = dist.gather_batch(collective, y, rows_in_batch, first)
                    running.update(method.logits_as_float(logits), y)
                    step += 1
                    bar.update(1)
                    if not bar.disable and (step % 20 == 0 or b + 1 == n_batches):
                        bar.set_postfix(loss=f"{running.loss:.4f}", acc=f"{running.acc:.2f}%", refresh=False)
                    elif bar.disable and time.perf_counter() - last_line >= LOG_PROGRESS_SECONDS and b + 1 < n_batches:
                        say(f"epoch {epoch + 1}/{c.epochs}: batch {b + 1}/{n_batches}, loss {running.loss:.4f}, "
                            f"train {running.acc:.2f}% so far")
                        last_line = time.perf_counter()
                    if writes and c.checkpoint_every and step % c.checkpoint_every == 0 and b + 1 < n_batches:
                        _save_resume(out_dir, p, cfg, dict(
                            epoch=epoch, batch=b + 1, global_step=step, rows=rows,
                            running=_running_state(running),
                            seconds=carried + time.perf_counter() - t0))
            method.end_epoch(epoch, c.epochs)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds = carried + time.perf_counter() - t0
            # int8: the mean weights (intrain.methods.averaging); batch normalisation's statistics
            # of the weights evaluated
            with method.averaged(), latest_statistics(method, splits.train, mean, bs, c.seed, epoch, c.augment, dev,
                                                      c.workers, collective):
                eval_acc = evaluate(method, splits.eval, mean, bs, dev, c.workers, collective)
            row = dict(epoch=epoch + 1, train_loss=running.loss, train_acc=running.acc, eval_acc=eval_acc,
                       seconds=seconds)
            rows.append(row)
            if writes:
                _save_resume(out_dir, p, cfg, dict(epoch=epoch + 1, batch=0, global_step=step, rows=rows,
                                                   running=None, seconds=0.0))
                metrics.append(**row)
            if board is not None:
                for key in ("train_loss", "train_acc", "eval_acc"):
                    board.add_scalar(f"{key}/{c.arith}", row[key], epoch + 1)
                board.flush()
            say(f"epoch {epoch + 1}/{c.epochs}: loss {row['train_loss']:.4f}, train {row['train_acc']:.2f}%, "
                f"{splits.eval_name} {eval_acc:.2f}%, {seconds:.1f}s")
    finally:
        if board is not None:
            board.close()
    if eval_acc is None:  # zero epochs: report the untrained model
        eval_acc = evaluate(method, splits.eval, mean, bs, dev, c.workers, collective)
    if c.epochs > 0:  # every process takes part in the rebuilding; rank 0 writes
        with method.averaged(), latest_statistics(method, splits.train, mean, bs, c.seed, c.epochs - 1, c.augment,
                                                  dev, c.workers, collective):
            if writes:
                save_model(out_dir / "model.pt", cfg, p.model)
    elif writes:
        with method.averaged():
            save_model(out_dir / "model.pt", cfg, p.model)
    return RunResult(out_dir=out_dir, eval_acc=eval_acc, eval_name=splits.eval_name, rows=rows, config=cfg)


def run(config: TrainConfig, log=None) -> RunResult:
    """Check, load, train, save (see the module docstring). Raises ConfigError or DataError
    for bad input, before anything is written."""
    return train_prepared(prepare(config), log=log)
