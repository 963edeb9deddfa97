"""The recurrent models through the command line: bad factorisations and ranks are refused with
one line, and training, resume, eval and plot work as for the other models."""

from __future__ import annotations

import json

import pytest

from cli_checks import assert_refused, run_until_crash
from intrain.cli import main
from intrain.methods.niti import Niti
from intrain.models.zoo import RecurrentOptions, balanced_factors, input_to_hidden_parameters, model_spec
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
    (["--model", "tr-lstm", "--update", "niti", "--core-mu-schedule", "0:-1"],
     "--core-mu-schedule 0:-1: mu below 0 needs --weight-bits 16"),
    (["--model", "tr-lstm", "--core-mu-schedule", "0:1"],  # the recipe's update is AdamW
     "--core-mu-schedule applies to NITI's update: leave it out with --update adamw"),
    (["--model", "tr-lstm", "--core-mu-schedule", "5"], "--core-mu-schedule: cannot read mu schedule"),
    (["--model", "lstm", "--lstm-forget-bias", "9"], "--lstm-forget-bias must be between -8 and 8, got 9"),
    (["--model", "tr-lstm", "--lstm-forget-bias", "nan"], "--lstm-forget-bias must be between -8 and 8, got nan"),
    (["--model", "tr-lstm", "--lstm-forget-bias", "one"], "--lstm-forget-bias: invalid float value: 'one'"),
])
def test_bad_recurrent_options_are_refused(extra, words, data, tmp_path, capsys):
    line = assert_refused(["train", *TINY, *data, *extra, "--out", str(tmp_path / "run")], capsys, tmp_path)
    assert words in line, line


def test_forget_bias_is_refused_for_other_models(tmp_path, capsys):
    line = assert_refused(["train", "--model", "mlp", "--lstm-forget-bias", "1", "--epochs", "1",
                           "--out", str(tmp_path / "run")], capsys, tmp_path)
    assert "--lstm-forget-bias applies to lstm, tt-lstm and tr-lstm only" in line, line


