"""Integer layers against float64 references (exact for these integer sizes) and hand cases."""

import itertools

import pytest
import torch

from intrain.kernels import get_backend
from intrain.layers import (IntConv2d, IntFlatten, IntLinear, IntMaxPool2d, IntReLU, IntSequential,
                            StepContext, IntDropout)
from intrain.numeric.qtensor import QTensor
from intrain.numeric.requant import requantize
from intrain.numeric.formats import NumberFormat

REF = get_backend("reference")
GEN = torch.Generator().manual_seed(1)


def rand_int8(*shape, low=-127, high=128):
    return torch.randint(low, high, shape, generator=GEN).to(torch.int8)


def exact(v):
    return v.to(torch.float64)


def test_linear_forward_backward_match_float64():
    layer = IntLinear(20, 7, REF).train()
    layer.weight.copy_(rand_int8(7, 20))
    layer.weight_exp.fill_(-6)
    x = QTensor.of(rand_int8(5, 20), -7)
    y = layer(x)
    acc = (exact(x.v) @ exact(layer.weight).T).to(torch.int64)
    expected = requantize(acc, torch.tensor(-13))
    assert torch.equal(y.v, expected.v) and int(y.e) == int(expected.e)
    d = QTensor.of(rand_int8(5, 7), -9)
    dx = layer.backward(d, None)
    assert torch.equal(layer.weight_grad, (exact(d.v).T @ exact(x.v)).to(torch.int64))
    assert int(layer.weight_grad_exp) == -16
    expected = requantize((exact(d.v) @ exact(layer.weight)).to(torch.int64), torch.tensor(-15))
    assert torch.equal(dx.v, expected.v) and int(dx.e) == int(expected.e)


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), (1, 2)])
def test_conv_forward_backward_match_float64(stride, padding):
    layer = IntConv2d(3, 4, 3, REF, stride=stride, padding=padding).train()
    layer.weight.copy_(rand_int8(4, 3, 3, 3))
    x = QTensor.of(rand_int8(2, 3, 9, 9), 0)
    y = layer(x)
    xf = exact(x.v).requires_grad_()
    yf = torch.nn.functional.conv2d(xf, exact(layer.weight), stride=stride, padding=padding)
    assert torch.equal(y.v, requantize(yf.detach().to(torch.int64), torch.tensor(0)).v)
    d = QTensor.of(rand_int8(*yf.shape), 0)
    dx = layer.backward(d, None)
    wf = exact(layer.weight).requires_grad_()
    yf2 = torch.nn.functional.conv2d(exact(x.v), wf, stride=stride, padding=padding)
    (gw,) = torch.autograd.grad(yf2, wf, exact(d.v))
    (gx,) = torch.autograd.grad(yf, xf, exact(d.v))
    assert torch.equal(layer.weight_grad, gw.to(torch.int64))
    assert torch.equal(dx.v, requantize(gx.to(torch.int64), torch.tensor(0)).v)


def test_relu_and_its_error_mask():
    relu = IntReLU().train()
    x = QTensor.of(torch.tensor([[-3, 0, 5, 127, -127]], dtype=torch.int8), -2)
    assert relu(x).v.tolist() == [[0, 0, 5, 127, 0]]
    d = relu.backward(QTensor.of(torch.tensor([[9, 9, 9, -9, 9]], dtype=torch.int8), 1), None)
    assert d.v.tolist() == [[0, 0, 9, -9, 0]] and int(d.e) == 1


