"""NITI's int8 training with the float twin's AdamW recipe as its update (``--update adamw``,
``methods.adamw_fixed``): its integer pieces against Python integers at their extremes, the update
against PyTorch's AdamW on the gradients it received, the integer-only audit, the recipe's rate,
the options it refuses, and a run that resumes bit for bit. (The per-layer update order:
tests/test_update_order.py.)"""

from fractions import Fraction
from unittest import mock

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cli_checks import assert_refused, run_until_crash
from intrain.cli import main
from intrain.layers import weighted_layers
from intrain.methods import adamw_fixed
from intrain.methods.adamw_fixed import _nearest_sqrt, _normalised, _scale64, power, quotient, second_moment_sum
from intrain.methods.float_twin import ADAMW_BETAS, ADAMW_EPS, WEIGHT_DECAY, lr_at
from intrain.methods.niti import Niti, NitiOptions
from intrain.models import build_int_model
from intrain.numeric import native
from intrain.numeric.qtensor import QTensor
from intrain.numeric.requant import requantize
from intrain.run import checkpoint
from intrain.run.config import TrainConfig

from gradients import record_mean_gradients
from test_integer_only import FloatAudit

TOP = 2**62


def _round_half_away(x: Fraction) -> int:
    n = abs(x)
    r = int(n + Fraction(1, 2)) if n.denominator != 1 else int(n)
    return r if x >= 0 else -r


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, TOP), min_size=1, max_size=8), st.integers(0, 2**31 - 1))
def test_scale64_is_the_nearest_value_at_the_raised_exponent(values, f):
    got, e = _scale64(torch.tensor(values, dtype=torch.int64), 5, (f, -3))
    assert e == 5 - 3 + 31
    assert got.tolist() == [_round_half_away(Fraction(v * f, 2**31)) for v in values]
    assert all(0 <= g < TOP for g in got.tolist())


def test_scale64_worst_cases():
    values = [0, 1, 2**31 - 1, 2**31, TOP - 1, TOP]
    for f in (0, 1, 2**30, 2**31 - 1):
        got, _ = _scale64(torch.tensor(values, dtype=torch.int64), 0, (f, 0))
        assert got.tolist() == [_round_half_away(Fraction(v * f, 2**31)) for v in values]


def _second_moment_both_ways(second, e, grad, keep, take):
    """``second_moment_sum`` by PyTorch, and by the C kernel where it is built (tests/test_native.py
    checks that it is wherever there is a compiler), which must agree bit for bit."""
    with mock.patch.object(native, "adamw_second_moment", lambda *args: None):
        reference = second_moment_sum(second, e, grad, keep, take)
    if native.available():
        assert native.adamw_second_moment(second, grad.v, keep[0], take[0], 0, 0) is not None  # the kernel runs
        fused = second_moment_sum(second, e, grad, keep, take)
        assert torch.equal(fused[0], reference[0]) and fused[1:] == reference[1:]
    return reference


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, TOP), st.integers(-(2**31 - 1), 2**31 - 1)), min_size=1, max_size=8),
       st.integers(-70, 70), st.sampled_from([(0, 0), (1, 0), (0, 1), (1, 1)]))
@example([(1419256, 1)], 29, (0, 0))  # the finer term shifted by 1: an error of 1.00023 units
def test_second_moment_sums_round_only_the_finer_term(pairs, gap, zeros):
    second = torch.tensor([0 if zeros[0] else p[0] for p in pairs], dtype=torch.int64)
    grad = QTensor(torch.tensor([0 if zeros[1] else p[1] for p in pairs], dtype=torch.int32), torch.tensor(gap - 40))
    keep, take = adamw_fixed.fixed(999, 1000), adamw_fixed.fixed(1, 1000)
    total, e, largest = _second_moment_both_ways(second, -30, grad, keep, take)
    assert largest == max(total.tolist()) and all(0 <= t < 2**63 for t in total.tolist())
    kept_e, taken_e = -30 + keep[1] + 31, 2 * (gap - 40) + take[1] + 31  # the terms' exponents
    if not second.any() and not grad.v.any():
        return
    assert e == max(exp for exp, present in ((kept_e, second.any()), (taken_e, grad.v.any())) if present)
    finer_shift = abs(kept_e - taken_e) if second.any() and grad.v.any() else 0
    for k in range(len(pairs)):
        kept = Fraction(int(second[k]) * keep[0], 2**31) * Fraction(2) ** (kept_e - e)
        taken = Fraction(int(grad.v[k]) ** 2 * take[0], 2**31) * Fraction(2) ** (taken_e - e)
        exact = kept + taken
        # half a unit for each term's scaling at its own exponent, and half a unit for the finer
        # term's shift to the coarser one: at most 1 + 2**-(s + 1) for a shift of s
        assert abs(Fraction(int(total[k])) - exact) <= 1 + Fraction(1, 2 ** (finer_shift + 1))


