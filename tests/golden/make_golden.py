"""Golden results of short training runs: writes ``tests/golden/golden.json``.

    REGENERATE golden.json ONLY FOR AN INTENDED CHANGE OF BEHAVIOUR (different weights, metrics
    or printed accuracy), never to make ``tests/test_golden.py`` pass after a refactoring: that
    test exists to prove that restructurings keep every result bit for bit. When you do
    regenerate, commit golden.json on its own and say in the commit message which change of
    behaviour made the new numbers, and why it is intended.

    Run from the repository root, with intrain importable (pip install -e . or PYTHONPATH=src):
        OMP_NUM_THREADS=1 python tests/golden/make_golden.py

Each job in ``GOLDEN_JOBS`` is a short ``intrain train`` run through the public entry point
(``intrain.cli.main``) in a temporary directory. For each job the file pins:

* ``model.pt``: every tensor of its ``state_dict``;
* ``checkpoint.pt``: every tensor of its ``state_dict`` and, for int8 runs, of its
  ``weight_average`` (the integer weight sums and their count);
* ``metrics``: the rows of ``metrics.csv`` as written (strings), without the ``seconds`` column;
* ``last_line``: the last line printed on stdout, ``eval_acc=NN.NN``.

An integer tensor is pinned by the sha256 of its bytes (with dtype and shape), so int8 runs are
checked bit for bit. A float tensor (the float32 twin) is pinned by its float64 sum, the sum of
its absolute values and its first values, which the test compares with a tolerance: float
results differ in the last bits between CPUs (AVX2 and AVX-512 kernels sum in different orders)
and thread counts.

Some jobs are pinned to another job's entry instead of their own (``same_as``): a run killed
mid-epoch and resumed with ``--resume``, and the reference integer kernels, must both give
exactly the results of the plain run. ``inputs`` pins the data the jobs train on (scikit-learn's
digits and the MNIST-format files generated here), so that a changed input is reported as such
rather than as changed weights.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import json
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch

GOLDEN_PATH = Path(__file__).with_name("golden.json")

#: Sizes of the generated MNIST-format data set (sklearn digits upscaled to 28x28).
MNIST_TRAIN_IMAGES = 320
MNIST_TEST_IMAGES = 200


@dataclass(frozen=True)
class GoldenJob:
    """One ``intrain train`` run whose results are pinned."""

    name: str
    #: ``intrain train`` options, without ``--out`` (and without ``--data-dir`` for mnist jobs).
    args: tuple[str, ...]
    #: Train on the generated MNIST-format set (``--dataset mnist --data-dir <it>``).
    mnist: bool = False
    #: Compare with this job's golden entry instead of recording one of its own.
    same_as: str | None = None
    #: Crash the run (in-process) when it reaches this global step, then ``--resume`` it.
    crash_at_step: int | None = None

    @property
    def is_float(self) -> bool:
        """Trains the float32 twin (``--arith float``): compared with tolerances."""
        return any(option == "--arith" and value == "float" for option, value in zip(self.args, self.args[1:]))


_DIGITS_SHORT = ("--epochs", "2", "--batch-size", "32")

GOLDEN_JOBS = (
    # Recipe defaults: weight-average phase, 8-bit weights, nearest error rounding.
    GoldenJob("digits-mlp-int8", _DIGITS_SHORT),
    GoldenJob("digits-mlp-int8-weight16", (*_DIGITS_SHORT, "--weight-bits", "16", "--weight-average", "none",
                                           "--mu-schedule", "0:2,1:1")),
    GoldenJob("digits-mlp-int8-stochastic", (*_DIGITS_SHORT, "--error-rounding", "stochastic",
                                             "--weight-average", "epoch")),
    GoldenJob("digits-mlp-float", (*_DIGITS_SHORT, "--arith", "float")),
    # mu changes after the first epoch, so the phase average restarts mid-run.
    GoldenJob("mnist-lenet5-int8", ("--model", "lenet5", "--epochs", "2", "--batch-size", "32",
                                    "--mu-schedule", "0:5,1:4"), mnist=True),
    # Batch 8 and lr 0.05: the float LeNet-5 learns within these few steps (57 % test accuracy).
    GoldenJob("mnist-lenet5-float", ("--model", "lenet5", "--epochs", "2", "--batch-size", "8",
                                     "--lr", "0.05", "--arith", "float"), mnist=True),
    # 45 steps per epoch, a checkpoint every 5 steps: the crash in the 63rd step (0-based step 62,
    # in epoch 2) leaves the checkpoint written after 60 steps, so the resume starts mid-epoch,
    # with partial weight-average sums.
    GoldenJob("digits-mlp-int8-resumed", (*_DIGITS_SHORT, "--checkpoint-every", "5"),
              same_as="digits-mlp-int8", crash_at_step=62),
    GoldenJob("digits-mlp-int8-reference-backend", (*_DIGITS_SHORT, "--backend", "reference"),
              same_as="digits-mlp-int8"),
)


class SimulatedCrash(Exception):
    """Raised inside a training step: stands for the process being killed there."""


# ----------------------------------------------------------------------------- inputs

def _idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file (magic 0x0800 | ndim, big-endian sizes) holding ``array``."""
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _mnist_format_arrays() -> dict[str, np.ndarray]:
    """The four MNIST files' contents: sklearn digits (0..16 -> 0..255) repeated 3x3 per pixel to
    24x24 and zero-padded to 28x28, the first ``MNIST_TRAIN_IMAGES`` for training and the next
    ``MNIST_TEST_IMAGES`` for testing. Written here rather than shared with the other tests so
    that the golden data cannot change when those tests do."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images.astype(np.int64) * 255 // 16).astype(np.uint8)
    images = np.pad(pixels.repeat(3, axis=1).repeat(3, axis=2), ((0, 0), (2, 2), (2, 2)))
    labels = digits.target.astype(np.uint8)
    train, test = slice(0, MNIST_TRAIN_IMAGES), slice(MNIST_TRAIN_IMAGES, MNIST_TRAIN_IMAGES + MNIST_TEST_IMAGES)
    return {"train-images-idx3-ubyte": images[train], "train-labels-idx1-ubyte": labels[train],
            "t10k-images-idx3-ubyte": images[test], "t10k-labels-idx1-ubyte": labels[test]}


def write_mnist_format(folder: Path) -> Path:
    """Write the generated set as gzipped IDX files into ``folder``; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in _mnist_format_arrays().items():
        (folder / f"{stem}.gz").write_bytes(gzip.compress(_idx_bytes(array), mtime=0))
    return folder