def test_maxpool_matches_torch_and_breaks_ties_to_the_first():
    pool = IntMaxPool2d(2).train()
    x = torch.randperm(2 * 3 * 7 * 7, generator=GEN).reshape(2, 3, 7, 7) % 255 - 127  # distinct within windows
    xq = QTensor.of(x.to(torch.int8), 0)
    y = pool(xq)
    xf = exact(x).requires_grad_()
    yf = torch.nn.functional.max_pool2d(xf, 2)
    assert torch.equal(y.v.to(torch.float64), yf)
    d = rand_int8(*y.v.shape)
    (gx,) = torch.autograd.grad(yf, xf, exact(d))
    assert torch.equal(pool.backward(QTensor.of(d, 0), None).v.to(torch.float64), gx)
    ties = QTensor.of(torch.tensor([[[[4, 4], [4, 1]]]], dtype=torch.int8), 0)
    pool(ties)
    routed = pool.backward(QTensor.of(torch.tensor([[[[7]]]], dtype=torch.int8), 0), None)
    assert routed.v.tolist() == [[[[7, 0], [0, 0]]]]


def _maxpool_reference(v: torch.Tensor, d: torch.Tensor, k: int):
    """Slow pooling: window maxima by reduction, error to the first maximum in row-major order."""
    n, c, h, w = v.shape
    ho, wo = h // k, w // k
    out = torch.zeros(n, c, ho, wo, dtype=v.dtype)
    routed = torch.zeros_like(v)
    for b, ch, i, j in itertools.product(range(n), range(c), range(ho), range(wo)):
        window = v[b, ch, i * k:(i + 1) * k, j * k:(j + 1) * k].reshape(-1).tolist()
        first = window.index(max(window))
        out[b, ch, i, j] = window[first]
        routed[b, ch, i * k + first // k, j * k + first % k] = d[b, ch, i, j]
    return out, routed


@pytest.mark.parametrize("k, h, w", [(2, 6, 6), (2, 7, 5), (3, 9, 8), (2, 1, 2), (1, 3, 4)])
def test_maxpool_matches_a_slow_reference_with_many_ties(k, h, w):
    pool = IntMaxPool2d(k).train()
    v = torch.randint(-2, 3, (3, 2, h, w), generator=GEN).to(torch.int8)  # ties in most windows
    y = pool(QTensor.of(v, -3))
    d = rand_int8(*y.v.shape)
    expected_out, expected_routed = _maxpool_reference(v, d, k)
    assert torch.equal(y.v, expected_out) and int(y.e) == -3
    routed = pool.backward(QTensor.of(d, 2), None)
    assert torch.equal(routed.v, expected_routed) and int(routed.e) == 2


def test_maxpool_worst_case_values():
    pool = IntMaxPool2d(2).train()
    v = torch.tensor([[[[-127, -127], [-127, -127]], [[127, -127], [127, 127]]]], dtype=torch.int8).reshape(1, 2, 2, 2)
    assert pool(QTensor.of(v, 0)).v.reshape(-1).tolist() == [-127, 127]
    routed = pool.backward(QTensor.of(torch.tensor([[[[-127]], [[127]]]], dtype=torch.int8), 0), None)
    assert routed.v.reshape(2, 4).tolist() == [[-127, 0, 0, 0], [127, 0, 0, 0]]


def test_dropout_mask_depends_on_step_and_is_replayed_in_backward():
    drop = IntDropout(0.5).train()
    x = QTensor.of(torch.ones(4, 1000, dtype=torch.int8), 0)
    a = drop(x, StepContext(0, 1))
    back = drop.backward(QTensor.of(torch.full((4, 1000), 3, dtype=torch.int8), 0), None)
    assert torch.equal(back.v != 0, a.v != 0)
    assert 0.45 < (a.v == 0).sum().item() / 4000 < 0.55
    assert not torch.equal(a.v, drop(x, StepContext(0, 2)).v)
    assert torch.equal(drop.eval()(x).v, x.v)


@pytest.mark.parametrize("p, scale", [(0.5, 2), (0.75, 4)])
def test_dropout_scales_kept_values_as_the_float_twin(p, scale):
    """Inverted dropout, as torch.nn.Dropout: kept values (and their errors) times 1 / (1 - p), so a
    training step sees the scale evaluation gives; -128 and 127 pass unchanged in value."""
    drop = IntDropout(p).train()
    v = rand_int8(3, 500)
    v[0, :4] = torch.tensor([-128, 127, -127, 1], dtype=torch.int8)
    x = QTensor.of(v, -3)
    out = drop(x, StepContext(0, 5))
    kept = drop._keep.bool()
    assert 0.9 / scale < kept.float().mean().item() < 1.1 / scale
    assert torch.equal(out.to_float(), torch.where(kept, x.to_float() * scale, torch.zeros(())))
    d = QTensor.of(rand_int8(3, 500), 2)
    back = drop.backward(d, None)
    assert torch.equal(back.to_float(), torch.where(kept, d.to_float() * scale, torch.zeros(())))
    assert torch.equal(drop.eval()(x).to_float(), x.to_float())


def test_dropout_refuses_a_keep_fraction_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="p = 0, 0.5, 0.75"):
        IntDropout(0.3)
    assert IntDropout(0.0).scale_bits == 0