def test_second_moment_sum_at_the_extremes():
    second = torch.tensor([TOP, TOP - 1, 0, 1, 2**31], dtype=torch.int64)
    grad = QTensor(torch.tensor([2**31 - 1, -(2**31 - 1), 2**31 - 1, 0, -1], dtype=torch.int32), torch.tensor(0))
    for keep, take in [((2**31 - 1, -31), (2**31 - 1, -31)), ((2**30, -30), (1, 0))]:
        for e in (-31, 31, 0):
            total, _, largest = _second_moment_both_ways(second, e, grad, keep, take)
            assert 0 < largest < 2**63


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=8), st.integers(-200, 200))
def test_normalised_second_moments_keep_62_bits_and_an_even_exponent(values, e):
    v = torch.tensor(values, dtype=torch.int64)
    got, ge = _normalised(v, e)
    assert ge % 2 == 0
    if not any(values):
        assert torch.equal(got, v)
        return
    assert max(got.tolist()).bit_length() in (61, 62) or max(got.tolist()) == 2**62
    half_unit = Fraction(2) ** ge / 2
    assert all(abs(Fraction(g) * Fraction(2) ** ge - Fraction(x) * Fraction(2) ** e) <= half_unit
               for g, x in zip(got.tolist(), values))


def test_nearest_sqrt_at_the_extremes():
    values = [0, 1, 2, 3, 6, 7, TOP, TOP - 1, (2**31 - 1) ** 2, (2**31 - 1) ** 2 + 2**31 - 1,
              (2**31 - 1) ** 2 + 2**31 - 2, 2**61 + 1]
    got = _nearest_sqrt(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [min(range(max(0, int(v**0.5) - 2), int(v**0.5) + 3), key=lambda r: abs(r * r - v))
                   for v in values]


def _quotient_both_ways(second, first, root, shift, eps):
    """``quotient`` by PyTorch, and by the C kernel where it is built, bit for bit the same."""
    reference = quotient(second, first, root, shift, eps)
    if native.available():
        fused = native.adamw_quotient(second, first, root, shift, eps)
        assert fused is not None and torch.equal(fused, reference)
    return reference


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, TOP), st.integers(-(2**31 - 1), 2**31 - 1)), min_size=1, max_size=8),
       st.integers(1, 2**31 - 1), st.integers(0, 62), st.integers(0, 2**32 - 1))
def test_the_quotient_kernel_has_the_reference_bits(pairs, root, shift, eps):
    second = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
    first = torch.tensor([p[1] for p in pairs], dtype=torch.int32)
    got = _quotient_both_ways(second, first, root, shift, eps)
    for q, (v, m) in zip(got.tolist(), pairs):  # against Python integers
        r = min(range(max(0, int(v**0.5) - 2), int(v**0.5) + 3), key=lambda c: abs(c * c - v))
        d = max(_round_half_away(Fraction(r * root, 2**shift)) + eps, 1)
        assert q == _round_half_away(Fraction(m * 2**30, d))


def test_the_quotient_at_the_extremes():
    second = torch.tensor([TOP, TOP, 0, 0, 1, TOP - 1, 3], dtype=torch.int64)
    first = torch.tensor([2**31 - 1, -(2**31 - 1), 2**31 - 1, -(2**31 - 1), 0, 1, -1], dtype=torch.int32)
    for root, shift, eps in [(2**31 - 1, 62, 0), (2**31 - 1, 31, 2**32 - 1), (1, 0, 0), (2**30, 61, 1)]:
        q = _quotient_both_ways(second, first, root, shift, eps)
        assert int(q.abs().max()) <= 2**61  # a denominator of at least 1


