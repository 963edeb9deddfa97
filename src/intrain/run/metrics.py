"""Run bookkeeping: the per-epoch ``metrics.csv``, running loss/accuracy, progress bars.

Nothing here takes part in a training step: losses are computed in float from the logits,
for people to read.
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from intrain.run.files import RunFileError, reason

#: The columns of ``metrics.csv``, in order.
COLUMNS = ("epoch", "train_loss", "train_acc", "eval_acc", "seconds")


def format_row(epoch: int, train_loss: float, train_acc: float, eval_acc: float, seconds: float) -> list[str]:
    """One row of ``metrics.csv`` as written: accuracies in percent, ``seconds`` of training."""
    return [str(epoch), f"{train_loss:.6f}", f"{train_acc:.4f}", f"{eval_acc:.4f}", f"{seconds:.3f}"]


class MetricsCSV:
    """Writes ``metrics.csv``: the header on creation, one flushed row per epoch. An operating-system
    error is a one-line ``RunFileError``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._write("w", COLUMNS)

    def append(self, epoch: int, train_loss: float, train_acc: float, eval_acc: float, seconds: float) -> None:
        """Append one epoch's row; accuracies in percent, ``seconds`` the epoch's training time."""
        self._write("a", format_row(epoch, train_loss, train_acc, eval_acc, seconds))

    def _write(self, mode: str, row) -> None:
        try:
            with open(self.path, mode, newline="") as f:
                csv.writer(f).writerow(row)
                f.flush()
        except OSError as err:
            raise RunFileError(f"cannot write {self.path} ({reason(err)})") from None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Read ``metrics.csv`` back as a list of dicts (``epoch`` int, the rest float)."""
    with open(path, newline="") as f:
        return [
            {k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


class Running:
    """Sample-weighted running mean of the float cross-entropy and the accuracy (percent).

    Sums stay on the logits' device; reading ``loss``/``acc`` is the only host sync, so on a
    GPU the caller decides how often to pay for it.
    """

    def __init__(self) -> None:
        self.n = 0
        self.loss_sum: torch.Tensor | float = 0.0
        self.correct: torch.Tensor | int = 0

    def update(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch of float logits ``[B, classes]`` with labels ``y``."""
        logits = logits.detach().float()
        self.loss_sum = self.loss_sum + F.cross_entropy(logits, y, reduction="sum").double()
        self.correct = self.correct + (logits.argmax(dim=1) == y).sum()
        self.n += int(y.shape[0])

    @property
    def loss(self) -> float:
        return float(self.loss_sum) / self.n if self.n else float("nan")

    @property
    def acc(self) -> float:
        return accuracy(int(self.correct), self.n)


def progress(total: int, desc: str, shown: bool = True) -> tqdm:
    """A per-epoch progress bar on stderr; silent when stderr is not a terminal (logs, tests) or
    not ``shown`` (the processes of a data-parallel run other than rank 0)."""
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=None if shown else True)


def accuracy(correct: int, n: int) -> float:
    """Percent correct, ``nan`` for an empty set."""
    return 100.0 * correct / n if n else float("nan")
