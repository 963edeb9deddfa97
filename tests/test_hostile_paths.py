"""Every ``intrain`` subcommand under unwritable, missing and damaged paths (issue 16).

Each case of ``CASES`` prepares a path (in a fresh copy of a finished run and of an interrupted
one, under the test's own folder) and names the command that meets it. Every case must end with
exit status 2, exactly one line ``intrain: error: ...`` on stderr naming what is wrong, nothing on
stdout, no traceback and no warning anywhere, and nothing under the test's folder created,
changed or removed.

How the paths are made while the tests run as root (which ignores file permissions):

* missing, under a regular file (``ENOTDIR``), under ``/proc`` (``ENOENT``: procfs creates
  nothing), damaged (bytes flipped, truncated, edited, a foreign pickle) and unreadable (a link to
  ``/proc/self/mem``, whose reading fails with ``EIO``): real, for root too;
* read-only folders (cases marked ``ro``) run twice: ``[immutable]`` with a really read-only
  folder (``chattr +i`` as root, ``chmod 0555`` otherwise; skipped where the file system or the
  container cannot), and ``[simulated]`` with every write below that folder refused with
  ``EROFS`` in this process (``hostile.simulate_read_only``), which runs everywhere;
* a folder in use: this process holds its lock (``intrain.run.lock``).

The cases run in-process through ``intrain.cli.main`` (fast, and the simulated ones need it); the
ones in ``REAL_PROCESS`` run again as real ``python -m intrain.cli`` processes, where any traceback
or warning would really reach stderr.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from intrain.cli import main
from intrain.methods.niti import Niti
from intrain.run import checkpoint, lock

from cli_checks import snapshot
from hostile import immutable, simulate_read_only

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
TRAIN = ["train", "--epochs", "1", "--train-limit", "64", "--batch-size", "16", "--width", "0.25"]
UNREADABLE = "/proc/self/mem"


def _ternarize(run):
    """``intrain ternarize`` of ``run`` without its --out."""
    return ["ternarize", "--run", str(run), "--group-size", "4", "--budget", "1"]  # reading it at offset 0 fails with EIO, for root too


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished run and an interrupted one (a checkpoint, no model.pt) to copy and damage."""
    root = tmp_path_factory.mktemp("runs")
    assert main([*TRAIN, "--epochs", "2", "--out", str(root / "finished")]) == 0
    original = Niti.train_step

    def crashing(self, x, y, step, epoch):
        if step == 5:
            raise Crash
        return original(self, x, y, step, epoch)

    Niti.train_step = crashing
    try:
        with pytest.raises(Crash):
            main([*TRAIN, "--epochs", "2", "--checkpoint-every", "2", "--out", str(root / "interrupted")])
    finally:
        Niti.train_step = original
    return root


def _closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/cifar-10-python.tar.gz"