def test_sequential_skips_the_first_layer_error():
    calls = []

    class Spy(IntLinear):
        def backward(self, d, ctx, need_input_grad=True):
            calls.append(need_input_grad)
            return super().backward(d, ctx, need_input_grad)

    model = IntSequential(IntFlatten(), Spy(12, 6, REF), IntReLU(), Spy(6, 3, REF)).train()
    x = QTensor.of(rand_int8(2, 3, 2, 2), 0)
    out = model(x)
    assert model.backward(QTensor.of(rand_int8(*out.v.shape), 0)) is None
    assert calls == [True, False]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_layer_before_a_relu_takes_the_scale_of_the_positive_side(backend):
    """With ``relu_scale="positive"`` a convolution or linear layer that a ReLU directly follows
    rounds ``max(y, 0)``: its exponent comes from the largest positive value, not from a larger
    negative one; the ReLU after it and its error mask are unchanged; a layer no ReLU follows,
    the error sent down and the ``magnitude`` format are NITI's."""
    fmt = NumberFormat(relu_scale="positive")
    kernels = get_backend(backend)
    conv, head, last = IntConv2d(2, 3, 3, kernels, padding=1, fmt=fmt), IntLinear(12, 5, kernels, fmt=fmt), \
        IntLinear(5, 4, kernels, fmt=fmt)
    model = IntSequential(conv, IntReLU(), IntMaxPool2d(2), IntFlatten(), head, IntReLU(), last).train()
    assert (conv.relu_follows, head.relu_follows, last.relu_follows) == (True, True, False)
    conv.weight.copy_(rand_int8(3, 2, 3, 3))
    conv.weight[0] = -127  # with x >= 0 below, a large negative output in every sample
    head.weight.copy_(rand_int8(5, 12))
    head.weight[0] = -127  # the pooled ReLU output is >= 0: the same for the linear layer
    last.weight.copy_(rand_int8(4, 5))
    x = QTensor.of(rand_int8(2, 2, 4, 4, low=0), 0)
    x.v[0, 0, 0, 0] = 127
    y = model(x)

    acc = REF.conv2d_forward(x.v, conv.weight, (1, 1), (1, 1))
    assert int(acc.min()) < -2 * int(acc.max())  # the plain scale would waste at least a bit
    kept = requantize(acc.clamp(min=0), torch.tensor(0))
    assert int(kept.e) < int(requantize(acc, torch.tensor(0)).e) and int(kept.v.max()) >= 64
    pooled = torch.nn.functional.max_pool2d(kept.v.float(), 2).to(torch.int8).flatten(1)
    hidden_acc = REF.linear_forward(pooled, head.weight)
    hidden = requantize(hidden_acc.clamp(min=0), kept.e + head.weight_exp)
    assert int(hidden.e) < int(requantize(hidden_acc, kept.e + head.weight_exp).e)
    out = requantize(REF.linear_forward(hidden.v, last.weight), hidden.e + last.weight_exp)
    assert torch.equal(y.v, out.v) and int(y.e) == int(out.e)

    d = QTensor.of(rand_int8(*y.v.shape), 0)
    model.backward(d)
    error = requantize(REF.linear_backward_input(d.v, last.weight), d.e + last.weight_exp)
    assert torch.equal(last.weight_grad, REF.linear_backward_weight(d.v, hidden.v))
    masked = error.v * (hidden.v > 0)
    assert torch.equal(head.weight_grad, REF.linear_backward_weight(masked, pooled))

    plain = IntSequential(IntConv2d(2, 3, 3, kernels, padding=1), IntReLU())
    plain.layers[0].weight.copy_(conv.weight)
    assert torch.equal(plain(x).v, requantize(acc, torch.tensor(0)).v.clamp(min=0))