@pytest.mark.parametrize("base", [ADAMW_BETAS[0], ADAMW_BETAS[1]])
def test_fixed_point_powers_are_within_their_truncations(base):
    ratio = base.as_integer_ratio()
    for t in (1, 2, 3, 10, 1000, 31_280):
        exact = Fraction(*ratio) ** t * 2**adamw_fixed.POWER_BITS
        assert 0 <= exact - power(ratio, t) <= t  # each truncation costs at most a unit, carried on at most t times


def _batch(n=12, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = QTensor(torch.randint(0, 128, (n, 1, 28, 28), dtype=torch.int8, generator=gen), torch.tensor(-7))
    return x, torch.randint(0, 10, (n,), generator=gen)


def _adamw_trainer(total_steps, lr, backend="auto", weight_decay=None):
    options = NitiOptions(update="adamw", lr=lr, weight_average="none", error_rounding="stochastic", backend=backend,
                          weight_decay=weight_decay)
    model = Niti.build_model(options, "lenet5", (1, 28, 28), 10, seed=2, width=0.5, device="cpu")
    return model, Niti(model, options, seed=4, total_steps=total_steps)


@pytest.mark.parametrize("weight_decay", [None, 0.1])
def test_the_adamw_update_is_pytorchs_adamw_on_the_exact_mean_gradients(weight_decay):
    """20 steps (warm-up, then cosine) of LeNet-5 against torch.optim.AdamW in float64 given the
    integer gradients each step received, with the float twin's weight decay or ``--weight-decay``'s:
    every master within 2**-11 of how far the layer moved, and each int8 weight the master rounded
    to nearest with its own exponent."""
    lr, total, steps = 0.01, 50, 20
    model, trainer = _adamw_trainer(total, lr, weight_decay=weight_decay)
    layers = weighted_layers(model)
    start = [torch.ldexp(m.v.double(), m.e.double()) for m in trainer.twin.master]
    reference = [w.clone().requires_grad_() for w in start]
    optimizer = torch.optim.AdamW(reference, lr=lr, betas=ADAMW_BETAS, eps=ADAMW_EPS,
                                  weight_decay=WEIGHT_DECAY if weight_decay is None else weight_decay)
    grads = {}
    record_mean_gradients(trainer.twin, layers, grads)
    for step in range(steps):
        grads.clear()
        trainer.train_step(*_batch(seed=step), step=step, epoch=0)
        assert sorted(grads) == list(range(len(layers)))
        for i, w in enumerate(reference):
            w.grad = grads[i]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, base_lr=lr, total_steps=total, warmup_steps=trainer.twin.warmup)
        optimizer.step()
    for w0, expected, master, layer in zip(start, reference, trainer.twin.master, layers):
        got = torch.ldexp(master.v.double(), master.e.double())
        expected = expected.detach()
        moved = float((expected - w0).abs().max())
        assert moved > 5 * lr  # the steps did not cancel out
        assert float((got - expected).abs().max()) <= moved * 2**-11
        rounded = requantize(master.v, master.e, bits=8)
        assert torch.equal(layer.weight, rounded.v) and int(layer.weight_exp) == int(rounded.e)


def test_training_steps_with_the_adamw_update_use_only_integer_tensors():
    options = NitiOptions(update="adamw", lr=0.01, weight_average="none", error_rounding="stochastic")
    model = build_int_model("lenet5", (1, 28, 28), 10, seed=0, backend="reference", fmt=options.fmt)
    trainer = Niti(model, options, seed=0, total_steps=10)
    x, y = _batch()
    before = [(layer.weight.clone(), layer.weight_exp.clone()) for layer in weighted_layers(model)]
    # the PyTorch code of the update (the C kernels give its bits: tests above)
    with FloatAudit() as audit, mock.patch.object(native, "adamw_second_moment", lambda *args: None), \
            mock.patch.object(native, "adamw_quotient", lambda *args: None):
        for step in range(3):
            trainer.train_step(x, y, step=step, epoch=0)
    assert audit.float_ops == [], f"float tensors seen in: {sorted(set(audit.float_ops))}"
    assert any(name.startswith("aten.div") for name in audit.ops)  # the moments' quotient
    assert all(not (torch.equal(w, layer.weight) and torch.equal(e, layer.weight_exp))
               for (w, e), layer in zip(before, weighted_layers(model)))


