"""The integer softmax cross-entropy gradient against float math (tests may use floats)."""


import torch

from intrain.methods.loss import EXP2_FRACTION_TABLE, EXP_PRECISION, FRACTION_BITS, PROB_BITS, cross_entropy_grad, softmax_scaled
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
