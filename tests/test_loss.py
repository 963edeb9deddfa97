"""The integer softmax cross-entropy gradient against float math (tests may use floats)."""


from fractions import Fraction

import pytest
import torch

from intrain.methods.loss import (EXP2_FRACTION_TABLE, EXP_PRECISION, FRACTION_BITS, PROB_BITS, cross_entropy_grad,
                                  smoothing_share, softmax_scaled)
from intrain.numeric.formats import DFP16
from intrain.numeric.qtensor import QTensor


def test_exp2_table_is_rounded_powers_of_two():
    steps = 1 << FRACTION_BITS
    assert EXP2_FRACTION_TABLE == [round(2 ** (EXP_PRECISION - k / steps)) for k in range(steps)]


def test_softmax_close_to_float_softmax():
    gen = torch.Generator().manual_seed(0)
    for e in (-6, -4, -2, 0):
        v = torch.randint(-127, 128, (64, 10), generator=gen).to(torch.int8)
        p = softmax_scaled(QTensor.of(v, e)).to(torch.float64) / 2**PROB_BITS
        ref = torch.softmax(v.to(torch.float64) * 2.0**e, dim=1)
        assert (p - ref).abs().max().item() < 2e-3, e
        assert (p.sum(1) - 1).abs().max().item() < 10 / 2**PROB_BITS


def test_gradient_sign_range_and_expectation():
    gen = torch.Generator().manual_seed(1)
    v = torch.randint(-127, 128, (256, 10), generator=gen).to(torch.int8)
    y = torch.randint(0, 10, (256,), generator=gen)
    logits = QTensor.of(v, -5)
    g = cross_entropy_grad(logits, y, seed=0, step=0)
    assert g.v.dtype == torch.int8 and int(g.v.abs().max()) <= 127
    rows = torch.arange(256)
    assert (g.v[rows, y] <= 0).all()
    off_target = torch.ones_like(g.v, dtype=torch.bool)
    off_target[rows, y] = False
    assert (g.v[off_target] >= 0).all()
    # Averaged over many rounding draws, the int8 error equals softmax - onehot.
    ref = torch.softmax(v.to(torch.float64) * 2.0**-5, dim=1)
    ref[rows, y] -= 1
    mean = sum(cross_entropy_grad(logits, y, 0, step).to_float().to(torch.float64) for step in range(200)) / 200
    assert (mean - ref).abs().max().item() < 0.02
    assert not torch.equal(g.v, cross_entropy_grad(logits, y, seed=0, step=1).v)


def test_confident_correct_rows_give_zero_error():
    v = torch.tensor([[127, -127, -127]], dtype=torch.int8)
    g = cross_entropy_grad(QTensor.of(v, 0), torch.tensor([0]), 0, 0)
    assert g.v.abs().max().item() <= 1


@pytest.mark.parametrize("eps, classes, share", [(0.0, 10, 0), (0.1, 10, 164), (0.1, 1000, 2), (0.3, 7, 702),
                                                  (0.999, 2, 8184)])
def test_the_smoothing_share_is_the_rounded_exact_share(eps, classes, share):
    assert smoothing_share(eps, classes) == share
    assert abs(Fraction(share) - Fraction(eps) * 2**PROB_BITS / classes) <= Fraction(1, 2)


@pytest.mark.parametrize("eps, classes", [(1.0, 10), (-0.1, 10), (0.99, 20000)])
def test_a_smoothing_out_of_range_or_rounding_the_target_below_zero_is_refused(eps, classes):
    with pytest.raises(ValueError, match="label smoothing"):
        smoothing_share(eps, classes)


def test_the_smoothed_error_is_softmax_minus_the_smoothed_target_exactly_at_16_bits():
    """A 16-bit format holds the scaled error (|g| <= 2**PROB_BITS) without rounding, so the
    smoothed error is exactly the plain one minus the share everywhere plus K shares at the label,
    at the extremes too (-128 and 127 logits, a row at the largest spread)."""
    gen = torch.Generator().manual_seed(3)
    v = torch.randint(-128, 128, (64, 10), generator=gen).to(torch.int16)
    v[0] = torch.tensor([127] + [-128] * 9)
    v[1] = torch.tensor([-128] + [127] * 9)
    y = torch.randint(0, 10, (64,), generator=gen)
    y[0], y[1] = 0, 0
    logits = QTensor.of(v, -4)
    plain = cross_entropy_grad(logits, y, 0, 0, DFP16)
    smoothed = cross_entropy_grad(logits, y, 0, 0, DFP16, label_smoothing=0.1)
    assert int(plain.e) == int(smoothed.e) == -PROB_BITS
    expected = plain.v.to(torch.int64) - 164
    expected[torch.arange(64), y] += 10 * 164
    assert torch.equal(smoothed.v.to(torch.int64), expected)
    assert torch.equal(cross_entropy_grad(logits, y, 0, 0, DFP16, label_smoothing=0.0).v, plain.v)


