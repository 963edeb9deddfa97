"""Residual networks' integer pieces: the aligned add (exact sum, one rounding) at every exponent
gap and at the extremes, the residual block and global average pooling against float64, and the
ResNet-18 / AlexNet models with their float twins."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from intrain.kernels import get_backend
from intrain.layers import (IntConv2d, IntGlobalAvgPool2d, IntResidual, IntSequential, StepContext,
                            weighted_layers)
from intrain.layers.init import init_weight
from intrain.methods.niti import Niti, NitiOptions
from intrain.models import build_float_model, build_int_model
from intrain.numeric.formats import NumberFormat
from intrain.numeric.qtensor import QTensor
from intrain.numeric.requant import ADD_MAX_GAP, add_aligned

REF = get_backend("reference")


def exact_sum_rounded(a, ea, b, eb, bits=8):
    """The reference in Python integers: the exact sum at the finer exponent, rounded once to
    ``bits`` bits by a nearest shift (ties away from zero), clipped; (values, exponent). An
    all-zero operand takes the other's exponent (it has no scale of its own)."""
    if not any(a):
        ea = eb
    if not any(b):
        eb = ea
    base = min(ea, eb)
    sums = [x * 2 ** (ea - base) + y * 2 ** (eb - base) for x, y in zip(a, b)]
    limit = 2 ** (bits - 1) - 1
    shift = max(max(abs(s) for s in sums).bit_length() - (bits - 1), 0)
    half = (1 << shift) >> 1
    values = [min((abs(s) + half) >> shift, limit) * (1 if s >= 0 else -1) for s in sums]
    return values, base + shift


def q(values, e, dtype=torch.int8):
    return QTensor.of(torch.tensor(values, dtype=dtype), e)


@pytest.mark.parametrize("gap", [0, 1, 7, 30, ADD_MAX_GAP, ADD_MAX_GAP + 1, 60, 200])
@pytest.mark.parametrize("fine_first", [True, False])
def test_add_is_the_exact_sum_rounded_once(gap, fine_first):
    gen = torch.Generator().manual_seed(gap)
    a = torch.randint(-127, 128, (300,), generator=gen).tolist()
    b = torch.randint(-127, 128, (300,), generator=gen).tolist()
    a[:4] = [127, -127, 127, -127]
    b[:4] = [127, -127, -127, 127]  # +-127 on both sides, same and opposite signs
    a[4:6] = [64, -64]  # ties of the coarse operand once the fine one is tiny
    b[4:6] = [1, -1]
    ea, eb = (-3 - gap, -3) if fine_first else (-3, -3 - gap)
    out = add_aligned(q(a, ea), q(b, eb))
    values, e = exact_sum_rounded(a, ea, b, eb)
    assert out.v.dtype == torch.int8 and out.v.tolist() == values and int(out.e) == e


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(-127, 127), st.integers(-127, 127)), min_size=1, max_size=20),
       st.integers(-40, 40), st.integers(0, 70), st.sampled_from([8, 16]))
def test_add_matches_the_reference_for_any_values(pairs, ea, gap, bits):
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    out = add_aligned(q(a, ea), q(b, ea - gap), bits=bits)
    values, e = exact_sum_rounded(a, ea, b, ea - gap, bits)
    assert out.v.tolist() == values and int(out.e) == e


def test_add_of_int16_extremes_does_not_overflow():
    a = [32767, -32767, 32767]
    b = [32767, -32767, -32767]
    out = add_aligned(q(a, 0, torch.int16), q(b, -ADD_MAX_GAP, torch.int16), bits=16)
    values, e = exact_sum_rounded(a, 0, b, -ADD_MAX_GAP, 16)
    assert out.v.tolist() == values and int(out.e) == e


def test_an_all_zero_operand_does_not_move_the_result():
    b = [5, -7, 100]
    out = add_aligned(q([0, 0, 0], 90), q(b, -4))
    assert out.v.tolist() == b and int(out.e) == -4
    out = add_aligned(q(b, -4), q([0, 0, 0], -300))
    assert out.v.tolist() == b and int(out.e) == -4


def _block(shortcut=True):
    main = IntSequential(IntConv2d(3, 4, 3, REF, stride=2, padding=1))
    short = IntSequential(IntConv2d(3, 4, 1, REF, stride=2)) if shortcut else None
    block = IntResidual(main, short)
    for layer in weighted_layers(block):
        init_weight(layer, seed=1)
    return block


