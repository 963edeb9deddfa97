"""The training loop evaluates and saves a model with integer batch normalisation using running
statistics rebuilt from its latest weights (``run.loop.latest_statistics``), and training keeps
the statistics it gathered: checkpoints are those of a loop without the rebuilding, ``model.pt``
holds the rebuilt ones, and ``intrain eval`` gives the run's figure."""

import csv
from contextlib import nullcontext

import torch

from intrain.cli import main
from intrain.run import checkpoint, loop
from intrain.run.files import read_model

ARGS = ["train", "--dataset", "digits", "--model", "resnet18", "--width", "0.125", "--epochs", "2",
        "--checkpoint-every", "1000"]


def _buffers(state):
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] in ("running_mean", "running_std", "stats_exp", "batches_tracked")}


def test_rebuilt_statistics_are_saved_and_evaluated_but_never_trained_with(tmp_path, monkeypatch, capsys):
    rebuilt, plain = tmp_path / "rebuilt", tmp_path / "plain"
    assert main(ARGS + ["--out", str(rebuilt)]) == 0
    with monkeypatch.context() as patch:
        patch.setattr(loop, "latest_statistics", lambda *args, **kwargs: nullcontext())
        assert main(ARGS + ["--out", str(plain)]) == 0
    trained = checkpoint.load(checkpoint.checkpoint_path(rebuilt))["state_dict"]
    trained_plain = checkpoint.load(checkpoint.checkpoint_path(plain))["state_dict"]
    # training never saw the rebuilt statistics: the same weights and gathered statistics
    assert trained.keys() == trained_plain.keys()
    assert all(torch.equal(trained[k], trained_plain[k]) for k in trained)
    saved = read_model(rebuilt)["state_dict"]
    saved_plain = read_model(plain)["state_dict"]
    assert all(torch.equal(saved_plain[k], trained_plain[k]) for k in saved_plain)
    weights = [k for k in saved if k not in _buffers(saved)]
    assert all(torch.equal(saved[k], trained[k]) for k in weights)
    assert any(not torch.equal(saved[k], trained[k]) for k in _buffers(saved))  # model.pt: the rebuilt ones
    # intrain eval of model.pt gives the run's last figure
    with open(rebuilt / "metrics.csv") as f:
        last = float(list(csv.DictReader(f))[-1]["eval_acc"])
    capsys.readouterr()
    assert main(["eval", "--run", str(rebuilt)]) == 0
    assert f"eval_acc={last:.2f}" in capsys.readouterr().out


def test_a_model_without_batch_normalisation_is_left_alone(tmp_path):
    class Method:
        model = torch.nn.Sequential(torch.nn.Linear(2, 2))

    before = {k: v.clone() for k, v in Method.model.state_dict().items()}
    with loop.latest_statistics(Method, dataset=[], mean=None, batch_size=4, seed=0, epoch=0, augment=False):
        pass
    assert all(torch.equal(v, before[k]) for k, v in Method.model.state_dict().items())
