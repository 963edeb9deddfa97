"""NITI's int8 training with the float twin's SGD recipe as its update (``--update sgd``,
``methods.niti``, ``methods.sgd_fixed``): what the update does to the int8 weights, how the
recipe and the options choose between the two updates, and a run that resumes bit for bit.
(Two processes against one: ``tests/test_data_parallel.py``; the integer-only audit and the
per-layer update order: their own files.)"""

import pytest
import torch

from cli_checks import assert_refused, run_until_crash
from intrain.cli import main
from intrain.layers import weighted_layers
from intrain.methods.niti import Niti, NitiOptions
from intrain.numeric.qtensor import QTensor
from intrain.numeric.requant import requantize
from intrain.run import checkpoint
from intrain.run.config import TrainConfig
from intrain.run.recipes import default_recipe


def _batch(n=12, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = QTensor(torch.randint(0, 128, (n, 1, 28, 28), dtype=torch.int8, generator=gen), torch.tensor(-7))
    return x, torch.randint(0, 10, (n,), generator=gen)


def _sgd_trainer(total_steps=10, lr=0.5, weight_decay=None):
    options = NitiOptions(update="sgd", lr=lr, weight_average="none", error_rounding="stochastic",
                          weight_decay=weight_decay)
    model = Niti.build_model(options, "lenet5", (1, 28, 28), 10, seed=2, width=0.5, device="cpu")
    return model, Niti(model, options, seed=4, total_steps=total_steps)


def test_an_sgd_step_rounds_each_int32_master_to_the_int8_weight_with_its_own_exponent():
    model, trainer = _sgd_trainer()
    x, y = _batch()
    first = [(layer.weight.clone(), layer.weight_exp.clone()) for layer in weighted_layers(model)]
    for step in range(3):
        trainer.train_step(x, y, step=step, epoch=0)
    moved_exponent = False
    for layer, master, (w0, e0) in zip(weighted_layers(model), trainer.twin.master, first):
        assert master.v.dtype == torch.int32 and layer.weight.dtype == torch.int8
        expected = requantize(master.v, master.e, bits=8)  # nearest, symmetric [-127, 127]
        assert torch.equal(layer.weight, expected.v) and int(layer.weight_exp) == int(expected.e)
        assert int(layer.weight.abs().max()) >= 64  # the exponent keeps the int8 range used
        moved_exponent |= int(layer.weight_exp) != int(e0)
        assert not (torch.equal(layer.weight, w0) and int(layer.weight_exp) == int(e0)), "a layer did not move"
    # Unlike NITI's update, the weight exponent follows the weights (here the large rate grows them).
    assert moved_exponent


@pytest.mark.parametrize("weight_decay", [None, 0.0, 0.02])
def test_the_sgd_update_is_the_float_recipe_of_the_exact_mean_gradient(weight_decay):
    """Against float64 arithmetic on the integer gradients the update received in ``train_step``:
    SGD with Nesterov momentum and weight decay (the float twin's unless ``--weight-decay`` gives
    one; biases have none) on the mean over the batch, within the update's 31-bit roundings."""
    from intrain.methods.float_twin import MOMENTUM, WEIGHT_DECAY

    decay = WEIGHT_DECAY if weight_decay is None else weight_decay
    model, trainer = _sgd_trainer(total_steps=100, lr=0.25, weight_decay=weight_decay)
    x, y = _batch(n=10)
    layers = weighted_layers(model)
    masters = [torch.ldexp(m.v.double(), m.e.double()) for m in trainer.twin.master]
    velocity = [torch.zeros_like(m) for m in masters]
    original = trainer.twin.step
    for step in range(2):
        grads = {}

        def recording(step, batch, within=None):
            assert batch == 10
            for i, layer in enumerate(layers):
                if layer.weight_grad is not None and i not in grads:
                    grads[i] = torch.ldexp(layer.weight_grad.double(), layer.weight_grad_exp.double())
            return original(step, batch, within)

        trainer.twin.step = recording
        trainer.train_step(x, y, step=step, epoch=0)
        assert sorted(grads) == list(range(len(layers)))
        lr = 0.25 * (step + 1) / trainer.twin.warmup  # in the warm-up
        for i, g in grads.items():
            g = g / 10 + decay * masters[i]
            velocity[i] = MOMENTUM * velocity[i] + g
            masters[i] = masters[i] - lr * (g + MOMENTUM * velocity[i])
    for expected, master in zip(masters, trainer.twin.master):
        got = torch.ldexp(master.v.double(), master.e.double())
        assert torch.allclose(got, expected, rtol=0, atol=float(expected.abs().max()) * 2**-26)


def test_the_update_given_chooses_which_of_the_recipes_options_apply():
    # MNIST LeNet-5's recipe is NITI's update; given --update sgd, the same int8 batch takes the
    # float twin's rate scaled linearly (0.05 at 64: 0.2 at 256), and NITI's options are dropped
    resolved = TrainConfig(dataset="mnist", model="lenet5", options={"update": "sgd"}).resolved()
    assert resolved.batch_size == 256
    assert {k: resolved.options[k] for k in ("update", "lr", "mu_schedule", "weight_average", "weight_bits")} == \
        {"update": "sgd", "lr": 0.2, "mu_schedule": None, "weight_average": "none", "weight_bits": 8}
    resolved = TrainConfig(dataset="mnist", model="lenet5").resolved()
    assert (resolved.options["update"], resolved.options["lr"], resolved.batch_size) == ("niti", None, 256)
    assert resolved.options["mu_schedule"] == default_recipe("mnist", "lenet5", "int8").options["mu_schedule"]
    # a given batch size scales the rate
    resolved = TrainConfig(dataset="mnist", model="lenet5", batch_size=128, options={"update": "sgd"}).resolved()
    assert resolved.options["lr"] == 0.1


def test_a_config_saved_before_the_sgd_update_existed_reads_as_nitis():
    saved = TrainConfig(dataset="fashion-mnist", model="lenet5", options={"update": "niti"}).resolved()
    as_saved = {"options": {k: v for k, v in saved.options.items() if k not in ("update", "lr")},
                **{k: v for k, v in saved.__dict__.items() if k != "options"}}
    read = TrainConfig.from_dict(as_saved)
    assert read.options["update"] == "niti"
    assert read.method_options() == saved.method_options()


@pytest.mark.parametrize("argv, words", [
    (["train", "--update", "sgd", "--mu-schedule", "0:5"], "--mu-schedule applies to NITI's update"),
    (["train", "--update", "sgd", "--weight-bits", "16"], "--weight-bits applies to NITI's update"),
    (["train", "--update", "sgd", "--weight-decay-shift", "12"], "--weight-decay-shift applies to NITI's update"),
    (["train", "--update", "sgd", "--weight-average", "phase"], "--weight-average phase"),
    (["train", "--update", "sgd", "--lr", "0"], "--lr"),
    (["train", "--update", "adam"], "--update"),
    (["train", "--update", "niti", "--lr", "0.1"], "--lr sets the learning rate of --update sgd"),
    (["train", "--update", "niti", "--weight-decay", "0.001"], "--weight-decay sets the weight decay of --update sgd"),
    (["train", "--update", "sgd", "--weight-decay", "-0.001"], "--weight-decay: expected a number >= 0"),
    (["train", "--arith", "float", "--update", "sgd"], "--update does not apply to --arith float"),
])
def test_options_of_the_other_update_are_refused(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert words in assert_refused(argv, capsys, tmp_path)


def test_an_sgd_run_resumes_bit_for_bit_and_evaluates_as_trained(tmp_path, monkeypatch, capsys):
    job = ["train", "--update", "sgd", "--epochs", "2", "--train-limit", "96", "--batch-size", "16", "--seed", "3",
           "--checkpoint-every", "4"]
    assert main([*job, "--out", str(tmp_path / "ref")]) == 0
    run_until_crash(monkeypatch, Niti, 9, [*job, "--out", str(tmp_path / "run")])
    saved = checkpoint.load(checkpoint.checkpoint_path(tmp_path / "run"))
    assert saved["global_step"] == 8 and saved["sgd_update"]["momentum"]
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    ref, run = (torch.load(tmp_path / name / "model.pt", weights_only=True)["state_dict"] for name in ("ref", "run"))
    assert ref.keys() == run.keys() and all(torch.equal(ref[k], run[k]) for k in ref)
    assert {v.dtype for k, v in ref.items() if k.endswith(".weight")} == {torch.int8}
    out = capsys.readouterr().out
    assert main(["eval", "--run", str(tmp_path / "ref")]) == 0  # the saved int8 weights and exponents
    assert capsys.readouterr().out.splitlines()[-1] == out.splitlines()[-1]
