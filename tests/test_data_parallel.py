"""Data-parallel training over torch.distributed ends bit for bit where one process ends.

Two processes on this machine (gloo, loopback, started by ``torchrun --standalone`` as a user
would) train with the same seed and global batch as one process, and the final weights
(``model.pt``), the checkpoint (weights, int16 masters, weight-average sums), ``metrics.csv``
(without the seconds) and the printed accuracy are compared with the one-process run's: equal,
for LeNet-5 and a narrow ResNet-18, with stochastic error rounding (its random numbers are keyed
by element position in the global batch) and, for LeNet-5, integer weight decay (keyed by step),
and for LeNet-5 with the SGD update (int32 masters and momentum, the mean over the whole batch).
The batches are chosen so that the shards are uneven
and the last batch of every epoch has one image: one process then has an empty shard. A
two-process run killed with SIGKILL mid-epoch and resumed by one process ends identical too, and
so does a one-process run resumed by two.
Bad input (the float twin under several processes, an inconsistent environment) stops every
process with one line and exit status 2, writing nothing.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from golden.make_golden import write_mnist_format
from intrain.run import checkpoint

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
for _name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_name, None)  # a test run inside a torchrun job must not join it
TIMEOUT = 180

#: 149 training images in batches of 37: four full batches (shards of 18 and 19 images) and a
#: last batch of one image (an empty shard for rank 0, the image for rank 1); a checkpoint every
#: 2 steps, so that rank 0 writes some mid-epoch and a killed run resumes mid-epoch.
LENET = ("--dataset", "mnist", "--model", "lenet5", "--epochs", "2", "--batch-size", "37", "--train-limit", "149",
         "--seed", "5", "--error-rounding", "stochastic", "--mu-schedule", "0:4,1:3", "--checkpoint-every", "2",
         "--weight-decay-shift", "9")
LENET_TWIN = ("--dataset", "mnist", "--model", "lenet5", "--epochs", "2", "--batch-size", "37", "--train-limit",
              "149", "--seed", "5", "--error-rounding", "stochastic")
RESNET = ("--dataset", "mnist", "--model", "resnet18", "--width", "0.125", "--epochs", "1", "--batch-size", "37",
          "--train-limit", "75", "--seed", "6", "--error-rounding", "stochastic", "--update", "niti",
          "--weight-bits", "16", "--mu-schedule", "0:2")


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    return write_mnist_format(tmp_path_factory.mktemp("mnist-format"))


def _train_command(args, out, mnist_dir, processes: int) -> list[str]:
    job = ["train", *args, "--data-dir", str(mnist_dir), "--out", str(out)]
    if processes == 1:
        return [sys.executable, "-m", "intrain", *job]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
            "-m", "intrain", *job]


def _run(command, cwd) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _tensors(run_dir) -> dict[str, torch.Tensor]:
    """Every tensor a run ends with: model.pt's state_dict, the checkpoint's state_dict and
    weight-average sums."""
    found = {f"model.pt/{k}": v for k, v in
             torch.load(run_dir / "model.pt", weights_only=True)["state_dict"].items()}
    payload = checkpoint.load(checkpoint.checkpoint_path(run_dir))
    found.update({f"checkpoint/{k}": v for k, v in payload["state_dict"].items()})
    average = payload.get("weight_average") or {}
    found.update({f"checkpoint/sums/{i}": s for i, s in enumerate(average.get("sums") or [])})
    found["checkpoint/count"] = torch.tensor(average.get("count", -1))
    twin = payload.get("sgd_update") or payload.get("adamw_update") or {}
    for part in ("master", "momentum", "first_moment", "second_moment"):
        for i, (v, e) in enumerate(twin.get(part) or []):
            found[f"checkpoint/{part}/{i}"], found[f"checkpoint/{part}/{i}/exponent"] = v, e
    return found


def _metrics(run_dir) -> list[list[str]]:
    """metrics.csv as written, without the seconds column."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [row[:-1] for row in csv.reader(f)]


def _assert_same_run(actual, expected) -> None:
    a, e = _tensors(actual), _tensors(expected)
    assert a.keys() == e.keys()
    differing = [k for k in e if a[k].dtype != e[k].dtype or not torch.equal(a[k], e[k])]
    assert not differing, f"tensors differ from the one-process run: {differing}"
    assert _metrics(actual) == _metrics(expected)
    assert len(_metrics(expected)) > 1


def _written(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="module")
def lenet_one(mnist_dir, tmp_path_factory):
    """The one-process LeNet-5 run: (its folder, its output)."""
    root = tmp_path_factory.mktemp("lenet-one")
    return root / "run", _run(_train_command(LENET, root / "run", mnist_dir, 1), root)


