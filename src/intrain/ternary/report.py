"""Evaluating a ternary run, and what its model costs beside the 8-8 model of the same network.

``evaluate_ternary_run(run_dir, residuals)`` loads the ternary model (``ternary.convert``), keeps
the first ``round(residuals * kept)`` of its ranked residual edges on (1: all it was converted
with; 0: the plain 8-2 model) and evaluates it exactly as ``intrain eval`` evaluates a run (the
run's eval split, batch size and order; the source's integer channel mean), writing ``eval.json``.

Costs per image (``model_costs``), counted over the weighted layers only (requantisation, ReLU,
pooling are the same in both models), P = output positions of a layer (1 for a linear layer):

* 8-8: 8 bits per weight and 8 per layer exponent; one multiplication and one addition per
  weight and output position (a multiply-accumulate).
* 8-2: per group-edge that is on, ``2 * n_g`` bits of ternary weights and an 8-bit scale, 8 bits per
  edge exponent in use, 16 bits per bias value when the model has biases; per output position,
  one addition or subtraction per non-zero ternary weight of an edge that is on, and per group-edge
  one multiplication by its scale and one addition of the product into the output. Zero ternary
  weights cost nothing (they are skipped); edges that are switched off are neither stored nor
  computed. Aligning edges by shifts is not counted (shifts of one value per output).
"""

from __future__ import annotations

from pathlib import Path

import torch

from intrain.data import load_dataset
from intrain.layers.ternary import set_active_residuals
from intrain.methods import get_method
from intrain.numeric.qtensor import QTensor
from intrain.run.config import ConfigError
from intrain.run.evaluate import confusion_matrix
from intrain.run.files import (EVAL_FILE, check_creatable, lock_run_dir, read_config, read_model, record_files,
                                same_json, save_json)
from intrain.run.lock import RunFolderBusy, holder
from intrain.run.loop import predictions
from intrain.run.metrics import accuracy
from intrain.models import build_int_model
from intrain.ternary.convert import ternary_layers, ternary_skeleton
from intrain.ternary.quantize import ALPHA_BITS

WEIGHT_BITS = 8
EXPONENT_BITS = 8
BIAS_BITS = 16


def output_positions(model: torch.nn.Module, image_shape) -> list[int]:
    """Per ternary layer, the output positions per image (one forward of a zero image)."""
    sizes = []

    def hook(module, args, out):
        sizes.append(out.v[0, 0].numel())

    handles = [layer.register_forward_hook(hook) for layer in ternary_layers(model)]
    try:
        with torch.no_grad():
            model(QTensor.of(torch.zeros((1, *image_shape), dtype=torch.int8), 0))
    finally:
        for h in handles:
            h.remove()
    return sizes


def model_costs(model: torch.nn.Module, image_shape) -> dict:
    """Bits, multiplications and additions per image of the ternary ``model`` as switched now,
    and of the 8-8 model of the same network (see the module docstring)."""
    positions = output_positions(model, image_shape)
    costs = dict(bits=0, mults=0, adds=0, bits_8_8=0, mults_8_8=0, adds_8_8=0)
    for layer, p in zip(ternary_layers(model), positions):
        on = layer.edge_on()
        weights = layer.out_features * layer.fan_in
        costs["bits_8_8"] += WEIGHT_BITS * weights + EXPONENT_BITS
        costs["mults_8_8"] += p * weights
        costs["adds_8_8"] += p * weights
        nonzero = int(((layer.ternary != 0) & on[..., None]).sum())
        group_edges = int(on.sum())
        group_len = torch.full((layer.alpha.shape[2],), layer.group_size, dtype=torch.int64)
        group_len[-1] = layer.fan_in - layer.group_size * (layer.alpha.shape[2] - 1)
        costs["bits"] += int((on * (2 * group_len + ALPHA_BITS)).sum())
        costs["bits"] += EXPONENT_BITS * int(on.flatten(1).any(dim=1).sum())
        if layer.bias is not None:
            costs["bits"] += BIAS_BITS * layer.out_features
        costs["mults"] += p * group_edges
        costs["adds"] += p * (nonzero + group_edges)
    return costs