class Ctx:
    """What a case's ``setup`` gets: its folder (the current folder too), a regular file, copies
    of the runs, and ways to make a folder read-only or busy."""

    def __init__(self, tmp: Path, runs: Path, mode: str | None, request):
        self.tmp, self.mode, self.request = tmp, mode, request
        self.file = tmp / "a-file"
        self.file.write_text("not a folder")
        self.finished = shutil.copytree(runs / "finished", tmp / "finished")
        self.interrupted = shutil.copytree(runs / "interrupted", tmp / "interrupted")
        self.read_only: list[Path] = []

    def make_read_only(self, path: Path) -> Path:
        path.mkdir(exist_ok=True)
        if self.mode == "immutable":
            if not immutable(path, self.request):
                pytest.skip("no way to make a read-only folder here (chattr +i refused): the simulated twin runs")
        else:
            self.read_only.append(path)
        return path

    def hold_lock(self, path: Path) -> None:
        held = lock.acquire(path, "intrain train")
        self.request.addfinalizer(held.release)

    def unreadable(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        path.symlink_to(UNREADABLE)

    def flip(self, path: Path, at: float = 0.5) -> None:
        data = bytearray(path.read_bytes())
        data[int(len(data) * at)] ^= 0x01
        path.write_bytes(bytes(data))

    def truncate(self, path: Path) -> None:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    def mnist(self) -> Path:
        """A valid MNIST-format folder (8 images per split)."""
        import gzip

        folder = self.tmp / "mnist"
        folder.mkdir()
        for prefix in ("train", "t10k"):
            for stem, dims, payload in ((f"{prefix}-images-idx3-ubyte", (8, 28, 28), bytes(8 * 784)),
                                        (f"{prefix}-labels-idx1-ubyte", (8,), bytes(range(8)))):
                header = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
                with gzip.open(folder / f"{stem}.gz", "wb") as f:
                    f.write(header + payload)
        return folder


def _evil_pickle(ctx) -> bytes:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {ctx.tmp / 'PWNED'}",))

    return pickle.dumps(Evil(), protocol=4)


def _foreign_checkpoint(ctx) -> None:
    body = _evil_pickle(ctx)
    (ctx.interrupted / "checkpoint.pt").write_bytes(
        checkpoint.MAGIC + b"version 1\n" + f"sha256 {hashlib.sha256(body).hexdigest()}\n".encode() + body)


def _edit_config(ctx) -> None:
    path = ctx.finished / "config.json"
    path.write_text(path.read_text().replace('"seed": 0', '"seed": 1'))


def _edit_metrics(ctx) -> None:
    path = ctx.finished / "metrics.csv"
    lines = path.read_text().splitlines()
    lines[1] = ",".join(lines[1].split(",")[:3] + ["99.0000", lines[1].split(",")[4]])
    path.write_text("\n".join(lines) + "\n")


def _unreadable_idx(ctx) -> Path:
    folder = ctx.mnist()
    ctx.unreadable(folder / "train-images-idx3-ubyte.gz")
    return folder


def _truncated_idx(ctx) -> Path:
    folder = ctx.mnist()
    ctx.truncate(folder / "train-labels-idx1-ubyte.gz")
    return folder


@dataclass(frozen=True)
class Case:
    id: str
    setup: object  # ctx -> argv
    words: tuple = ()  # each must be in the error line
    ro: bool = False  # run with an immutable and with a simulated read-only folder


CASES = [
    # ---- train: --out
    Case("train-out-under-a-file", lambda c: [*TRAIN, "--out", str(c.file / "run")], ("a-file", "is a file")),
    Case("train-out-is-a-file", lambda c: [*TRAIN, "--out", str(c.file)], ("a-file", "is a file")),
    Case("train-out-in-proc", lambda c: [*TRAIN, "--out", "/proc/intrain-test/run"], ("/proc/intrain-test/run",)),
    Case("train-out-below-read-only", lambda c: [*TRAIN, "--out", str(c.make_read_only(c.tmp / "ro") / "run")],
         ("ro/run", "cannot write"), ro=True),
    Case("train-out-is-read-only", lambda c: [*TRAIN, "--out", str(c.make_read_only(c.tmp / "ro"))],
         ("cannot write",), ro=True),
    Case("train-default-runs-in-read-only-cwd",
         lambda c: (os.chdir(c.make_read_only(c.tmp / "ro")), TRAIN)[1], ("runs", "--out"), ro=True),
    Case("train-default-runs-is-a-file", lambda c: ((c.tmp / "runs").write_text("x"), TRAIN)[1], ("runs",)),
    Case("train-out-in-use", lambda c: (c.hold_lock(c.finished), [*TRAIN, "--out", str(c.finished), "--overwrite"])[1],
         ("in use by intrain train", f"pid {os.getpid()}")),
    # ---- train: --data-dir
    Case("train-data-dir-missing", lambda c: [*TRAIN, "--dataset", "mnist", "--data-dir", str(c.tmp / "nowhere")],
         ("nowhere", "--data-dir")),
    Case("train-data-dir-under-a-file", lambda c: [*TRAIN, "--dataset", "mnist", "--data-dir", str(c.file / "m")],
         ("--data-dir",)),
    Case("train-data-dir-is-a-file", lambda c: [*TRAIN, "--dataset", "mnist", "--data-dir", str(c.file)],
         ("a-file", "is a file")),
    Case("train-data-dir-in-proc", lambda c: [*TRAIN, "--dataset", "mnist", "--data-dir", "/proc/intrain-test"],
         ("/proc/intrain-test",)),
    Case("train-data-file-truncated", lambda c: [*TRAIN, "--dataset", "mnist", "--data-dir", str(_truncated_idx(c))],
         ("train-labels",)),
    Case("train-data-file-unreadable", lambda c: [*TRAIN, "--dataset", "mnist", "--data-dir", str(_unreadable_idx(c))],
         ("train-images",)),
    # ---- train --resume
    Case("resume-missing", lambda c: ["train", "--resume", str(c.tmp / "nowhere")], ("nowhere",)),
    Case("resume-under-a-file", lambda c: ["train", "--resume", str(c.file / "run")], ("a-file/run",)),
    Case("resume-a-file", lambda c: ["train", "--resume", str(c.file)], ("not a directory",)),
    Case("resume-no-checkpoint", lambda c: ((c.interrupted / "checkpoint.pt").unlink(),
                                            ["train", "--resume", str(c.interrupted)])[1], ("checkpoint.pt",)),
    Case("resume-checkpoint-flipped", lambda c: (c.flip(c.interrupted / "checkpoint.pt"),
                                                 ["train", "--resume", str(c.interrupted)])[1], ("sha256 mismatch",)),
    Case("resume-checkpoint-truncated", lambda c: (c.truncate(c.interrupted / "checkpoint.pt"),
                                                   ["train", "--resume", str(c.interrupted)])[1], ("checkpoint.pt",)),
    Case("resume-checkpoint-foreign-pickle", lambda c: (_foreign_checkpoint(c),
                                                        ["train", "--resume", str(c.interrupted)])[1],
         ("checkpoint.pt cannot be loaded",)),
    Case("resume-checkpoint-unreadable", lambda c: (c.unreadable(c.interrupted / "checkpoint.pt"),
                                                    ["train", "--resume", str(c.interrupted)])[1],
         ("checkpoint.pt", "Input/output error")),
    Case("resume-read-only-run",
         lambda c: (c.make_read_only(c.interrupted), ["train", "--resume", str(c.interrupted)])[1],
         ("cannot write", "interrupted"), ro=True),
    Case("resume-in-use", lambda c: (c.hold_lock(c.interrupted), ["train", "--resume", str(c.interrupted)])[1],
         ("in use by intrain train",)),
    # ---- eval
    Case("eval-missing", lambda c: ["eval", "--run", str(c.tmp / "nowhere")], ("nowhere",)),
    Case("eval-under-a-file", lambda c: ["eval", "--run", str(c.file / "run")], ("a-file/run",)),
    Case("eval-a-file", lambda c: ["eval", "--run", str(c.file)], ("not a directory",)),
    Case("eval-unfinished-run", lambda c: ["eval", "--run", str(c.interrupted)], ("model.pt", "--resume")),
    Case("eval-config-missing", lambda c: ((c.finished / "config.json").unlink(),
                                           ["eval", "--run", str(c.finished)])[1], ("config.json",)),
    Case("eval-config-truncated", lambda c: (c.truncate(c.finished / "config.json"),
                                             ["eval", "--run", str(c.finished)])[1], ("config.json", "damaged")),
    Case("eval-config-edited", lambda c: (_edit_config(c), ["eval", "--run", str(c.finished)])[1],
         ("config.json", "damaged")),
    Case("eval-config-unreadable", lambda c: (c.unreadable(c.finished / "config.json"),
                                              ["eval", "--run", str(c.finished)])[1], ("config.json",)),
    Case("eval-model-flipped", lambda c: (c.flip(c.finished / "model.pt"), ["eval", "--run", str(c.finished)])[1],
         ("model.pt", "sha256 mismatch")),
    Case("eval-model-truncated", lambda c: (c.truncate(c.finished / "model.pt"), ["eval", "--run", str(c.finished)])[1],
         ("model.pt",)),
    Case("eval-model-foreign-pickle", lambda c: ((c.finished / "model.pt").write_bytes(_evil_pickle(c)),
                                                 ["eval", "--run", str(c.finished)])[1],
         ("model.pt", "not an intrain model file")),
    Case("eval-model-unreadable", lambda c: (c.unreadable(c.finished / "model.pt"),
                                             ["eval", "--run", str(c.finished)])[1], ("model.pt", "Input/output")),
    Case("eval-read-only-run", lambda c: (c.make_read_only(c.finished), ["eval", "--run", str(c.finished)])[1],
         ("cannot write", "eval.json"), ro=True),
    Case("eval-in-use", lambda c: (c.hold_lock(c.finished), ["eval", "--run", str(c.finished)])[1], ("in use",)),
    Case("eval-data-dir-missing", lambda c: ["eval", "--run", str(c.finished), "--dataset", "mnist",
                                             "--data-dir", str(c.tmp / "nowhere")], ("nowhere",)),
    # ---- ternarize
    Case("ternarize-run-missing", lambda c: [*_ternarize(c.tmp / "nowhere"), "--out", str(c.tmp / "t")], ("nowhere",)),
    Case("ternarize-unfinished-run", lambda c: [*_ternarize(c.interrupted), "--out", str(c.tmp / "t")], ("model.pt",)),
    Case("ternarize-model-flipped", lambda c: (c.flip(c.finished / "model.pt"),
                                               [*_ternarize(c.finished), "--out", str(c.tmp / "t")])[1], ("damaged",)),
    Case("ternarize-model-foreign-pickle", lambda c: ((c.finished / "model.pt").write_bytes(_evil_pickle(c)),
                                                      [*_ternarize(c.finished), "--out", str(c.tmp / "t")])[1],
         ("model.pt",)),
    Case("ternarize-out-under-a-file", lambda c: [*_ternarize(c.finished), "--out", str(c.file / "t")],
         ("a-file", "is a file")),
    Case("ternarize-out-below-read-only",
         lambda c: [*_ternarize(c.finished), "--out", str(c.make_read_only(c.tmp / "ro") / "t")], ("ro",), ro=True),
    Case("ternarize-out-in-use", lambda c: (c.hold_lock(c.interrupted),
                                            [*_ternarize(c.finished), "--out", str(c.interrupted), "--overwrite"])[1],
         ("in use",)),
    # ---- plot
    Case("plot-run-missing", lambda c: ["plot", str(c.tmp / "nowhere"), "-o", str(c.tmp / "c.png")], ("nowhere",)),
    Case("plot-metrics-missing", lambda c: ((c.finished / "metrics.csv").unlink(),
                                            ["plot", str(c.finished), "-o", str(c.tmp / "c.png")])[1],
         ("metrics.csv",)),
    Case("plot-metrics-edited", lambda c: (_edit_metrics(c), ["plot", str(c.finished), "-o", str(c.tmp / "c.png")])[1],
         ("metrics.csv", "damaged")),
    Case("plot-metrics-garbage", lambda c: ((c.finished / "metrics.csv").write_bytes(b"\xff\x00\xfe garbage"),
                                            ["plot", str(c.finished), "-o", str(c.tmp / "c.png")])[1],
         ("metrics.csv",)),
    Case("plot-metrics-unreadable", lambda c: (c.unreadable(c.finished / "metrics.csv"),
                                               ["plot", str(c.finished), "-o", str(c.tmp / "c.png")])[1],
         ("metrics.csv", "Input/output")),
    Case("plot-output-under-a-file", lambda c: ["plot", str(c.finished), "-o", str(c.file / "c.png")],
         ("a-file", "is a file")),
    Case("plot-output-in-proc", lambda c: ["plot", str(c.finished), "-o", "/proc/intrain-test.png"],
         ("/proc/intrain-test.png", "-o")),
    Case("plot-output-folder-missing", lambda c: ["plot", str(c.finished), "-o", str(c.tmp / "no" / "c.png")],
         ("does not exist",)),
    Case("plot-output-is-a-folder", lambda c: ["plot", str(c.finished), "-o", str(c.finished)],
         ("format",)),
    Case("plot-output-read-only",
         lambda c: ["plot", str(c.finished), "-o", str(c.make_read_only(c.tmp / "ro") / "c.png")],
         ("cannot write", "-o"), ro=True),
    # ---- download
    Case("download-data-dir-under-a-file", lambda c: ["download", "cifar10", "--data-dir", str(c.file / "d"),
                                                      "--url", _closed_port_url()], ("a-file",)),
    Case("download-data-dir-in-proc", lambda c: ["download", "cifar10", "--data-dir", "/proc/intrain-test",
                                                 "--url", _closed_port_url()], ("/proc/intrain-test",)),
    Case("download-data-dir-is-a-file", lambda c: ["download", "cifar10", "--data-dir", str(c.file),
                                                   "--url", _closed_port_url()], ("a-file",)),
    Case("download-data-dir-read-only", lambda c: ["download", "cifar10", "--data-dir",
                                                   str(c.make_read_only(c.tmp / "ro")), "--url", _closed_port_url()],
         ("cannot write into data folder",), ro=True),
]

#: Cases run again as real processes (no read-only or busy ones: those need this process).
REAL_PROCESS = ("train-out-under-a-file", "train-out-in-proc", "resume-checkpoint-foreign-pickle",
                "eval-model-foreign-pickle", "eval-model-flipped", "ternarize-model-flipped", "plot-output-in-proc",
                "download-data-dir-under-a-file")


def _params():
    for case in CASES:
        for mode in (("immutable", "simulated") if case.ro else (None,)):
            yield pytest.param(case, mode, id=case.id if mode is None else f"{case.id}[{mode}]")


def test_every_subcommand_is_covered():
    assert {case.id.split("-")[0] for case in CASES} == {"train", "resume", "eval", "ternarize", "plot",
                                                                 "download"}
    assert set(REAL_PROCESS) <= {case.id for case in CASES}


def _check_line(err: str, out: str, case: Case) -> str:
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("intrain: error: ") and out == "", (err, out)
    for word in case.words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.mark.parametrize("case, mode", _params())
def test_one_line_exit_2_nothing_written(case, mode, runs, tmp_path, monkeypatch, capsys, request):
    monkeypatch.chdir(tmp_path)
    ctx = Ctx(tmp_path, runs, mode, request)
    argv = [str(a) for a in case.setup(ctx)]
    before = snapshot(tmp_path)
    capsys.readouterr()
    with monkeypatch.context() as m, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for path in ctx.read_only:
            simulate_read_only(m, path)
        status = main(argv)
    out, err = capsys.readouterr()
    assert status == 2, (status, err)
    _check_line(err, out, case)
    assert not caught, [str(w.message) for w in caught]
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("case", [c for c in CASES if c.id in REAL_PROCESS], ids=lambda c: c.id)
def test_real_process(case, runs, tmp_path, request):
    ctx = Ctx(tmp_path, runs, None, request)
    argv = [str(a) for a in case.setup(ctx)]
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "intrain.cli", *argv], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    _check_line(proc.stderr, proc.stdout, case)
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "PWNED").exists()