def _conv64(layer):
    w = layer.weight.to(torch.float64) * 2.0 ** int(layer.weight_exp)
    return lambda x: torch.nn.functional.conv2d(x, w, stride=layer.stride, padding=layer.padding)


def test_residual_block_forward_and_backward_follow_float64():
    """Main branch and projection shortcut, both linear, so float64 autograd gives the exact real
    result; each integer rounding (the two products, the add) is at most half of its own unit."""
    block = _block().train()
    gen = torch.Generator().manual_seed(3)
    x = QTensor.of(torch.randint(-127, 128, (2, 3, 6, 6), generator=gen, dtype=torch.int8), -7)
    y = block(x, StepContext(0, 0))
    xf = x.to_float().to(torch.float64).requires_grad_()
    yf = _conv64(block.main[0])(xf) + _conv64(block.shortcut[0])(xf)
    branch_units = [2.0 ** int(branch(x).e) for branch in (block.main, block.shortcut)]
    block(x, StepContext(0, 0))  # forward again to keep what backward needs
    assert (y.to_float().to(torch.float64) - yf).abs().max() <= (sum(branch_units) + 2.0 ** int(y.e)) / 2
    d = QTensor.of(torch.randint(-127, 128, tuple(y.v.shape), generator=gen, dtype=torch.int8), -9)
    dx = block.backward(d, StepContext(0, 0))
    yf.backward(d.to_float().to(torch.float64))
    assert dx.v.shape == x.v.shape and dx.v.dtype == torch.int8
    error_units = [2.0 ** int(layer.requantize_error(*args).e) for layer, args in (
        (block.main[0], ("conv2d_backward_input", (d.v, block.main[0].weight, (6, 6), (2, 2), (1, 1)),
                         d.e + block.main[0].weight_exp, None)),
        (block.shortcut[0], ("conv2d_backward_input", (d.v, block.shortcut[0].weight, (6, 6), (2, 2), (0, 0)),
                             d.e + block.shortcut[0].weight_exp, None)))]
    assert (dx.to_float().to(torch.float64) - xf.grad).abs().max() <= (sum(error_units) + 2.0 ** int(dx.e)) / 2
    for layer in weighted_layers(block):
        assert layer.weight_grad is not None


def test_stochastic_error_rounding_of_the_branch_point_is_keyed_by_the_block():
    fmt = NumberFormat(error_rounding="stochastic")
    blocks = [IntResidual(IntSequential(IntConv2d(2, 2, 3, REF, padding=1, fmt=fmt)), None, fmt=fmt) for _ in range(2)]
    x = QTensor.of(torch.randint(-127, 128, (2, 2, 4, 4), dtype=torch.int8), -7)
    d = QTensor.of(torch.randint(-127, 128, (2, 2, 4, 4), dtype=torch.int8), -9)
    results = []
    for block, step in zip(blocks + blocks[:1], (0, 0, 1)):
        init_weight(block.main[0], seed=5)
        block.train()
        block(x, StepContext(0, step))
        results.append(block.backward(d, StepContext(0, step)))
    assert blocks[0].layer_id == 2  # the leaf (the convolution) is 1, the block after it
    assert torch.equal(results[0].v, results[1].v)  # same key: same rounding
    assert not torch.equal(results[0].v, results[2].v)  # another step: other random numbers


def test_identity_shortcut_sends_the_error_itself():
    block = IntResidual(IntSequential(IntConv2d(4, 4, 3, REF, padding=1)), None)
    init_weight(block.main[0], seed=2)
    block.main[0].weight.zero_()  # the main branch contributes nothing: y = x, dx = d
    block.train()
    x = QTensor.of(torch.randint(-127, 128, (2, 4, 5, 5), dtype=torch.int8), -7)
    y = block(x, StepContext(0, 0))
    assert torch.equal(y.v, x.v) and int(y.e) == -7
    d = QTensor.of(torch.randint(-127, 128, (2, 4, 5, 5), dtype=torch.int8), -9)
    dx = block.backward(d, StepContext(0, 0))
    assert torch.equal(dx.v, d.v) and int(dx.e) == -9


