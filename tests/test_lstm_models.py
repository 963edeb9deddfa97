"""The recurrent models through the command line: bad factorisations and ranks are refused with
one line, and training, resume, eval and plot work as for the other models."""

from __future__ import annotations

import json

import pytest

from cli_checks import assert_refused, run_until_crash
from intrain.cli import main
from intrain.methods.niti import Niti
from intrain.models.zoo import balanced_factors, input_to_hidden_parameters, model_spec
from test_data_idx import make_set
from test_resume import _metrics, _same, _state

TINY = ["--dataset", "moving-mnist-actions", "--width", "0.125", "--batch-size", "8", "--train-limit", "24"]


@pytest.fixture
def data(tmp_path):
    make_set(tmp_path / "mnist", n_train=40, n_test=12)
    return ["--data-dir", str(tmp_path / "mnist")]


@pytest.mark.parametrize("extra, words", [
    (["--model", "tr-lstm", "--tr-rank", "0"], "--tr-rank must be 1 or more"),
    (["--model", "tt-lstm", "--tr-input-factors", "4x8x8"], "multiply to 256, not the input size 1024"),
    (["--model", "tr-lstm", "--tr-hidden-factors", "3x5"], "multiply to 15, not the hidden size 16"),
    (["--model", "tr-lstm", "--tr-input-factors", "4xx8"], "cannot read input factors"),
    (["--model", "lstm", "--tr-rank", "4"], "--tr-rank applies to tt-lstm and tr-lstm only"),
    (["--model", "mlp", "--tr-hidden-factors", "4x4"], "applies to tt-lstm and tr-lstm only"),
    (["--model", "tr-lstm", "--augment"], "--augment does not apply to moving-mnist-actions"),
    (["--model", "tr-lstm", "--image-size", "48"], "32 or 64"),
    (["--model", "lstm", "--core-update", "sign"], "applies to the cores of tt-lstm and tr-lstm: lstm has none"),
    (["--model", "tr-lstm", "--arith", "float", "--core-update", "sign"], "--core-update does not apply to --arith float"),
    (["--model", "lstm", "--core-mu-schedule", "0:2"], "--core-mu-schedule 0:2 applies to the cores of tt-lstm"),
    (["--model", "tr-lstm", "--core-mu-schedule", "0:-1"], "--core-mu-schedule 0:-1: mu below 0 needs --weight-bits 16"),
    (["--model", "tr-lstm", "--core-mu-schedule", "5"], "--core-mu-schedule: cannot read mu schedule"),
])
def test_bad_recurrent_options_are_refused(extra, words, data, tmp_path, capsys):
    line = assert_refused(["train", *TINY, *data, *extra, "--out", str(tmp_path / "run")], capsys, tmp_path)
    assert words in line, line


def test_default_factorisations():
    assert balanced_factors(1024, 4) == (4, 8, 8, 4) and balanced_factors(4096, 4) == (8, 8, 8, 8)
    assert balanced_factors(128, 3) == (4, 8, 4)
    dense = input_to_hidden_parameters(model_spec("lstm", (10, 32, 32), 8))
    ring = input_to_hidden_parameters(model_spec("tr-lstm", (10, 32, 32), 8))
    train = input_to_hidden_parameters(model_spec("tt-lstm", (10, 32, 32), 8))
    assert dense == 1024 * 512 and ring == 64 * (4 + 8 + 8 + 4 + 4 + 4 + 8 + 4) and train < ring
    assert input_to_hidden_parameters(model_spec("mlp", (1, 8, 8), 10)) is None


@pytest.mark.parametrize("model, arith", [("tr-lstm", "int8"), ("tt-lstm", "float"), ("lstm", "int8")])
def test_train_eval_plot(model, arith, data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, *data, "--model", model, "--arith", arith, "--epochs", "1", "--out", str(run)]) == 0
    err = capsys.readouterr().err
    config = json.loads((run / "config.json").read_text())
    assert f"input-to-hidden parameters: {config['input_to_hidden_parameters']}" in err
    assert config["image_shape"] == [10, 32, 32] and config["num_classes"] == 8
    assert main(["eval", "--run", str(run)]) == 0
    assert main(["plot", str(run), "-o", str(tmp_path / "curves.png")]) == 0


def test_tr_lstm_resumes_bit_identical(data, tmp_path, monkeypatch, capsys):
    job = ["train", *TINY, *data, "--model", "tr-lstm", "--tr-rank", "3", "--epochs", "2", "--checkpoint-every", "2"]
    assert main([*job, "--out", str(tmp_path / "ref")]) == 0
    run_until_crash(monkeypatch, Niti, 4, [*job, "--out", str(tmp_path / "run")])
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    assert _same(_state(tmp_path / "run"), _state(tmp_path / "ref"))
    assert _metrics(tmp_path / "run") == _metrics(tmp_path / "ref")
    capsys.readouterr()


def test_run_saved_before_core_update_resumes_with_nitis_rule(data, tmp_path, monkeypatch, capsys):
    """A checkpoint written before --core-update existed has neither core option: its run updated
    the cores with NITI's rule and its one mu schedule, so it resumes with those although the
    tr-lstm recipe now says otherwise, bit for bit as an uninterrupted run with them given."""
    from intrain.run import checkpoint

    job = ["train", *TINY, *data, "--model", "tr-lstm", "--tr-rank", "3", "--epochs", "2", "--checkpoint-every", "2",
           "--core-update", "niti", "--mu-schedule", "0:3", "--core-mu-schedule", "0:3"]
    assert main([*job, "--out", str(tmp_path / "ref")]) == 0
    run_until_crash(monkeypatch, Niti, 4, [*job, "--out", str(tmp_path / "run")])
    path = checkpoint.checkpoint_path(tmp_path / "run")
    payload = checkpoint.load(path)
    del payload["train_config"]["options"]["core_update"], payload["train_config"]["options"]["core_mu_schedule"]
    checkpoint.save(path, payload)
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    assert _same(_state(tmp_path / "run"), _state(tmp_path / "ref"))
    capsys.readouterr()


def test_recipe_updates_tr_lstm_cores_by_sign(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, *data, "--model", "tr-lstm", "--epochs", "1", "--out", str(run)]) == 0
    options = json.loads((run / "config.json").read_text())
    assert options["core_update"] == "sign" and options["mu_schedule"] == "0:4"
    assert options["core_mu_schedule"] == "0:2,4:1" and options["weight_average"] == "epoch"
    capsys.readouterr()
