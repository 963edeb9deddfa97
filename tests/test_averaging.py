"""Weight averaging: the integer mean is the nearest integer to the true mean, lies in the
range of the averaged weights, is applied only inside ``applied()``, and survives a checkpoint."""

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from intrain.methods.averaging import EpochEndAverage, WeightAverage, parse_weight_average
from intrain.numeric.requant import requantize
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


# ----------------------------------------------------------------------------- last:N (twin updates)


INT32_MAX = 2**31 - 1


def _exact_mean(snapshots):
    """Per element, the nearest integer (ties away) to the true mean of ``v * 2**e`` over the
    snapshots at the smallest exponent, and that exponent: the reference for EpochEndAverage."""
    base = min(e for _, e in snapshots)
    return [_nearest_away(Fraction(sum(v[i] * 2 ** (e - base) for v, e in snapshots), len(snapshots)))
            for i in range(len(snapshots[0][0]))], base


def _average(snapshots, last=None):
    average = EpochEndAverage([], lambda: None, last or len(snapshots), bits=8)
    for values, e in snapshots:
        average.add([QTensor(torch.tensor(values, dtype=torch.int32), torch.tensor(e))])
    return average


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 12).flatmap(lambda n: st.lists(
    st.tuples(st.lists(st.sampled_from([-INT32_MAX, INT32_MAX, 0, 1, -1]) | st.integers(-INT32_MAX, INT32_MAX),
                       min_size=3, max_size=3), st.integers(-40, -30)), min_size=n, max_size=n)))
def test_epoch_end_mean_is_the_nearest_mean_at_the_smallest_exponent(snapshots):
    average = _average(snapshots)
    expected, base = _exact_mean(snapshots)
    assert average.bases == [base]
    assert divide_round(average.sums[0], average.count).tolist() == expected
    mean = average.mean_weights()[0]
    wanted = requantize(torch.tensor(expected, dtype=torch.int64), torch.tensor(base), bits=8)
    assert torch.equal(mean.v, wanted.v) and int(mean.e) == int(wanted.e) and mean.v.dtype == torch.int8


def test_epoch_end_mean_of_the_extremes_at_the_longest_window():
    """31-bit masters of both signs, the widest exact spread of exponents (30 - bit_length(N) bits)
    and N = 2**k - 1 snapshots: the int64 sum neither wraps nor loses a bit."""
    last = 15
    gap = 30 - last.bit_length()
    snapshots = [([INT32_MAX, -INT32_MAX, INT32_MAX], 0 if k % 2 else gap) for k in range(last)]
    average = _average(snapshots, last)
    expected, base = _exact_mean(snapshots)
    assert average.bases == [base] == [0]
    assert divide_round(average.sums[0], average.count).tolist() == expected


def test_epoch_end_mean_beyond_the_spread_rounds_the_smallest_masters():
    """Exponents further apart than the sum can hold exactly: the small masters are rounded to the
    base (largest exponent minus the gap), and the mean is within one unit of the true one there."""
    snapshots = [([INT32_MAX, -5, 3], 0), ([-INT32_MAX, 7, 1000], 40), ([123456789, -INT32_MAX, 0], 12)]
    average = _average(snapshots)
    base = 40 - (30 - 2)
    assert average.bases == [base]
    true = [Fraction(sum(v[i] * 2 ** e for v, e in snapshots), 3 * 2 ** base) for i in range(3)]
    got = divide_round(average.sums[0], 3).tolist()
    assert all(abs(g - t) <= 1 for g, t in zip(got, true))
    assert int(average.sums[0].abs().max()) < 2**61


@pytest.mark.parametrize("text, value", [("phase", "phase"), ("none", "none"), ("last:3", "last:3"),
                                         ("last:007", "last:7")])
def test_weight_average_values(text, value):
    assert parse_weight_average(text) == value


@pytest.mark.parametrize("text", ["last:0", "last:", "last:-2", "last:x", "last:1.5", "mean", "last:³"])
def test_weight_average_bad_values_are_refused(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="choose one of phase, epoch, none or last:N"):
        parse_weight_average(text)


SGD_JOB = ["train", "--update", "sgd", "--lr", "0.1", "--epochs", "3", "--train-limit", "96", "--batch-size", "32"]