@pytest.mark.parametrize("h, w", [(4, 4), (7, 7), (1, 3)])
def test_global_average_pooling_follows_float64(h, w):
    pool = IntGlobalAvgPool2d().train()
    x = QTensor.of(torch.randint(-127, 128, (3, 5, h, w), dtype=torch.int8), -6)
    x.v[0, 0] = 127  # a full-scale channel: the mean is 127 exactly
    y = pool(x)
    expected = x.to_float().to(torch.float64).mean(dim=(2, 3))
    assert y.v.shape == (3, 5) and (y.to_float().to(torch.float64) - expected).abs().max() <= 2.0 ** int(y.e) * 0.51
    d = QTensor.of(torch.randint(-127, 128, (3, 5), dtype=torch.int8), -8)
    dx = pool.backward(d, None)
    expected = (d.to_float().to(torch.float64) / (h * w))[:, :, None, None].expand(-1, -1, h, w)
    assert dx.v.shape == (3, 5, h, w) and (dx.to_float().to(torch.float64) - expected).abs().max() <= 2.0 ** int(dx.e) * 0.51


@pytest.mark.parametrize("name, shape", [("resnet18", (1, 28, 28)), ("resnet18", (3, 64, 64)), ("alexnet", (3, 64, 64))])
def test_models_and_their_float_twins(name, shape):
    options = NitiOptions(mu_schedule="0:4", weight_bits=16)
    model = build_int_model(name, shape, 10, seed=0, width=0.125, fmt=options.fmt)
    twin = build_float_model(name, shape, 10, width=0.125)
    int_shapes = [tuple(layer.weight.shape) for layer in weighted_layers(model)]
    float_shapes = [tuple(m.weight.shape) for m in twin.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert int_shapes == float_shapes
    ids = [m.layer_id for m in model.modules() if hasattr(m, "layer_id")]
    assert len(ids) == len(set(ids))
    method = Niti(model, options, seed=0)
    x = QTensor.of(torch.randint(0, 128, (4,) + shape, dtype=torch.int8), -7)
    y = torch.arange(4) % 10
    before = [layer.weight_master.clone() for layer in weighted_layers(model)]
    logits = method.train_step(x, y, step=0, epoch=0)
    assert logits.v.shape == (4, 10)
    assert all(not torch.equal(b, layer.weight_master) for b, layer in zip(before, weighted_layers(model)))
    assert twin(x.to_float()).shape == (4, 10)


def test_resnet_layouts_by_image_size():
    from intrain.models import model_spec

    small, large = model_spec("resnet18", (3, 32, 32), 10), model_spec("resnet18", (3, 64, 64), 10)
    assert small[0].args[2:] == (3, 1, 1) and all(s.kind != "maxpool" for s in small)
    assert large[0].args[2:] == (7, 2, 3) and large[3].kind == "maxpool"
    with pytest.raises(ValueError, match="alexnet needs images of at least 63x63"):
        model_spec("alexnet", (1, 28, 28), 10)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(-128, 127), st.integers(-128, 127)), min_size=1, max_size=20),
       st.integers(-40, 40), st.integers(-70, 70), st.sampled_from([torch.int8, torch.int16]),
       st.sampled_from(["nearest", "stochastic"]), st.booleans())
def test_narrow_cpu_sum_equals_the_int64_sum(pairs, ea, gap, dtype, mode, zero):
    """add_aligned on CPU holds the exact sum in int16/int32 when the dtypes and the shift allow:
    the same values and exponent as the int64 sum other devices make, so the same rounding (both
    modes, the same key), at gaps beyond ADD_MAX_GAP and with an all-zero operand too."""
    from intrain.numeric.requant import _exact_sum_int64, _exact_sum_narrow, requantize

    scale = 256 if dtype == torch.int16 else 1  # int16 operands up to +-32768
    a = torch.tensor([x * scale for x, _ in pairs], dtype=dtype)
    b = torch.tensor([0 if zero else y * scale + (y % scale) for _, y in pairs], dtype=dtype)
    qa, qb = QTensor.of(a, ea), QTensor.of(b, ea - gap)
    narrow, e_narrow = _exact_sum_narrow(qa, qb)
    wide, e_wide = _exact_sum_int64(qa, qb)
    assert torch.equal(narrow.to(torch.int64), wide)
    assert int(e_narrow) == int(e_wide)
    if dtype == torch.int8 and abs(gap) <= 7:
        assert narrow.dtype == torch.int16
    for bits in (8, 16):
        got = requantize(narrow, e_narrow, bits=bits, mode=mode, key=(5, 6))
        expected = requantize(wide, e_wide, bits=bits, mode=mode, key=(5, 6))
        assert torch.equal(got.v, expected.v) and int(got.e) == int(expected.e)