def test_the_recipe_gives_adamw_the_float_twins_rate_where_the_twin_trains_with_adamw():
    resolved = TrainConfig(dataset="moving-mnist-actions", model="tr-lstm", options={"update": "adamw"}).resolved()
    assert (resolved.options["update"], resolved.options["lr"], resolved.options["weight_average"]) == \
        ("adamw", 0.003, "none")
    assert resolved.options["core_update"] == "niti" and resolved.options["mu_schedule"] is None
    resolved = TrainConfig(dataset="moving-mnist-actions", model="tr-lstm", batch_size=128,
                           options={"update": "adamw"}).resolved()
    assert resolved.options["lr"] == 0.006
    # SGD keeps SGD's rate on the same data set
    resolved = TrainConfig(dataset="moving-mnist-actions", model="tr-lstm", options={"update": "sgd"}).resolved()
    assert resolved.options["lr"] == 0.05


def test_the_tensor_lstms_int8_recipe_is_adamw_and_the_dense_lstms_is_nitis():
    def recipe(model, *names):
        options = TrainConfig(dataset="moving-mnist-actions", model=model).resolved().options
        return tuple(options[name] for name in names)
    for model in ("tr-lstm", "tt-lstm"):
        assert recipe(model, "update", "lr", "weight_average") == ("adamw", 0.003, "none")
    assert recipe("lstm", "update", "weight_average") == ("niti", "epoch")


def test_the_int8_tr_lstm_rate_falls_with_the_rank_above_8():
    """AdamW's step is about the rate whatever a core's scale, and the cores' scale falls with the rank
    (``run.recipes``): rank 16 takes half the twin's rate, ranks up to 8 the twin's; the float twin
    and DFP16 keep theirs, and --lr overrides the recipe."""
    def lr(rank, arith="int8", **given):
        return TrainConfig(dataset="moving-mnist-actions", model="tr-lstm", arith=arith, tr_rank=rank,
                           options=given).resolved().options["lr"]
    assert [lr(rank) for rank in (None, 2, 4, 8)] == [0.003] * 4
    assert (lr(16), lr(32)) == (0.0015, 0.00075)
    assert lr(16, arith="float") == lr(16, arith="dfp16") == 0.003
    assert lr(16, lr=0.002) == 0.002
    resolved = TrainConfig(dataset="moving-mnist-actions", model="tt-lstm", tr_rank=16, options={"update": "adamw"},
                           batch_size=64).resolved()
    assert resolved.options["lr"] == 0.003  # not measured on the TT-LSTM: the twin's rate


@pytest.mark.parametrize("argv, words", [
    (["train", "--update", "adamw"], "--update adamw needs --lr here"),
    (["train", "--update", "adamw", "--lr", "0.001", "--mu-schedule", "0:5"], "--mu-schedule applies to NITI's"),
    (["train", "--update", "adamw", "--lr", "0.001", "--weight-average", "epoch"], "--update adamw changes the"),
    (["train", "--update", "adamw", "--lr", "0.001", "--weight-bits", "16"], "--weight-bits applies to NITI's"),
    (["train", "--arith", "float", "--update", "adamw"], "--update does not apply to --arith float"),
])
def test_options_adamw_cannot_use_are_refused(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert words in assert_refused(argv, capsys, tmp_path)


def test_an_adamw_run_resumes_bit_for_bit_and_evaluates_as_trained(tmp_path, monkeypatch, capsys):
    job = ["train", "--update", "adamw", "--lr", "0.002", "--epochs", "2", "--train-limit", "96", "--batch-size",
           "16", "--seed", "3", "--checkpoint-every", "4"]
    assert main([*job, "--out", str(tmp_path / "ref")]) == 0
    run_until_crash(monkeypatch, Niti, 9, [*job, "--out", str(tmp_path / "run")])
    saved = checkpoint.load(checkpoint.checkpoint_path(tmp_path / "run"))
    assert saved["global_step"] == 8 and saved["adamw_update"]["second_moment"] and saved["sgd_update"] is None
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    ref, run = (torch.load(tmp_path / name / "model.pt", weights_only=True)["state_dict"] for name in ("ref", "run"))
    assert ref.keys() == run.keys() and all(torch.equal(ref[k], run[k]) for k in ref)
    out = capsys.readouterr().out
    assert main(["eval", "--run", str(tmp_path / "ref")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == out.splitlines()[-1]
