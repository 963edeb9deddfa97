"""``intrain eval``: accuracy and confusion matrix of a saved run.

``evaluate_run(run_dir)`` rebuilds the run's model from ``config.json`` (model, width, image shape,
classes), loads ``model.pt`` and evaluates it exactly as training evaluated it: the same eval
split (the run's dataset, data folder, ``val_split`` and ``train_limit`` unless overridden), the
run's integer channel mean, the run's batch size (the int8 model requantises per batch, so its
predictions depend on the batch composition) and the same order. With the defaults the accuracy
therefore equals the run's last ``eval_acc``. The confusion matrix has one row per true class and
one column per predicted class; it and the accuracy go to ``<run>/eval.json`` (written while the
run folder is locked, and listed in the folder's manifest so that ``--overwrite`` removes it).
``config.json`` and ``model.pt`` are checked for damage before they are used. An image folder is
decoded at the run's ``image_size`` (centre crops), by ``workers`` loader processes (default: the
run's ``--workers``; the result is the same for any number).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from intrain.data import load_dataset
from intrain.methods import get_method
from intrain.models.zoo import RecurrentOptions
from intrain.run.config import ConfigError
from intrain.run import checkpoint
from intrain.run.files import (EVAL_FILE, check_creatable, lock_run_dir, read_config, read_model, record_files,
                                same_json, save_json)
from intrain.run.lock import RunFolderBusy, holder
from intrain.run.loop import predictions
from intrain.run.metrics import accuracy


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> list[list[int]]:
    """``m[t][p]``: how many images of true class ``t`` were predicted as ``p``."""
    flat = labels.cpu().to(torch.int64) * num_classes + preds.cpu().to(torch.int64)
    counts = torch.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).tolist()


def format_confusion(matrix: list[list[int]]) -> str:
    """The matrix as a text table, class numbers along both edges (rows true, columns predicted)."""
    k = len(matrix)
    cell = max([len(str(v)) for row in matrix for v in row] + [len(str(k - 1)), 2])
    lines = ["true\\pred " + " ".join(f"{j:>{cell}}" for j in range(k))]
    for i, row in enumerate(matrix):
        lines.append(f"{i:>9} " + " ".join(f"{v:>{cell}}" for v in row))
    return "\n".join(lines)


def evaluate_run(run_dir, dataset: str | None = None, data_dir: str | None = None, val_split: int | None = None,
                 batch_size: int | None = None, write: bool = True, workers: int | None = None) -> dict:
    """Evaluate the run in ``run_dir`` (see the module docstring); returns what eval.json holds."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        if run_dir.exists():
            raise ConfigError(f"{run_dir} is not a directory: pass a run directory to --run")
        raise ConfigError(f"run directory {run_dir} does not exist: pass a run directory to --run")
    if not write:
        return _evaluate(run_dir, dataset, data_dir, val_split, batch_size, workers)
    busy = holder(run_dir)
    if busy is not None:
        raise RunFolderBusy(f"run directory {run_dir} is in use by {busy}: evaluate it when that has finished")
    check_creatable(run_dir, "run directory", f"intrain eval writes {EVAL_FILE} there; copy the run somewhere "
                    "writable and evaluate the copy")
    result = _evaluate(run_dir, dataset, data_dir, val_split, batch_size, workers)  # reads model.pt once, whole
    with lock_run_dir(run_dir, "intrain eval"):
        record_files(run_dir, EVAL_FILE)
        save_json(run_dir / EVAL_FILE, result)
    return result


def _check_config(run_dir: Path, cfg: dict, saved: dict) -> None:
    """``config.json`` must be the config ``model.pt`` recorded (under its checksum), or, when a
    resume that moved the run or its data was stopped before writing a new ``model.pt``, the one
    in ``checkpoint.pt``."""
    if same_json(cfg, saved.get("config")):
        return
    path = checkpoint.checkpoint_path(run_dir)
    try:
        if path.is_file() and same_json(cfg, checkpoint.load(path)["config"]):
            return
    except checkpoint.CheckpointError:
        pass
    raise ConfigError(f"{run_dir / 'config.json'} is damaged or was edited: it differs from the config recorded in "
                      f"{run_dir / 'model.pt'}")