def test_last_epochs_saves_the_mean_of_the_last_epoch_ends_and_trains_the_same(tmp_path, monkeypatch):
    """`--weight-average last:2`: the saved int8 weights are the mean of the masters after epochs 2
    and 3 (the reference: exact rationals), each epoch's row evaluates the latest weights until the
    window begins, and training itself is the run without averaging, bit for bit."""
    from intrain.cli import main
    from intrain.run import checkpoint

    ends = []
    real = Niti.end_epoch

    def recording(self, epoch, epochs):
        ends.append([(m.v.tolist(), int(m.e)) for m in self.twin.master])
        return real(self, epoch, epochs)

    monkeypatch.setattr(Niti, "end_epoch", recording)
    assert main([*SGD_JOB, "--weight-average", "last:2", "--out", str(tmp_path / "last")]) == 0
    monkeypatch.setattr(Niti, "end_epoch", real)
    assert main([*SGD_JOB, "--weight-average", "none", "--out", str(tmp_path / "none")]) == 0
    assert len(ends) == 3
    saved = torch.load(tmp_path / "last" / "model.pt", weights_only=True)["state_dict"]
    model = build_int_model("mlp", (1, 8, 8), 10, seed=0, backend="reference")
    names = [name for name, layer in model.named_modules() if layer in weighted_layers(model)]
    for i, name in enumerate(names):
        flat = [([x for x in torch.tensor(v).flatten().tolist()], e) for v, e in (end[i] for end in ends[1:])]
        expected, base = _exact_mean(flat)
        wanted = requantize(torch.tensor(expected, dtype=torch.int64), torch.tensor(base), bits=8)
        assert torch.equal(saved[f"{name}.weight"].flatten(), wanted.v)
        assert int(saved[f"{name}.weight_exp"]) == int(wanted.e)
    masters = [checkpoint.load(checkpoint.checkpoint_path(tmp_path / run))["sgd_update"]["master"]
               for run in ("last", "none")]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*masters))
    rows = [[row.rsplit(",", 1)[0] for row in (tmp_path / run / "metrics.csv").read_text().splitlines()]
            for run in ("last", "none")]
    # epoch 1 is before the window, and epoch 2 its first end: both rows evaluate the latest weights
    assert rows[0][:3] == rows[1][:3] and rows[0][3] != rows[1][3]


def test_last_epochs_resumes_bit_identical(tmp_path, monkeypatch):
    from cli_checks import run_until_crash
    from intrain.cli import main

    job = [*SGD_JOB, "--weight-average", "last:2", "--checkpoint-every", "2"]
    assert main([*job, "--out", str(tmp_path / "ref")]) == 0
    run_until_crash(monkeypatch, Niti, 8, [*job, "--out", str(tmp_path / "run")])  # epoch 3, after epoch 2's end
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    states = [torch.load(tmp_path / run / "model.pt", weights_only=True)["state_dict"] for run in ("ref", "run")]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("args, message", [
    (["--weight-average", "last:2"], "--weight-average last:2 averages the masters of --update sgd or adamw: "
                                     "NITI's update takes phase, epoch or none"),
    (["--update", "sgd", "--lr", "0.1", "--weight-average", "epoch"], "use --weight-average last:N"),
    (["--update", "adamw", "--lr", "0.01", "--weight-average", "phase"], "use --weight-average last:N"),
])
def test_weight_average_that_does_not_fit_the_update_is_refused(tmp_path, capsys, args, message):
    from cli_checks import assert_refused

    err = assert_refused(["train", "--train-limit", "32", *args, "--out", str(tmp_path / "run")], capsys, tmp_path)
    assert message in err


def test_epoch_end_applied_holds_the_mean_and_restores_the_latest():
    """Inside ``applied()`` the layers hold the mean (here at another exponent than the latest
    weights'); afterwards the latest weights and exponents are back, bit for bit."""
    model = build_int_model("mlp", (1, 8, 8), 10, seed=0, backend="reference")
    layers = weighted_layers(model)
    latest = [(layer.weight.clone(), layer.weight_exp.clone()) for layer in layers]
    masters = [[QTensor(layer.weight.to(torch.int32) << shift, layer.weight_exp - 20) for layer in layers]
               for shift in (10, 14)]  # the latest weights times 2**-10 and 2**-6
    average = EpochEndAverage(layers, lambda: None, 2, bits=8)
    with average.applied():  # nothing added yet: the latest weights
        assert all(torch.equal(layer.weight, w) and torch.equal(layer.weight_exp, e)
                   for layer, (w, e) in zip(layers, latest))
    for snapshot in masters:
        average.add(snapshot)
    with average.applied():
        for layer, mean in zip(layers, average.mean_weights()):
            assert torch.equal(layer.weight, mean.v) and torch.equal(layer.weight_exp, mean.e)
            assert int(mean.e) != int(latest[0][1])
    assert all(torch.equal(layer.weight, w) and torch.equal(layer.weight_exp, e)
               for layer, (w, e) in zip(layers, latest))
    state = average.state_dict()
    copy = EpochEndAverage(layers, lambda: None, 2, bits=8)
    copy.load_state_dict(state)
    assert all(torch.equal(a.v, b.v) and torch.equal(a.e, b.e)
               for a, b in zip(copy.mean_weights(), average.mean_weights()))
    other = build_int_model("mlp", (1, 8, 8), 10, seed=0, backend="reference", width=0.5)
    with pytest.raises(ValueError, match="does not match"):
        EpochEndAverage(weighted_layers(other), lambda: None, 2, bits=8).load_state_dict(state)