def test_stochastic_error_rounding_is_unbiased_and_keyed_by_step():
    layer = IntLinear(64, 8, REF, fmt=NumberFormat(error_rounding="stochastic")).train()
    layer.weight.copy_(rand_int8(8, 64))
    x = QTensor.of(rand_int8(16, 64), 0)
    d = QTensor.of(rand_int8(16, 8), 0)
    exact_error = exact(d.v) @ exact(layer.weight)
    total, results = 0, []
    for step in range(300):
        layer(x)
        dx = layer.backward(d, StepContext(seed=0, step=step))
        scale = 2.0 ** int(dx.e)
        assert (exact(dx.v) * scale - exact_error).abs().max() < scale
        total = total + exact(dx.v) * scale
        results.append(dx.v)
    assert not torch.equal(results[0], results[1])
    mean_error = (total / 300 - exact_error).abs().max().item()
    assert mean_error < 0.25 * scale  # nearest rounding would leave up to 0.5 * scale
    layer(x)
    with pytest.raises(ValueError, match="StepContext"):
        layer.backward(d, None)


@pytest.mark.parametrize("extreme", [False, True])
def test_stochastic_activation_rounding_is_unbiased_keyed_by_step_and_nearest_in_evaluation(extreme):
    """A convolution with a bias and a ReLU after it (positive scale) under ``activation_rounding
    = "stochastic"``: in a training step every output is within one step of the exact rectified
    sum, the rounding differs from step to step and averages out; evaluation rounds to nearest,
    bit for bit the layer of NITI's format. ``extreme``: inputs and weights at +-127 over a
    reduction of 8*5*5 terms, the largest sums this layer can make."""
    fmt = NumberFormat(activation_rounding="stochastic", relu_scale="positive")
    layers = {}
    for name, f in (("stochastic", fmt), ("nearest", NumberFormat(relu_scale="positive"))):
        layer = IntConv2d(8, 4, 5, REF, padding=2, fmt=f, bias=True)
        layer.relu_follows = True
        layer.layer_id = 3
        layers[name] = layer
    if extreme:
        x = QTensor.of(torch.full((3, 8, 6, 6), -127, dtype=torch.int8), -3)
        weight = torch.full((4, 8, 5, 5), -127, dtype=torch.int8)
        weight[1] = 127  # channel 1's sums are all negative: rectified to 0
    else:
        x = QTensor.of(rand_int8(3, 8, 6, 6), -3)
        weight = rand_int8(4, 8, 5, 5)
    for layer in layers.values():
        layer.weight.copy_(weight)
        layer.weight_exp.fill_(-7)
        layer.bias.weight.copy_(torch.tensor([100, -127, 5, 0], dtype=torch.int8))
        layer.bias.weight_exp.fill_(-2)
    product = torch.nn.functional.conv2d(exact(x.v) * 2.0**-3, exact(weight) * 2.0**-7, padding=2)
    expected = (product + exact(layers["nearest"].bias.weight).view(1, 4, 1, 1) * 2.0**-2).clamp(min=0)
    stochastic = layers["stochastic"].train()
    total, results = 0, []
    for step in range(200):
        y = stochastic(x, StepContext(seed=0, step=step))
        scale = 2.0 ** int(y.e)
        assert (exact(y.v) * scale - expected).abs().max() < scale
        assert int(y.v.min()) >= 0
        total = total + exact(y.v) * scale
        results.append(y.v)
    assert not torch.equal(results[0], results[1])
    assert (total / 200 - expected).abs().max().item() < 0.25 * scale  # nearest leaves up to 0.5 * scale
    evaluated = stochastic.eval()(x)
    nearest = layers["nearest"].eval()(x)
    assert torch.equal(evaluated.v, nearest.v) and int(evaluated.e) == int(nearest.e)
    assert torch.equal(layers["nearest"].train()(x, StepContext(seed=0, step=0)).v, nearest.v)


