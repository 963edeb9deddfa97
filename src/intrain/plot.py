"""``intrain plot``: training curves of one or more runs on one figure (matplotlib, Agg).

Top panel: train accuracy (dashed) and eval accuracy (solid) by epoch; bottom panel: train loss.
Each run gets one colour and is labelled ``<run dir name> (<arith>)``, so an int8 run and its
float32 twin compare at a glance. The figure is rendered off screen (no pyplot, no display) and
written atomically; an existing file is only replaced with ``overwrite``. Each run's
``metrics.csv`` is checked against the rows its checksummed ``checkpoint.pt`` recorded.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from intrain.run import checkpoint
from intrain.run.config import ConfigError
from intrain.run.files import RunFileError, atomic_write, check_creatable, reason
from intrain.run.metrics import format_row, read_metrics


def _label(run_dir: Path) -> str:
    name = run_dir.resolve().name
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
        return f"{name} ({cfg['arith']} {cfg['model']})"
    except Exception:  # a label is cosmetic: fall back to the directory name
        return name


def _read_run(run_dir: Path) -> list[dict]:
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    path = run_dir / "metrics.csv"
    if not path.is_file():
        raise ConfigError(f"no {path}: pass run directories written by intrain train")
    try:
        rows = read_metrics(path)
    except OSError as err:
        raise RunFileError(f"cannot read {path} ({reason(err)})") from None
    except (ValueError, KeyError, TypeError, AttributeError, csv.Error) as err:
        raise ConfigError(f"cannot read {path} ({type(err).__name__}): the file is damaged") from None
    if not rows:
        raise ConfigError(f"{path} holds no epochs yet: nothing to plot")
    needed = ("epoch", "train_loss", "train_acc", "eval_acc")
    if any(k not in rows[0] for k in needed):
        raise ConfigError(f"{path} lacks the columns {', '.join(needed)}")
    _check_against_checkpoint(run_dir, path)
    return rows


def _check_against_checkpoint(run_dir: Path, path: Path) -> None:
    """``metrics.csv`` must hold the rows ``checkpoint.pt`` recorded (under its checksum), as
    written: all of them, or all but the last (the row is appended just after the checkpoint).
    A run without a usable checkpoint is not checked."""
    try:
        recorded = checkpoint.load(checkpoint.checkpoint_path(run_dir))["rows"]
    except checkpoint.CheckpointError:
        return
    with open(path, newline="") as f:
        written = list(csv.reader(f))[1:]
    expected = [format_row(**row) for row in recorded]
    if not (len(expected) - 1 <= len(written) <= len(expected) and written == expected[:len(written)]):
        raise ConfigError(f"{path} is damaged or was edited: it differs from the rows recorded in "
                          f"{checkpoint.checkpoint_path(run_dir)} (intrain train --resume {run_dir} rewrites it)")


def plot_runs(runs, output, overwrite: bool = False) -> Path:
    """Draw the curves of ``runs`` (directories) into ``output``; returns its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    out = Path(output)
    fmt = out.suffix.lower().lstrip(".")
    fig = Figure(figsize=(8, 7.5))
    supported = FigureCanvasAgg(fig).get_supported_filetypes()
    if fmt not in supported:
        raise ConfigError(f"cannot tell the image format of {out}: end the name with one of "
                          f"{', '.join('.' + k for k in sorted(supported))}")
    if out.is_dir():
        raise ConfigError(f"{out} is a directory: pass a file name to -o")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists: pass --overwrite to replace it")
    if out.parent.exists() and not out.parent.is_dir():
        raise ConfigError(f"{out.parent} is a file, not a folder: choose another -o")
    if not out.parent.is_dir():
        raise ConfigError(f"folder {out.parent} does not exist: create it or choose another -o")
    check_creatable(out.parent, "into folder", "choose another -o")
    data = [(_label(Path(r)), _read_run(Path(r))) for r in runs]

    acc_ax, loss_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for i, (label, rows) in enumerate(data):
        color = f"C{i % 10}"
        epochs = [r["epoch"] for r in rows]
        acc_ax.plot(epochs, [r["eval_acc"] for r in rows], color=color, marker="o", markersize=3,
                    label=f"{label} eval")
        acc_ax.plot(epochs, [r["train_acc"] for r in rows], color=color, linestyle="--", label=f"{label} train")
        loss_ax.plot(epochs, [r["train_loss"] for r in rows], color=color, label=label)
    acc_ax.set_ylabel("accuracy (%)")
    acc_ax.set_title("train (dashed) and eval (solid) accuracy")
    acc_ax.grid(True, alpha=0.3)
    acc_ax.legend(fontsize="small")
    loss_ax.set_ylabel("train loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    try:
        atomic_write(out, lambda f: f.write(buf.getvalue()))
    except RunFileError as err:
        raise RunFileError(f"{err}: choose another -o") from None
    return out