def input_fingerprints() -> dict[str, str]:
    """sha256 of the data the jobs train on: sklearn's digits and the generated IDX files' contents."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    mnist = hashlib.sha256()
    for stem, array in _mnist_format_arrays().items():
        mnist.update(stem.encode() + _idx_bytes(array))
    return {"sklearn-digits": hashlib.sha256(digits.images.tobytes() + digits.target.tobytes()).hexdigest(),
            "generated-mnist-format": mnist.hexdigest()}


# ----------------------------------------------------------------------------- running a job

@contextlib.contextmanager
def _crash_at(step: int):
    """Make the int8 training step at (0-based) global step ``step`` raise ``SimulatedCrash``."""
    from intrain.methods.niti import Niti

    original = Niti.train_step

    def crashing(self, x, y, at_step, epoch):
        if at_step == step:
            raise SimulatedCrash(f"simulated crash at step {step}")
        return original(self, x, y, at_step, epoch)

    with mock.patch.object(Niti, "train_step", crashing):
        yield


def _train(argv: list[str]) -> str:
    """``intrain train`` in-process; returns its stdout (failing with its stderr if it fails)."""
    from intrain.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(argv)
    if status != 0:
        raise RuntimeError(f"intrain {' '.join(argv)} exited with {status}:\n{stderr.getvalue()}")
    return stdout.getvalue()


def run_job(job: GoldenJob, work_dir: Path, mnist_dir: Path) -> dict:
    """Run ``job`` in ``work_dir/<job name>`` and return its record (see ``record_run``)."""
    from intrain.run import checkpoint

    run_dir = work_dir / job.name
    argv = ["train", *job.args, "--out", str(run_dir)]
    if job.mnist:
        argv += ["--dataset", "mnist", "--data-dir", str(mnist_dir)]
    if job.crash_at_step is not None:
        with _crash_at(job.crash_at_step):
            try:
                _train(argv)
            except SimulatedCrash:
                pass
            else:
                raise RuntimeError(f"{job.name}: the run ended without reaching step {job.crash_at_step}")
        saved = checkpoint.load(checkpoint.checkpoint_path(run_dir))
        if saved["batch"] == 0:
            raise RuntimeError(f"{job.name}: the last checkpoint before the crash is at an epoch's end, "
                               "so the job no longer tests a mid-epoch resume")
        argv = ["train", "--resume", str(run_dir)]
    stdout = _train(argv)
    return record_run(run_dir, stdout.splitlines()[-1])


# ----------------------------------------------------------------------------- recording

def tensor_summary(t: torch.Tensor) -> dict:
    """Integer tensor: dtype, shape, sha256 of its bytes. Float tensor: dtype, shape, float64 sum,
    sum of absolute values and the first 8 values (compared with a tolerance)."""
    t = t.detach().contiguous().cpu()
    summary = {"dtype": str(t.dtype), "shape": list(t.shape)}
    if t.is_floating_point():
        wide = t.to(torch.float64)
        summary.update(sum=wide.sum().item(), abs_sum=wide.abs().sum().item(),
                       first_values=wide.flatten()[:8].tolist())
    else:
        summary["sha256"] = hashlib.sha256(t.numpy().tobytes()).hexdigest()
    return summary


def _tensors(named: dict) -> dict:
    return {name: tensor_summary(t) for name, t in named.items()}


def read_metrics_rows(path: Path) -> list[dict]:
    """The rows of ``metrics.csv`` as written (strings), without the ``seconds`` column."""
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def record_run(run_dir: Path, last_line: str) -> dict:
    """What golden.json pins for one finished run in ``run_dir``."""
    from intrain.run import checkpoint

    saved = checkpoint.load(checkpoint.checkpoint_path(run_dir))
    average = saved.get("weight_average")  # only the int8 method keeps weight sums
    if average is not None:
        average = {"count": average["count"], "sums": _tensors({str(i): s for i, s in enumerate(average["sums"])})}
    return {
        "model.pt": _tensors(torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]),
        "checkpoint.pt": {"state_dict": _tensors(saved["state_dict"]), "weight_average": average},
        "metrics": read_metrics_rows(run_dir / "metrics.csv"),
        "last_line": last_line,
    }


def make_golden() -> dict:
    """Run every job that has its own entry and return the golden.json content."""
    jobs = {}
    with tempfile.TemporaryDirectory(prefix="intrain-golden-") as tmp:
        mnist_dir = write_mnist_format(Path(tmp) / "mnist")
        for job in GOLDEN_JOBS:
            if job.same_as is None:
                print(f"running {job.name}", file=sys.stderr)
                jobs[job.name] = {"args": list(job.args), "result": run_job(job, Path(tmp), mnist_dir)}
    return {"inputs": input_fingerprints(), "jobs": jobs}


if __name__ == "__main__":
    GOLDEN_PATH.write_text(json.dumps(make_golden(), indent=1) + "\n")
    print(f"wrote {GOLDEN_PATH}", file=sys.stderr)
