"""Epoch weight averaging: the integer mean is the nearest integer to the true mean, lies in the
range of the averaged weights, is applied only inside ``applied()``, and survives a checkpoint."""

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from intrain.methods.averaging import WeightAverage
from intrain.numeric.rounding import divide_round
from intrain.methods.niti import Niti, NitiOptions
from intrain.models import build_int_model
from intrain.numeric.qtensor import QTensor
from intrain.layers import weighted_layers


@pytest.mark.parametrize("total, count, expected", [
    (7, 2, 4), (-7, 2, -4), (5, 3, 2), (-5, 3, -2), (4, 3, 1), (-4, 3, -1), (0, 5, 0),
    (127 * 9, 9, 127), (-127 * 9, 9, -127), (254, 3, 85), (-3 * 32767 + 1, 3, -32767),
])
def test_divide_round_hand_cases(total, count, expected):
    assert divide_round(torch.tensor([total]), count).item() == expected


def test_divide_round_refuses_no_steps():
    with pytest.raises(ValueError, match="cannot divide by 0"):
        divide_round(torch.tensor([1]), 0)


def _nearest_away(q: Fraction) -> int:
    magnitude = abs(q)
    rounded = int(magnitude) + (1 if magnitude - int(magnitude) >= Fraction(1, 2) else 0)
    return rounded if q >= 0 else -rounded


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(-32767, 32767), min_size=1, max_size=6), min_size=1, max_size=40))
def test_divide_round_is_nearest_and_within_range(steps):
    width = len(steps[0])
    steps = [s[:width] + s[:1] * (width - len(s)) for s in steps]  # every step the same width
    values = torch.tensor(steps, dtype=torch.int64).T  # (elements, steps)
    count = len(steps)
    mean = divide_round(values.sum(1), count)
    for i, row in enumerate(values.tolist()):
        assert mean[i].item() == _nearest_away(Fraction(sum(row), count))
        assert min(row) <= mean[i].item() <= max(row)


def _batch(seed, n=16):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 128, (n, 1, 8, 8), generator=gen).to(torch.int8)
    return QTensor.of(x, -7), torch.randint(0, 10, (n,), generator=gen)


@pytest.mark.parametrize("weight_bits", [8, 16])
def test_applied_holds_the_mean_and_restores_the_latest(weight_bits):
    options = NitiOptions(mu_schedule="0:5" if weight_bits == 8 else "0:4", weight_bits=weight_bits,
                          weight_average="epoch")
    model = build_int_model("mlp", (1, 8, 8), 10, seed=0, backend="reference", fmt=options.fmt)
    trainer = Niti(model, options, seed=0)
    target = "weight_master" if weight_bits == 16 else "weight"
    seen = [[] for _ in weighted_layers(model)]
    for step in range(5):
        trainer.train_step(*_batch(step), step=step, epoch=0)
        for history, layer in zip(seen, weighted_layers(model)):
            history.append(getattr(layer, target).to(torch.int64).clone())
    latest = [layer.weight.clone() for layer in weighted_layers(model)]
    with trainer.averaged():
        for history, layer in zip(seen, weighted_layers(model)):
            expected = divide_round(torch.stack(history).sum(0), len(history))
            assert torch.equal(getattr(layer, target).to(torch.int64), expected)
            assert int(layer.weight.abs().max()) <= 127 and layer.weight.dtype == torch.int8
        averaged = [layer.weight.clone() for layer in weighted_layers(model)]
    assert all(torch.equal(a, layer.weight) for a, layer in zip(latest, weighted_layers(model)))
    assert any(not torch.equal(a, b) for a, b in zip(averaged, latest))


def test_without_averaging_or_steps_the_model_is_untouched():
    model = build_int_model("mlp", (1, 8, 8), 10, seed=0, backend="reference")
    before = [layer.weight.clone() for layer in weighted_layers(model)]
    for average in ("epoch", "none"):
        trainer = Niti(model, NitiOptions(mu_schedule="0:5", weight_average=average), seed=0)
        with trainer.averaged():
            assert all(torch.equal(b, layer.weight) for b, layer in zip(before, weighted_layers(model)))


def test_state_round_trip_and_mismatch():
    model = build_int_model("mlp", (1, 8, 8), 10, seed=0, backend="reference")
    trainer = Niti(model, NitiOptions(mu_schedule="0:5", weight_average="epoch"), seed=0)
    for step in range(3):
        trainer.train_step(*_batch(step), step=step, epoch=0)
    state = trainer.average.state_dict()
    copy = WeightAverage(model)
    copy.load_state_dict(state)
    assert copy.count == 3 and all(torch.equal(a, b) for a, b in zip(copy.sums, trainer.average.sums))
    other = build_int_model("mlp", (1, 8, 8), 10, seed=0, backend="reference", width=0.5)
    with pytest.raises(ValueError, match="does not match"):
        WeightAverage(other).load_state_dict(state)
    trainer.begin_epoch(1)
    assert trainer.average.count == 0 and trainer.average.sums is None


@pytest.mark.parametrize("mode, restarts", [("epoch", [0, 1, 2, 3]), ("phase", [0, 2]), ("none", [])])
def test_sums_restart_every_epoch_or_when_mu_changes(monkeypatch, tmp_path, mode, restarts):
    from intrain.cli import main

    seen = []
    real = Niti.train_step

    def recording(self, x, y, step, epoch):
        if self.average is not None and self.average.count == 0:
            seen.append(epoch)
        return real(self, x, y, step, epoch)

    monkeypatch.setattr(Niti, "train_step", recording)
    assert main(["train", "--epochs", "4", "--train-limit", "64", "--mu-schedule", "0:4,2:3",
                 "--weight-average", mode, "--out", str(tmp_path / mode)]) == 0
    assert seen == restarts


def test_unknown_weight_average_is_refused():
    model = build_int_model("mlp", (1, 8, 8), 10, seed=0, backend="reference")
    with pytest.raises(ValueError, match="unknown --weight-average 'mean'"):
        Niti(model, NitiOptions(mu_schedule="0:5", weight_average="mean"), seed=0)