@dataclass
class LoadedRun:
    """A saved run's trained model with what evaluating it takes (see ``load_run``)."""

    config: dict
    method: type
    model: torch.nn.Module
    splits: object  # data.Splits: the training split and the eval split chosen
    mean: tuple | None  # the run's integer channel mean
    batch_size: int
    device: str
    workers: int


def recurrent_options(cfg: dict) -> RecurrentOptions:
    """The recurrent models' options of a run's ``config.json`` (all None for other models)."""
    return RecurrentOptions(cfg.get("tr_rank"), cfg.get("tr_input_factors"), cfg.get("tr_hidden_factors"),
                            cfg.get("lstm_forget_bias"))


def load_run(run_dir: Path, dataset=None, data_dir=None, val_split=None, batch_size=None, workers=None) -> LoadedRun:
    """The run's model (in eval mode) loaded from ``model.pt``, its data splits and evaluation
    settings: the run's unless overridden (see the module docstring)."""
    cfg = read_config(run_dir)
    saved = read_model(run_dir)
    _check_config(run_dir, cfg, saved)
    same_data = dataset is None or dataset == cfg["dataset"]
    name = cfg["dataset"] if dataset is None else dataset
    if same_data:
        data_dir = cfg.get("data_dir") if data_dir is None else data_dir
        # an explicit --val-split asks for the validation split, not the run's tuning split
        tune_split = cfg.get("tune_split") if val_split is None else None
        val_split = cfg.get("val_split") if val_split is None else val_split
        train_limit = cfg.get("train_limit")
    else:
        train_limit = tune_split = None
    image_size = None
    if name in ("imagefolder", "moving-mnist-actions"):  # the run's crop / frame size (an image folder is decoded at the size the model takes)
        image_size = cfg.get("image_size") or int(cfg["image_shape"][-1])
    splits = load_dataset(name, data_dir, val_split, train_limit, image_size, tune_split=tune_split)
    shape, classes = tuple(cfg["image_shape"]), int(cfg["num_classes"])
    if splits.eval.image_shape != shape or splits.eval.num_classes != classes:
        raise ConfigError(f"the model in {run_dir} takes {'x'.join(map(str, shape))} images and {classes} classes, "
                          f"{name} has {'x'.join(map(str, splits.eval.image_shape))} and {splits.eval.num_classes}")
    mean = cfg["channel_mean"] if "channel_mean" in cfg else splits.channel_mean
    mean = None if mean is None else tuple(int(m) for m in mean)
    bs = int(cfg["batch_size"]) if batch_size is None else batch_size
    device = "cuda" if cfg.get("device") == "cuda" and torch.cuda.is_available() else "cpu"
    width = float(cfg.get("width") or 1.0)
    try:
        method = get_method(cfg["arith"])
        given = {k: cfg[k] for k in method.option_names() if cfg.get(k) is not None}
        if "backend" in given:  # every backend gives the same bits; the run's may not suit this device
            given["backend"] = "auto"
        options = method.make_options(given, {})
        model = method.build_model(options, cfg["model"], shape, classes, seed=int(cfg["seed"]), width=width,
                                   device=device, hidden=cfg.get("hidden"), recurrent=recurrent_options(cfg))
        model.load_state_dict(saved["state_dict"])
    except (ValueError, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{run_dir / 'model.pt'} does not fit the model in {run_dir / 'config.json'} ({first})") from None
    model.eval()
    workers = int(cfg.get("workers") or 0) if workers is None else workers
    return LoadedRun(cfg, method, model, splits, mean, bs, device, workers)


def _evaluate(run_dir: Path, dataset, data_dir, val_split, batch_size, workers) -> dict:
    run = load_run(run_dir, dataset, data_dir, val_split, batch_size, workers)
    cfg, splits, classes, bs = run.config, run.splits, int(run.config["num_classes"]), run.batch_size
    name = cfg["dataset"] if dataset is None else dataset
    preds = predictions(run.model, run.method, splits.eval, run.mean, bs, run.device, run.workers)
    matrix = confusion_matrix(splits.eval.labels, preds, classes)
    correct = sum(matrix[i][i] for i in range(classes))
    result = dict(run=str(run_dir), dataset=name, model=cfg["model"], arith=cfg["arith"],
                  eval_name=splits.eval_name, eval_size=len(splits.eval), batch_size=bs, correct=correct,
                  accuracy=accuracy(correct, len(splits.eval)), confusion=matrix)
    return result
