"""The ``intrain`` command line: bad input gives one error line and exit 2 and writes nothing;
``--help`` documents every option; default and explicit run directories."""

import gzip
import subprocess
import sys

import pytest

from intrain.cli import main

from cli_checks import assert_refused as _fails_cleanly

TRAIN_OPTIONS = ("--dataset", "--data-dir", "--model", "--arith", "--epochs", "--batch-size", "--seed",
                 "--val-split", "--train-limit", "--mu-schedule", "--lr", "--backend", "--device", "--out",
                 "--overwrite", "--width", "--augment", "--no-augment", "--workers", "--checkpoint-every",
                 "--resume")


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write_idx(path, dims, payload: bytes):
    header = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(header + payload)


def _tiny_mnist(folder, n=8, truncate=False):
    """A small valid MNIST-format folder; with ``truncate`` the training images lack bytes."""
    folder.mkdir()
    for prefix in ("train", "t10k"):
        pixels = bytes(range(256)) * (n * 784 // 256 + 1)
        pixels = pixels[: n * 784 - (100 if truncate and prefix == "train" else 0)]
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", (n, 28, 28), pixels)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", (n,), bytes(i % 10 for i in range(n)))
    return folder


@pytest.mark.parametrize("argv, words", [
    (["train", "--model", "resnet999"], "--model"),
    (["train", "--dataset", "imagenet"], "--dataset"),
    (["train", "--arith", "int4"], "--arith"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--batch-size", "-5"], "--batch-size"),
    (["train", "--epochs", "-1"], "--epochs"),
    (["train", "--epochs", "two"], "--epochs"),
    (["train", "--seed", "-1"], "--seed"),
    (["train", "--train-limit", "0"], "--train-limit"),
    (["train", "--lr", "0"], "--lr"),
    (["train", "--mu-schedule", "5:3"], "--mu-schedule"),
    (["train", "--mu-schedule", "fast"], "--mu-schedule"),
    (["train", "--mu-schedule", "0:5,0:4"], "appears twice"),
    (["train", "--mu-schedule", "0:-1"], "needs --weight-bits 16"),
    (["train", "--mu-schedule", "0:-9", "--weight-bits", "16"], "mu below -8"),
    (["train", "--mu-schedule", "0:5,3:4", "--weight-decay-shift", "5"], "--weight-decay-shift 5 must exceed every mu"),
    (["train", "--weight-decay-shift", "x"], "--weight-decay-shift"),
    (["train", "--arith", "float", "--weight-decay", "-1"], "--weight-decay"),
    (["train", "--arith", "float", "--weight-decay-shift", "12"], "--weight-decay-shift does not apply to --arith float"),
    (["train", "--weight-decay", "0"], "--weight-decay sets the weight decay of --update sgd or adamw"),
    (["train", "--label-smoothing", "1"], "--label-smoothing"),
    (["train", "--arith", "float", "--label-smoothing", "-0.1"], "--label-smoothing"),
    # an option of one method given to another (issue 10): the flag and the method are named
    (["train", "--lr", "0.1"], "--lr sets the learning rate of --update sgd"),
    (["train", "--arith", "float", "--mu-schedule", "0:5"], "--mu-schedule does not apply to --arith float"),
    (["train", "--arith", "float", "--weight-bits", "16"], "--weight-bits does not apply to --arith float"),
    (["train", "--arith", "float", "--backend", "cpu"], "--backend does not apply to --arith float"),
    (["train", "--arith", "float", "--float-params", "none"], "--float-params"),
    (["train", "--float-params", "integer"], "--float-params does not apply to --arith int8"),
    (["train", "--arith", "dfp16", "--float-params", "integer"], "--float-params does not apply to --arith dfp16"),
    (["train", "--dataset", "moving-mnist-actions", "--model", "tr-lstm", "--arith", "float", "--float-params",
      "integer"], "keeps its gate biases"),
    (["train", "--model", "lenet5"], "lenet5"),  # 8x8 digits are too small for LeNet-5
    (["train", "--val-split", "5000"], "--val-split"),
    (["train", "--no-such-option"], "unrecognized"),
    (["frobnicate"], "frobnicate"),
    ([], "required"),
])
def test_bad_arguments(argv, words, capsys, cwd):
    line = _fails_cleanly(argv, capsys, cwd)
    assert words in line


def test_cuda_unavailable_is_a_clean_error(capsys, cwd):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert "cuda" in _fails_cleanly(["train", "--device", "cuda"], capsys, cwd)


def test_missing_data_directory(capsys, cwd):
    line = _fails_cleanly(["train", "--dataset", "mnist", "--data-dir", str(cwd / "nowhere")], capsys, cwd)
    assert "nowhere" in line and "--data-dir" in line


def test_truncated_idx_file(capsys, cwd):
    data = _tiny_mnist(cwd / "mnist", truncate=True)
    line = _fails_cleanly(["train", "--dataset", "mnist", "--data-dir", str(data), "--arith", "float"], capsys, cwd)
    assert "train-images" in line and "truncated" in line


def test_output_directory_holding_a_run_is_left_alone(capsys, cwd):
    run = cwd / "old"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,train_loss,train_acc,eval_acc,seconds\n1,0.5,80,81,1.0\n")
    (run / "model.pt").write_bytes(b"old weights")
    (run / "notes.txt").write_text("mine")
    line = _fails_cleanly(["train", "--arith", "float", "--epochs", "1", "--out", str(run)], capsys, cwd)
    assert "--overwrite" in line and "old" in line
    # Any one run file is enough to protect the directory.
    (run / "metrics.csv").unlink()
    (run / "model.pt").unlink()
    (run / "config.json").write_text("{}")
    _fails_cleanly(["train", "--arith", "float", "--epochs", "1", "--out", str(run)], capsys, cwd)


def test_output_path_that_is_a_file(capsys, cwd):
    (cwd / "afile").write_text("x")
    assert "afile" in _fails_cleanly(["train", "--out", "afile"], capsys, cwd)


def test_overwrite_replaces_the_run(capsys, cwd):
    run = cwd / "old"
    run.mkdir()
    (run / "metrics.csv").write_text("stale\n")
    (run / "model.pt").write_bytes(b"stale")
    (run / "notes.txt").write_text("mine")
    argv = ["train", "--arith", "float", "--epochs", "1", "--train-limit", "64", "--out", str(run), "--overwrite"]
    assert main(argv) == 0
    assert (run / "metrics.csv").read_text().splitlines()[0] == "epoch,train_loss,train_acc,eval_acc,seconds"
    assert (run / "model.pt").read_bytes() != b"stale"
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files are replaced
    names = sorted(p.name for p in run.iterdir() if p.name != "tensorboard")  # tensorboard: when installed
    # .intrain-files.json lists what the run wrote (for the next --overwrite), .intrain.lock is its lock
    assert names == [".intrain-files.json", ".intrain.lock", "checkpoint.pt", "config.json", "metrics.csv",
                     "model.pt", "notes.txt"]


def test_default_output_directory_takes_the_first_free_number(capsys, cwd):
    (cwd / "runs" / "digits-mlp-float-1").mkdir(parents=True)
    argv = ["train", "--arith", "float", "--epochs", "0", "--train-limit", "32"]
    assert main(argv) == 0
    assert main(argv) == 0
    runs = sorted(p.name for p in (cwd / "runs").iterdir())
    assert runs == ["digits-mlp-float-1", "digits-mlp-float-2", "digits-mlp-float-3"]
    assert list((cwd / "runs" / "digits-mlp-float-1").iterdir()) == []  # untouched
    out = capsys.readouterr().out
    assert "runs/digits-mlp-float-3" in out


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in TRAIN_OPTIONS:
        assert option in text, option
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for command in ("train", "eval", "plot", "download"):
        assert command in text


def test_console_entry_point_exit_status_and_single_line(tmp_path):
    """The real process: exit status 2 and one stderr line (no usage dump, no traceback)."""
    proc = subprocess.run([sys.executable, "-m", "intrain.cli", "train", "--batch-size", "0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("intrain: error: ")
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []
