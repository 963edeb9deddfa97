"""End-to-end training runs on digits (float twin and int8): files written, batch order,
``--train-limit``, and bit-for-bit reproducibility from the seed."""

import dataclasses
import csv
import json
import re

import pytest
import torch

from intrain.numeric import rng
from intrain.cli import main
from intrain.data import load_dataset
from intrain.methods.float_twin import FloatTwin
from intrain.models import build_float_model
from intrain.run.config import TrainConfig
from intrain.run.files import MODEL_FORMAT
from intrain.run.loop import run

COLUMNS = ["epoch", "train_loss", "train_acc", "eval_acc", "seconds"]
LAST_LINE = re.compile(r"^eval_acc=\d+\.\d\d$")


def _rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        reader = csv.reader(f)
        return next(reader), list(reader)


def _state(run_dir):
    checkpoint = torch.load(run_dir / "model.pt", weights_only=True)
    assert checkpoint["format"] == MODEL_FORMAT
    return checkpoint


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_float_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "float"
    assert main(["train", "--arith", "float", "--epochs", "3", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out.splitlines()
    assert LAST_LINE.match(stdout[-1]), stdout[-1]
    names = sorted(p.name for p in out.iterdir() if p.name != "tensorboard")  # tensorboard: when installed
    # no temp files; the manifest of what the run wrote, and the folder's lock file
    assert names == [".intrain-files.json", ".intrain.lock", "checkpoint.pt", "config.json", "metrics.csv",
                     "model.pt"]

    header, rows = _rows(out)
    assert header == COLUMNS
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    for r in rows:
        loss, train_acc, eval_acc, seconds = map(float, r[1:])
        assert loss > 0 and 0 <= train_acc <= 100 and 0 <= eval_acc <= 100 and seconds > 0
    assert float(rows[-1][1]) < float(rows[0][1])  # the loss goes down
    assert stdout[-1] == f"eval_acc={float(rows[-1][3]):.2f}"
    assert float(rows[-1][3]) > 80  # an MLP on digits after 3 epochs

    config = json.loads((out / "config.json").read_text())
    assert config["arith"] == "float" and config["epochs"] == 3 and config["batch_size"] == 32
    assert config["lr"] == pytest.approx(0.025) and config["eval_name"] == "test"
    checkpoint = _state(out)
    assert checkpoint["config"] == config
    model = build_float_model("mlp", (1, 8, 8), 10)
    model.load_state_dict(checkpoint["state_dict"])  # loads into the twin's architecture


def test_train_limit_batches_and_order(tmp_path, monkeypatch):
    """70 images, batch 32: batches of 32, 32, 6, in the order rng.permutation(70, seed, epoch)."""
    seen = []
    original = FloatTwin.train_step

    def spy(self, x, y, step, epoch):
        seen.append((step, epoch, y.clone(), x.clone()))
        return original(self, x, y, step, epoch)

    monkeypatch.setattr(FloatTwin, "train_step", spy)
    result = run(TrainConfig(arith="float", epochs=2, batch_size=32, seed=5, train_limit=70, out=str(tmp_path / "r")))
    assert result.config["train_size"] == 70 and len(result.rows) == 2
    assert [len(y) for _, _, y, _ in seen] == [32, 32, 6] * 2
    assert [s for s, _, _, _ in seen] == list(range(6)) and [e for _, e, _, _ in seen] == [0, 0, 0, 1, 1, 1]

    train = load_dataset("digits").train
    for epoch in range(2):
        order = rng.permutation(70, 5, epoch)
        labels = torch.cat([y for _, e, y, _ in seen if e == epoch])
        images = torch.cat([x for _, e, _, x in seen if e == epoch])
        assert torch.equal(labels, train.labels[:70][order])
        # The float twin sees the int8 inputs' real values: (p >> 1) / 128 for digits.
        assert torch.equal(images, (train.images[:70][order] >> 1).float() / 128)


def test_zero_epochs_reports_the_untrained_model(tmp_path, capsys):
    out = tmp_path / "zero"
    assert main(["train", "--arith", "float", "--epochs", "0", "--out", str(out)]) == 0
    assert LAST_LINE.match(capsys.readouterr().out.splitlines()[-1])
    assert _rows(out) == (COLUMNS, [])
    _state(out)


def test_float_same_seed_same_weights(tmp_path):
    def weights(seed, name):
        run(TrainConfig(arith="float", epochs=2, train_limit=200, seed=seed, out=str(tmp_path / name)))
        return _state(tmp_path / name)["state_dict"]

    a, b, c = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert _same(a, b)
    assert not _same(a, c)


def _int8_run(tmp_path, name, seed, capsys):
    out = tmp_path / name
    argv = ["train", "--arith", "int8", "--epochs", "2", "--train-limit", "256", "--seed", str(seed), "--out", str(out)]
    assert main(argv) == 0
    assert LAST_LINE.match(capsys.readouterr().out.splitlines()[-1])
    return out


def test_int8_run_end_to_end_and_reproducible(tmp_path, capsys):
    a = _int8_run(tmp_path, "a", 0, capsys)
    header, rows = _rows(a)
    assert header == COLUMNS and [int(r[0]) for r in rows] == [1, 2]
    config = json.loads((a / "config.json").read_text())
    assert config["arith"] == "int8" and config["mu_schedule"] and config["train_size"] == 256
    state = _state(a)["state_dict"]
    assert state and all(not t.is_floating_point() for t in state.values())
    assert float(rows[-1][3]) > 30  # learning something after 16 integer steps (chance is 10 %)

    b = _int8_run(tmp_path, "b", 0, capsys)
    c = _int8_run(tmp_path, "c", 1, capsys)
    assert _same(state, _state(b)["state_dict"])  # bit for bit from the seed
    assert _rows(a)[1][-1][:4] == _rows(b)[1][-1][:4]  # same losses and accuracies
    assert not _same(state, _state(c)["state_dict"])


def test_stochastic_activation_rounding_trains_reproducibly_and_evaluates_deterministically(tmp_path, capsys):
    """``--activation-rounding stochastic``: the same bits from the same seed, other bits than
    nearest rounding's, and the accuracy the run reports is its saved model's, evaluated with
    nearest rounding (``intrain eval``: no step, no random numbers)."""
    def train(name, *options):
        out = tmp_path / name
        assert main(["train", "--epochs", "2", "--train-limit", "256", "--update", "sgd", "--weight-average", "none",
                     "--out", str(out), *options]) == 0
        reported = capsys.readouterr().out.splitlines()[-1]
        return out, reported

    a, reported = train("a", "--activation-rounding", "stochastic")
    b, _ = train("b", "--activation-rounding", "stochastic")
    nearest, _ = train("nearest")
    assert json.loads((a / "config.json").read_text())["activation_rounding"] == "stochastic"
    assert _same(_state(a)["state_dict"], _state(b)["state_dict"])
    assert not _same(_state(a)["state_dict"], _state(nearest)["state_dict"])
    assert main(["eval", "--run", str(a)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == reported


def test_recipes_give_int8_and_float_their_own_batch_sizes():
    from intrain.run.recipes import default_recipe

    int8, flt = default_recipe("mnist", "lenet5", "int8"), default_recipe("mnist", "lenet5", "float")
    assert (int8.batch_size, flt.batch_size) == (256, 64)
    assert int8.options == {"mu_schedule": "0:5,8:4,14:3", "lr": 0.2} and int8.epochs == flt.epochs == 20
    assert flt.options_for(64) == {"lr": 0.05}
    assert default_recipe("digits", "mlp", "int8").batch_size == 32


def test_fashion_mnist_int8_recipe_uses_batch_128():
    from intrain.run.recipes import default_recipe

    assert default_recipe("fashion-mnist", "lenet5", "int8").batch_size == 128
    assert default_recipe("fashion-mnist", "lenet5", "float").batch_size == 64


def test_fashion_lenet5_int8_recipe_takes_the_sgd_update_and_keeps_nitis_options_for_niti():
    from intrain.run.config import TrainConfig
    from intrain.run.recipes import default_recipe

    resolved = TrainConfig(dataset="fashion-mnist", model="lenet5").resolved()
    options = resolved.options
    assert (options["update"], options["lr"], resolved.batch_size) == ("sgd", 0.14, 128)
    assert (options["error_rounding"], options["weight_bits"], options["weight_decay_shift"]) == ("stochastic", 8, None)
    assert (options["mu_schedule"], options["weight_average"], options["relu_scale"]) == (None, "none", "positive")
    assert options["biases"] == "on"
    # NITI's update given on the command line gets the options chosen for it
    options = TrainConfig(dataset="fashion-mnist", model="lenet5", options={"update": "niti"}).resolved().options
    assert (options["error_rounding"], options["weight_bits"], options["weight_decay_shift"]) == ("stochastic", 16, 18)
    assert (options["mu_schedule"], options["weight_average"], options["lr"]) == ("0:5,8:4,14:3", "phase", None)
    assert options["biases"] == "off"  # the recipe's biases are its SGD update's (NITI's refuses them)
    for other in (("mnist", "lenet5"), ("fashion-mnist", "vgg-small-8"), ("cifar10", "vgg-small-7")):
        assert not {"update", "error_rounding", "weight_bits", "weight_decay_shift", "relu_scale"} & \
            set(default_recipe(*other, "int8").options)
    assert TrainConfig(dataset="mnist", model="lenet5").resolved().options["relu_scale"] == "magnitude"
    # a run saved before --relu-scale existed resumes with the scale it was trained with
    saved = TrainConfig(dataset="fashion-mnist", model="lenet5", options={"update": "sgd", "lr": 0.14})
    saved = dataclasses.asdict(saved)
    assert "relu_scale" not in saved["options"]
    assert TrainConfig.from_dict(saved).resolved().options["relu_scale"] == "magnitude"
    assert TrainConfig.from_dict(saved).resolved().options["activation_rounding"] == "nearest"
    # VGG-small-7 on Fashion-MNIST: SGD at the int8 batch with the float rate scaled to it, biases,
    # and 30 epochs (about the float twin's cost of 20: recipes._INT8_EPOCHS)
    resolved = TrainConfig(dataset="fashion-mnist", model="vgg-small-7").resolved()
    assert (resolved.options["update"], resolved.options["lr"], resolved.batch_size) == ("sgd", 0.1, 128)
    assert (resolved.options["error_rounding"], resolved.options["biases"], resolved.epochs) == ("stochastic", "on", 30)


def test_a_log_file_gets_a_progress_line_during_long_epochs(tmp_path, capsys, monkeypatch):
    # stderr is not a terminal here, so the bar is silent; with the interval at zero every batch
    # but the last says how far the epoch has got, and the epoch's own line follows.
    import intrain.run.loop as loop
    from intrain.cli import main
    monkeypatch.setattr(loop, "LOG_PROGRESS_SECONDS", 0)
    assert main(["train", "--epochs", "1", "--batch-size", "512", "--out", str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().err.splitlines()
    progress = [line for line in lines if ", train " in line and "so far" in line]
    assert progress and progress[0].startswith("epoch 1/1: batch 1/")
    assert lines.index(progress[-1]) < next(i for i, line in enumerate(lines) if line.startswith("epoch 1/1: loss"))