@pytest.mark.parametrize("model", ["lstm", "tr-lstm"])
def test_forget_bias_reaches_both_twins_and_is_recorded(model, data, tmp_path, capsys):
    """The float twin's forget-gate biases start at the bias given (also under --weight-init kaiming,
    which zeroes the other biases), the integer LSTM adds it in Q11; config.json keeps the value
    (the default 0 too), and eval rebuilds the integer model with it."""
    from intrain.layers.recurrent import FloatLSTM, IntLSTM
    from intrain.methods.float_twin import FloatOptions, FloatTwin

    assert model_spec(model, (10, 32, 32), 8)[0].args[3] == 0.0
    for init in ("torch", "kaiming"):
        twin = FloatTwin.build_model(FloatOptions(lr=0.1, weight_init=init), model, (10, 32, 32), 8, seed=0,
                                     width=0.125, device="cpu", recurrent=RecurrentOptions(forget_bias=1.0))
        lstm = next(m for m in twin.modules() if isinstance(m, FloatLSTM))
        bias = lstm.recurrent.bias.detach().reshape(4, -1)
        assert (bias[1] == 1.0).all() and not (bias[0] == 1.0).any()
    run = tmp_path / "run"
    assert main(["train", *TINY, *data, "--model", model, "--epochs", "1", "--lstm-forget-bias", "0.5",
                 "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["lstm_forget_bias"] == 0.5
    from intrain.run.evaluate import load_run
    loaded = load_run(run)
    assert next(m for m in loaded.model.modules() if isinstance(m, IntLSTM)).forget_offset == 1024
    default = tmp_path / "default"
    assert main(["train", *TINY, *data, "--model", model, "--epochs", "1", "--out", str(default)]) == 0
    assert json.loads((default / "config.json").read_text())["lstm_forget_bias"] == 0.0
    capsys.readouterr()


def test_run_saved_before_the_forget_bias_resumes_and_evaluates_without_one(data, tmp_path, monkeypatch, capsys):
    """A run saved before --lstm-forget-bias existed had no forget offset: it resumes bit for bit as
    an uninterrupted run with 0 given, and eval rebuilds it with 0 (the default: a new default
    needs these runs to keep 0, as run.config does for --relu-scale)."""
    from intrain.run import checkpoint
    from intrain.layers.recurrent import IntLSTM
    from intrain.run.evaluate import load_run
    from intrain.run.files import model_bytes, read_model

    job = ["train", *TINY, *data, "--model", "tr-lstm", "--tr-rank", "3", "--epochs", "2", "--checkpoint-every", "2",
           "--lstm-forget-bias", "0"]
    assert main([*job, "--out", str(tmp_path / "ref")]) == 0
    run_until_crash(monkeypatch, Niti, 4, [*job, "--out", str(tmp_path / "run")])
    path = checkpoint.checkpoint_path(tmp_path / "run")
    payload = checkpoint.load(path)
    del payload["train_config"]["lstm_forget_bias"]
    checkpoint.save(path, payload)
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    assert _same(_state(tmp_path / "run"), _state(tmp_path / "ref"))
    ref = tmp_path / "ref"
    payload = read_model(ref)
    del payload["config"]["lstm_forget_bias"]
    (ref / "model.pt").write_bytes(model_bytes(payload["config"], payload["state_dict"]))
    (ref / "config.json").write_text(json.dumps(payload["config"]))
    (ref / checkpoint.checkpoint_path(ref).name).unlink()
    loaded = load_run(ref)
    assert next(m for m in loaded.model.modules() if isinstance(m, IntLSTM)).forget_offset == 0
    capsys.readouterr()


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
           "--update", "niti", "--core-update", "niti", "--mu-schedule", "0:3", "--core-mu-schedule", "0:3"]
    assert main([*job, "--out", str(tmp_path / "ref")]) == 0
    run_until_crash(monkeypatch, Niti, 4, [*job, "--out", str(tmp_path / "run")])
    path = checkpoint.checkpoint_path(tmp_path / "run")
    payload = checkpoint.load(path)
    del payload["train_config"]["options"]["core_update"], payload["train_config"]["options"]["core_mu_schedule"]
    checkpoint.save(path, payload)
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    assert _same(_state(tmp_path / "run"), _state(tmp_path / "ref"))
    capsys.readouterr()


def test_recipe_runs_the_tr_lstm_for_40_epochs_and_the_other_lstms_for_20():
    from intrain.run.recipes import default_recipe

    for arith in ("int8", "float", "dfp16"):
        assert default_recipe("moving-mnist-actions", "tr-lstm", arith).epochs == 40
        assert default_recipe("moving-mnist-actions", "tt-lstm", arith).epochs == 20
        assert default_recipe("moving-mnist-actions", "lstm", arith).epochs == 20
    int8 = default_recipe("moving-mnist-actions", "tr-lstm", "int8")
    assert int8.batch_size == 64 and int8.options["mu_schedule"] == "0:4"
    assert int8.options["core_mu_schedule"] == "0:2,4:1"


def test_recipe_trains_the_int8_tr_lstm_with_adamw_and_its_cores_by_sign_given_nitis_update(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, *data, "--model", "tr-lstm", "--epochs", "1", "--out", str(run)]) == 0
    options = json.loads((run / "config.json").read_text())
    assert (options["update"], options["weight_average"]) == ("adamw", "none")
    assert options["lr"] == pytest.approx(0.003 * 8 / 64)  # the float twin's AdamW rate, scaled to batch 8
    assert options["mu_schedule"] is None and options["core_update"] == "niti"  # NITI's options unused
    run = tmp_path / "niti"
    assert main(["train", *TINY, *data, "--model", "tr-lstm", "--epochs", "1", "--update", "niti",
                 "--out", str(run)]) == 0
    options = json.loads((run / "config.json").read_text())
    assert options["core_update"] == "sign" and options["mu_schedule"] == "0:4"
    assert options["core_mu_schedule"] == "0:2,4:1" and options["weight_average"] == "epoch"
    capsys.readouterr()