def load_ternary_model(cfg: dict, saved: dict, run_dir: Path, product: str = "dense") -> torch.nn.Module:
    section = cfg["ternary"]
    try:
        int_model = build_int_model(cfg["model"], tuple(cfg["image_shape"]), int(cfg["num_classes"]),
                                    seed=int(cfg["seed"]), width=float(cfg.get("width") or 1.0),
                                    hidden=cfg.get("hidden"))
        model = ternary_skeleton(int_model, int(section["group_size"]), int(section["max_edges"]),
                                 bool(section["bias"]), product=product)
        model.load_state_dict(saved["state_dict"])
    except (ValueError, RuntimeError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{run_dir / 'model.pt'} does not fit the ternary model in {run_dir / 'config.json'} "
                          f"({first})") from None
    return model


def is_ternary_run(run_dir) -> bool:
    """True when ``run_dir`` holds a readable config with a ``"ternary"`` section."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return False
    try:
        return "ternary" in read_config(Path(run_dir))
    except (ConfigError, OSError, ValueError):
        return False


def evaluate_ternary_run(run_dir, residuals: float | None = None, batch_size: int | None = None,
                         write: bool = True, product: str = "dense") -> dict:
    """Evaluate the ternary run in ``run_dir`` with the given fraction of its residual edges on."""
    run_dir = Path(run_dir)
    if residuals is not None and not 0 <= residuals <= 1:
        raise ConfigError(f"--residuals must be a fraction between 0 and 1, got {residuals}")
    cfg = read_config(run_dir)
    if "ternary" not in cfg:
        raise ConfigError(f"{run_dir} holds no ternary model: --residuals needs a run made by intrain ternarize")
    saved = read_model(run_dir)
    if not same_json(cfg, saved.get("config")):
        raise ConfigError(f"{run_dir / 'config.json'} is damaged or was edited: it differs from the config "
                          f"recorded in {run_dir / 'model.pt'}")
    if write:
        busy = holder(run_dir)
        if busy is not None:
            raise RunFolderBusy(f"run directory {run_dir} is in use by {busy}: evaluate it when that has finished")
        check_creatable(run_dir, "run directory", f"intrain eval writes {EVAL_FILE} there")
    model = load_ternary_model(cfg, saved, run_dir, product)
    kept = int(cfg["ternary"]["residual_edges"])
    active = kept if residuals is None else int(round(residuals * kept))
    set_active_residuals(model, active)
    splits = load_dataset(cfg["dataset"], cfg.get("data_dir"), cfg.get("val_split"), cfg.get("train_limit"))
    mean = cfg.get("channel_mean")
    mean = None if mean is None else tuple(int(m) for m in mean)
    bs = int(cfg["batch_size"]) if batch_size is None else batch_size
    preds = predictions(model, get_method("int8"), splits.eval, mean, bs, "cpu")
    classes = int(cfg["num_classes"])
    matrix = confusion_matrix(splits.eval.labels, preds, classes)
    correct = sum(matrix[i][i] for i in range(classes))
    result = dict(run=str(run_dir), dataset=cfg["dataset"], model=cfg["model"], arith="8-2",
                  source_arith=cfg["ternary"]["source_arith"], source_eval_acc=cfg["ternary"]["source_eval_acc"],
                  eval_name=splits.eval_name, eval_size=len(splits.eval), batch_size=bs, correct=correct,
                  accuracy=accuracy(correct, len(splits.eval)), residual_edges_on=active, residual_edges=kept,
                  groups=int(cfg["ternary"]["groups"]), confusion=matrix,
                  **model_costs(model, tuple(cfg["image_shape"])))
    if write:
        with lock_run_dir(run_dir, "intrain eval"):
            record_files(run_dir, EVAL_FILE)
            save_json(run_dir / EVAL_FILE, result)
    return result