def test_the_smoothed_int8_error_averages_to_softmax_minus_the_smoothed_target():
    gen = torch.Generator().manual_seed(4)
    v = torch.randint(-127, 128, (256, 10), generator=gen).to(torch.int8)
    y = torch.randint(0, 10, (256,), generator=gen)
    logits = QTensor.of(v, -5)
    ref = torch.softmax(v.to(torch.float64) * 2.0**-5, dim=1) - 0.1 / 10
    ref[torch.arange(256), y] -= 0.9
    mean = sum(cross_entropy_grad(logits, y, 0, step, label_smoothing=0.1).to_float().to(torch.float64)
               for step in range(200)) / 200
    assert (mean - ref).abs().max().item() < 0.02


@pytest.mark.parametrize("arith", ["int8", "dfp16", "float"])
def test_every_method_trains_on_the_smoothed_target_it_is_given(arith):
    """One step from the same start at smoothing 0 and 0.5: the weights differ (each method passes its
    option to its loss), and smoothing 0 is the method without the option."""
    from intrain.methods import METHODS

    method = METHODS[arith]
    gen = torch.Generator().manual_seed(1)
    pixels = QTensor(torch.randint(0, 128, (12, 1, 28, 28), dtype=torch.int8, generator=gen), torch.tensor(-7))
    y = torch.randint(0, 10, (12,), generator=gen)
    extra = {"int8": {"update": "sgd", "lr": 0.5, "weight_average": "none"}, "dfp16": {"lr": 0.5},
             "float": {"lr": 0.5}}[arith]

    def weights_after_a_step(**smoothing):
        options = method.Options(**extra, **smoothing)
        model = method.build_model(options, "lenet5", (1, 28, 28), 10, seed=2, width=0.5, device="cpu")
        method(model, options, seed=4, total_steps=10).train_step(method.network_input(pixels), y, step=3, epoch=0)
        return [t.detach().clone() for t in model.state_dict().values()]

    plain, zero, smoothed = weights_after_a_step(), weights_after_a_step(label_smoothing=0.0), \
        weights_after_a_step(label_smoothing=0.5)
    assert all(torch.equal(a, b) for a, b in zip(plain, zero))
    assert not all(torch.equal(a, b) for a, b in zip(plain, smoothed))


def test_the_recipe_smooths_vgg_small_7_on_fashion_mnist_for_every_arithmetic_and_nothing_else():
    """Label smoothing is chosen for all three arithmetics or none (a twin without it would not be
    int8's comparator); a run saved before the option existed resumes without it; the command line wins."""
    from intrain.run.config import TrainConfig
    from intrain.run.recipes import default_recipe

    for arith in ("int8", "dfp16", "float"):
        assert default_recipe("fashion-mnist", "vgg-small-7", arith).options["label_smoothing"] == 0.1
        assert TrainConfig(dataset="fashion-mnist", model="vgg-small-7", arith=arith).resolved() \
            .options["label_smoothing"] == 0.1
        for dataset, model in (("fashion-mnist", "lenet5"), ("mnist", "vgg-small-7"), ("cifar10", "vgg-small-8")):
            assert "label_smoothing" not in default_recipe(dataset, model, arith).options
        given = TrainConfig(dataset="fashion-mnist", model="vgg-small-7", arith=arith, options={"label_smoothing": 0.0})
        assert given.resolved().options["label_smoothing"] == 0.0
        saved = TrainConfig(dataset="fashion-mnist", model="vgg-small-7", arith=arith, epochs=2, batch_size=64,
                            options={"lr": 0.05, "update": "sgd"} if arith == "int8" else {"lr": 0.05})
        assert TrainConfig.from_dict(dict(saved.__dict__)).resolved().options["label_smoothing"] == 0.0
    flat = {"dataset": "fashion-mnist", "model": "vgg-small-7", "arith": "int8", "epochs": 2, "batch_size": 64}
    assert TrainConfig.from_dict(flat).resolved().options["label_smoothing"] == 0.0
