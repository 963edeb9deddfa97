"""Checkpoints that resume bit for bit: a run killed with SIGKILL (or crashing) and resumed with
``--resume`` ends with the weights of the uninterrupted run and the same metrics (except seconds);
damaged or foreign checkpoints and conflicting options are refused with one line, changing nothing."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from intrain.run import checkpoint
from intrain.cli import main
from intrain.methods.float_twin import FloatTwin

from cli_checks import assert_refused, run_until_crash


def _refused(argv, root, capsys):
    return assert_refused(argv, capsys, root)

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
INT_JOB = ["--dataset", "digits", "--model", "mlp", "--arith", "int8", "--epochs", "3", "--seed", "7",
           "--batch-size", "16", "--checkpoint-every", "5"]


def _state(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]


def _same(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _metrics(run_dir):
    """metrics.csv without the seconds column."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [row[:-1] for row in csv.reader(f)]


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "intrain.cli", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=240)


def _start_and_kill(args, run_dir, cwd):
    """Start ``intrain train`` and SIGKILL it as soon as its first checkpoint exists."""
    proc = subprocess.Popen([sys.executable, "-m", "intrain.cli", "train", *args, "--out", str(run_dir)],
                            cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not checkpoint.checkpoint_path(run_dir).exists():
            assert proc.poll() is None, "the run ended before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "model.pt").exists()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted int8 run."""
    root = tmp_path_factory.mktemp("ref")
    proc = _cli(["train", *INT_JOB, "--out", str(root / "run")], root)
    assert proc.returncode == 0, proc.stderr
    return root / "run"


def test_sigkill_then_resume_is_bit_identical(tmp_path, reference):
    run_dir = tmp_path / "run"
    _start_and_kill(INT_JOB, run_dir, tmp_path)
    saved = checkpoint.load(checkpoint.checkpoint_path(run_dir))
    assert saved["seed"] == 7 and saved["global_step"] % 5 == 0 or saved["batch"] == 0
    # A different number of loader workers does not change any number.
    proc = _cli(["train", "--resume", str(run_dir), "--workers", "1"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == f"eval_acc={float(_metrics(reference)[-1][3]):.2f}"
    assert _same(_state(run_dir), _state(reference))
    assert _metrics(run_dir) == _metrics(reference)
    final = checkpoint.load(checkpoint.checkpoint_path(run_dir))
    assert (final["epoch"], final["batch"], len(final["rows"])) == (3, 0, 3)


def test_float_twin_with_dropout_resumes_bit_identical(tmp_path, monkeypatch, capsys):
    """A float VGG (dropout draws from torch's generator; SGD has momentum buffers) crashing mid-epoch."""
    job = ["train", "--arith", "float", "--model", "vgg-small-7", "--width", "0.125", "--epochs", "2",
           "--train-limit", "96", "--batch-size", "16", "--seed", "3", "--checkpoint-every", "4"]
    assert main([*job, "--out", str(tmp_path / "ref")]) == 0
    # checkpoint after step 8 (epoch 2, batch 2 of 6), then the crash
    run_until_crash(monkeypatch, FloatTwin, 9, [*job, "--out", str(tmp_path / "run")])
    saved = checkpoint.load(checkpoint.checkpoint_path(tmp_path / "run"))
    assert (saved["epoch"], saved["batch"], saved["global_step"]) == (1, 2, 8)
    assert saved["optimizer"]["state"] and saved["torch_rng"] is not None
    torch.manual_seed(12345)  # the resumed run must not depend on the generator's state here
    assert main(["train", "--resume", str(tmp_path / "run"), "--workers", "2"]) == 0
    assert _same(_state(tmp_path / "run"), _state(tmp_path / "ref"))
    assert _metrics(tmp_path / "run") == _metrics(tmp_path / "ref")
    capsys.readouterr()


@pytest.fixture
def interrupted(tmp_path, monkeypatch):
    """A small int8 run stopped after a mid-epoch checkpoint."""
    from intrain.methods.niti import Niti

    run_dir = tmp_path / "run"
    run_until_crash(monkeypatch, Niti, 6, ["train", "--epochs", "2", "--train-limit", "64", "--batch-size", "16",
                                           "--checkpoint-every", "3", "--out", str(run_dir)])
    return run_dir


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign", "empty"])
def test_damaged_checkpoint_is_refused(interrupted, damage, capsys):
    path = checkpoint.checkpoint_path(interrupted)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:-10] + bytes([data[-10] ^ 1]) + data[-9:])
    elif damage == "foreign":
        torch.save({"state_dict": {}}, path)
    else:
        path.write_bytes(b"")
    err = _refused(["train", "--resume", str(interrupted)], interrupted, capsys)
    assert str(path) in err


def test_conflicting_options_are_refused(interrupted, capsys):
    err = _refused(["train", "--resume", str(interrupted), "--seed", "1"], interrupted, capsys)
    assert "--seed" in err and str(checkpoint.checkpoint_path(interrupted)) in err
    assert "--epochs" in _refused(["train", "--resume", str(interrupted), "--epochs", "5"], interrupted, capsys)
    assert "--overwrite" in _refused(["train", "--resume", str(interrupted), "--overwrite"], interrupted, capsys)
    # Options equal to the recorded ones are accepted.
    assert main(["train", "--resume", str(interrupted), "--epochs", "2", "--seed", "0"]) == 0


def test_missing_checkpoint_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _refused(["train", "--resume", str(tmp_path / "empty")], tmp_path, capsys)
    assert "checkpoint.pt" in err
    assert "nowhere" in _refused(["train", "--resume", str(tmp_path / "nowhere")], tmp_path, capsys)


def test_augmentation_and_workers(tmp_path, capsys):
    """Augmentation changes the run; the number of loader workers does not change a bit."""
    from intrain.run.config import TrainConfig

    assert TrainConfig(dataset="cifar10").resolved().augment is True
    assert TrainConfig(dataset="digits").resolved().augment is False
    job = ["train", "--epochs", "2", "--train-limit", "96", "--batch-size", "16", "--seed", "2"]
    for name, extra in [("plain", []), ("aug0", ["--augment"]), ("aug2", ["--augment", "--workers", "2"])]:
        assert main([*job, *extra, "--out", str(tmp_path / name)]) == 0
    capsys.readouterr()
    assert _same(_state(tmp_path / "aug0"), _state(tmp_path / "aug2"))
    assert _metrics(tmp_path / "aug0") == _metrics(tmp_path / "aug2")
    assert not _same(_state(tmp_path / "plain"), _state(tmp_path / "aug0"))
    assert checkpoint.load(checkpoint.checkpoint_path(tmp_path / "aug2"))["train_config"]["augment"] is True