def test_number_format_refuses_an_unknown_activation_rounding():
    with pytest.raises(ValueError, match="activation rounding must be one of nearest, stochastic"):
        NumberFormat(activation_rounding="floor")


@pytest.mark.parametrize("batch, expected", [(8, torch.int32), (256, torch.int64)])
def test_weight_gradient_kept_in_int32_only_when_the_bound_proves_it_fits(batch, expected):
    """LeNet-5's first convolution reduces over batch*28*28 terms: 8*784 < 2**17 fits int32,
    256*784 does not (worst case 2**14 * 200704 > 2**31), so int64; values equal either way."""
    conv = IntConv2d(1, 2, 5, get_backend("reference"), padding=2).train()
    conv.weight.fill_(127)
    x = QTensor.of(torch.full((batch, 1, 28, 28), -127, dtype=torch.int8), 0)
    conv(x)
    conv.backward(QTensor.of(torch.full((batch, 2, 28, 28), 127, dtype=torch.int8), 0), None, need_input_grad=False)
    assert conv.weight_grad.dtype == expected
    assert int(conv.weight_grad[0, 0, 2, 2]) == -127 * 127 * batch * 28 * 28


def test_layers_of_a_tree_are_found_and_numbered_like_the_flat_sequence():
    """weighted_layers and layer ids walk any module tree: a nested sequence gets the ids, weights
    and so the training steps (dropout and stochastic rounding keyed by layer) of the flat one."""
    from intrain.layers import weighted_layers
    from intrain.layers.init import init_weight

    fmt = NumberFormat(error_rounding="stochastic")

    def layers():
        return [IntFlatten(), IntLinear(12, 8, REF, fmt=fmt), IntReLU(), IntDropout(0.75),
                IntLinear(8, 6, REF, fmt=fmt), IntReLU(), IntLinear(6, 3, REF, fmt=fmt)]

    flat = IntSequential(*layers())
    parts = layers()
    nested = IntSequential(IntSequential(*parts[:4]), IntSequential(IntSequential(*parts[4:6]), parts[6]))
    assert [m.layer_id for m in parts] == [1, 2, 3, 4, 5, 6, 7]
    assert [m.layer_id for m in flat.layers] == [1, 2, 3, 4, 5, 6, 7]
    assert weighted_layers(nested) == [parts[1], parts[4], parts[6]]
    for model in (flat, nested):
        for layer in weighted_layers(model):
            init_weight(layer, seed=3)
    x = QTensor.of(rand_int8(5, 3, 2, 2), 0)
    d = QTensor.of(rand_int8(5, 3), 0)
    for model in (flat, nested):
        model.train()
        model(x, StepContext(seed=1, step=4))
        model.backward(d, StepContext(seed=1, step=4))
    for a, b in zip(weighted_layers(flat), weighted_layers(nested)):
        assert torch.equal(a.weight, b.weight) and b.weight_grad is not None
        assert torch.equal(a.weight_grad, b.weight_grad) and torch.equal(a.weight_grad_exp, b.weight_grad_exp)
