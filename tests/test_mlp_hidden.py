"""``--model mlp --hidden 100,50``: the MLP with given hidden sizes (the peers' 784-100-50-10),
for both methods; recorded in config.json, restored by ``--resume`` and ``intrain eval``;
bad values refused with one line, nothing written."""

import json

import pytest
import torch

from intrain.cli import main
from intrain.methods.niti import Niti
from intrain.models import model_spec
from intrain.run import checkpoint

from cli_checks import assert_refused, run_until_crash


def _linear_shapes(run_dir):
    state = torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]
    return [tuple(v.shape) for k, v in state.items() if k.endswith("weight") and v.dim() == 2]


def test_spec_sizes_and_width():
    linears = [s.args for s in model_spec("mlp", (1, 28, 28), 10, hidden=[100, 50]) if s.kind == "linear"]
    assert linears == [(784, 100), (100, 50), (50, 10)]
    linears = [s.args for s in model_spec("mlp", (1, 28, 28), 10, 0.5, hidden=(100,)) if s.kind == "linear"]
    assert linears == [(784, 50), (50, 10)]
    default = [s.args for s in model_spec("mlp", (1, 28, 28), 10) if s.kind == "linear"]
    assert default == [(784, 512), (512, 256), (256, 10)]
    for bad in ([], [0], [3, -1], [2.5], "100,50", [True]):
        with pytest.raises(ValueError, match="--hidden"):
            model_spec("mlp", (1, 28, 28), 10, hidden=bad)
    with pytest.raises(ValueError, match="mlp only"):
        model_spec("lenet5", (1, 28, 28), 10, hidden=[100])


@pytest.mark.parametrize("arith", ["int8", "float"])
def test_train_records_hidden_and_eval_rebuilds_it(arith, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--arith", arith, "--hidden", "100,50", "--epochs", "1", "--train-limit", "200",
                 "--out", str(run_dir)]) == 0
    trained = capsys.readouterr().out.splitlines()[-1]
    assert json.loads((run_dir / "config.json").read_text())["hidden"] == [100, 50]
    shapes = _linear_shapes(run_dir)
    assert shapes == [(100, 64), (50, 100), (10, 50)]  # digits: 8x8 images
    assert main(["eval", "--run", str(run_dir)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == trained


def test_resume_keeps_hidden(tmp_path, monkeypatch, capsys):
    job = ["train", "--hidden", "30", "--epochs", "2", "--train-limit", "160", "--batch-size", "16",
           "--checkpoint-every", "4"]
    assert main([*job, "--out", str(tmp_path / "ref")]) == 0
    run_until_crash(monkeypatch, Niti, 13, [*job, "--out", str(tmp_path / "run")])
    saved = checkpoint.load(checkpoint.checkpoint_path(tmp_path / "run"))
    assert saved["global_step"] == 12
    capsys.readouterr()
    # giving another size on resume is refused; leaving it out restores the recorded one
    assert_refused(["train", "--resume", str(tmp_path / "run"), "--hidden", "31"], capsys, tmp_path)
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    ref = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)["state_dict"]
    got = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["state_dict"]
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert _linear_shapes(tmp_path / "run") == [(30, 64), (10, 30)]


@pytest.mark.parametrize("value, words", [("100,0", "positive integers"), ("a", "positive integers"),
                                          ("100,", "positive integers"), ("", "positive integers")])
def test_bad_hidden_is_refused(value, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = assert_refused(["train", "--hidden", value], capsys, tmp_path)
    assert "--hidden" in line and words in line


def test_hidden_with_another_model_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = assert_refused(["train", "--model", "lenet5", "--hidden", "100", "--out", str(tmp_path / "r")],
                          capsys, tmp_path)
    assert "--hidden applies to --model mlp only" in line
