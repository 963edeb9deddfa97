"""Metrics also go to TensorBoard event files (tensorboard is part of the test extras, so this
runs in CI): one scalar per epoch and metric, equal to metrics.csv, and a resumed run does not
repeat the epochs it had already logged."""

import csv

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from intrain.cli import main
from intrain.methods.float_twin import FloatTwin

JOB = ["train", "--dataset", "digits", "--model", "mlp", "--epochs", "2", "--train-limit", "300"]


def _scalars(run_dir):
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _csv(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_every_epoch_metric_is_written_as_a_scalar(tmp_path):
    run_dir = tmp_path / "run"
    assert main([*JOB, "--out", str(run_dir)]) == 0
    scalars = _scalars(run_dir)
    assert sorted(scalars) == ["eval_acc/int8", "train_acc/int8", "train_loss/int8"]
    for name in ("train_loss", "train_acc", "eval_acc"):
        logged = scalars[f"{name}/int8"]
        assert [step for step, _ in logged] == [1, 2]
        for (_, value), row in zip(logged, _csv(run_dir)):
            assert abs(value - float(row[name])) <= 1e-4 * max(1.0, abs(float(row[name])))


class Crash(Exception):
    """Stands for the process dying in the middle of a step."""


def test_resumed_run_logs_each_epoch_once(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    original = FloatTwin.train_step

    def crashing(self, x, y, step, epoch):
        if step == 15:  # in the second epoch (10 steps of 32 per epoch)
            raise Crash
        return original(self, x, y, step, epoch)

    monkeypatch.setattr(FloatTwin, "train_step", crashing)
    with pytest.raises(Crash):
        main([*JOB, "--arith", "float", "--checkpoint-every", "4", "--out", str(run_dir)])
    monkeypatch.setattr(FloatTwin, "train_step", original)
    assert main(["train", "--resume", str(run_dir)]) == 0
    logged = _scalars(run_dir)["eval_acc/float"]
    assert [step for step, _ in logged] == [1, 2]
    assert [f"{value:.4f}" for _, value in logged] == [f"{float(r['eval_acc']):.4f}" for r in _csv(run_dir)]