def _check_two_against_one(one_dir, one, two_dir, two) -> None:
    _assert_same_run(two_dir, one_dir)
    assert one.stdout.splitlines()[-1] == two.stdout.splitlines()[-1]
    assert two.stdout.count("eval_acc=") == 1, "rank 1 printed too: " + two.stdout
    assert "over 2 processes" in two.stderr
    assert _written(two_dir) == _written(one_dir)


def test_lenet5_two_processes_end_bit_identical_to_one(lenet_one, mnist_dir, tmp_path):
    two = _run(_train_command(LENET, tmp_path / "two", mnist_dir, 2), tmp_path)
    _check_two_against_one(*lenet_one, tmp_path / "two", two)


@pytest.mark.parametrize("update, lr, state", [("sgd", "0.1", "momentum"), ("adamw", "0.003", "second_moment")])
def test_lenet5_with_a_twin_update_two_processes_end_bit_identical_to_one(update, lr, state, mnist_dir, tmp_path):
    job = (*LENET_TWIN, "--update", update, "--lr", lr)
    one = _run(_train_command(job, tmp_path / "one", mnist_dir, 1), tmp_path)
    two = _run(_train_command(job, tmp_path / "two", mnist_dir, 2), tmp_path)
    _check_two_against_one(tmp_path / "one", one, tmp_path / "two", two)
    assert any(k.startswith(f"checkpoint/{state}/") for k in _tensors(tmp_path / "one"))


def test_resnet18_two_processes_end_bit_identical_to_one(mnist_dir, tmp_path):
    one = _run(_train_command(RESNET, tmp_path / "one", mnist_dir, 1), tmp_path)
    two = _run(_train_command(RESNET, tmp_path / "two", mnist_dir, 2), tmp_path)
    _check_two_against_one(tmp_path / "one", one, tmp_path / "two", two)


@pytest.mark.parametrize("killed, resumed", [(2, 1), (1, 2)], ids=["2-then-1", "1-then-2"])
def test_killed_mid_epoch_resumes_with_another_number_of_processes(killed, resumed, lenet_one, mnist_dir,
                                                                   tmp_path):
    run_dir = tmp_path / "killed"
    launcher = subprocess.Popen(_train_command(LENET, run_dir, mnist_dir, killed), cwd=tmp_path, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not checkpoint.checkpoint_path(run_dir).exists():
            assert launcher.poll() is None, "the run ended before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
        os.killpg(launcher.pid, signal.SIGKILL)  # the process, or torchrun and both workers, at once
    finally:
        launcher.wait(timeout=60)
    assert launcher.returncode == -signal.SIGKILL
    assert not (run_dir / "model.pt").exists()
    position = checkpoint.load(checkpoint.checkpoint_path(run_dir))
    assert position["batch"] > 0, "the kill was meant to come mid-epoch"
    command = _train_command((), run_dir, mnist_dir, resumed)
    command = command[:command.index("train") + 1] + ["--resume", str(run_dir)]
    proc = _run(command, tmp_path)
    assert "resuming at epoch" in proc.stderr
    _assert_same_run(run_dir, lenet_one[0])


def _workers(args, env_of_rank, cwd, processes: int = 2) -> list[subprocess.CompletedProcess]:
    """``processes`` copies of ``intrain`` with the variables torchrun would give each."""
    procs = [subprocess.Popen([sys.executable, "-m", "intrain", *args], cwd=cwd, env={**ENV, **env_of_rank(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(processes)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=TIMEOUT), *p.communicate()) for p in procs]


def _torchrun_env(rank: int) -> dict[str, str]:
    return dict(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT="1")


@pytest.mark.parametrize("args, env_of_rank, message", [
    (("train", "--arith", "float", "--epochs", "1"), _torchrun_env,
     "intrain: error: --arith float does not train data-parallel: run it in one process"),
    (("train", "--epochs", "1"), lambda rank: dict(_torchrun_env(rank), RANK=str(rank + 2)),
     "intrain: error: WORLD_SIZE=2, RANK="),
    (("train", "--epochs", "1"), lambda rank: dict(_torchrun_env(rank), WORLD_SIZE="two"),
     "intrain: error: WORLD_SIZE='two' is not an integer"),
], ids=["float-twin", "rank-outside-world", "world-not-a-number"])
def test_bad_input_stops_every_process_with_one_line(args, env_of_rank, message, tmp_path):
    out = tmp_path / "run"
    for proc in _workers((*args, "--out", str(out)), env_of_rank, tmp_path):
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stdout == ""
    assert not out.exists()
    assert _written(tmp_path) == []
