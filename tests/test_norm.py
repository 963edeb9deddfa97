"""The integer batch normalisation (layers.norm): its integer square root, forward and backward
against float64 BatchNorm (batch statistics, no affine, epsilon one input unit squared), the
extremes of the int8 range, running statistics for evaluation and in checkpoints, a batch split
over two simulated processes giving the same bits as one, and ResNet-18 with it: integer-only in
training and evaluation, with its float twin's BatchNorm at the same places."""

import math
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from intrain.layers import IntBatchNorm, StepContext
from intrain.layers.norm import MAX_COUNT
from intrain.numeric.rounding import isqrt
from intrain.methods.niti import Niti, NitiOptions
from intrain.models import build_float_model, build_int_model
from intrain.numeric.formats import NumberFormat
from intrain.numeric.qtensor import QTensor

from test_integer_only import FloatAudit


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 2**62), min_size=1, max_size=20))
def test_isqrt_is_the_exact_floor(values):
    n = torch.tensor(values, dtype=torch.int64)
    assert isqrt(n).tolist() == [math.isqrt(v) for v in values]


def test_isqrt_worst_cases():
    edges = [0, 1, 2, 3, 4, 15, 16, 17, 2**62, 2**63 - 1, (2**31 - 1) ** 2, (2**31 - 1) ** 2 - 1, 2**48 * 16130]
    assert isqrt(torch.tensor(edges, dtype=torch.int64)).tolist() == [math.isqrt(v) for v in edges]


def _float_bn(x: QTensor):
    """float64 BatchNorm of ``x`` with batch statistics, no affine, epsilon one unit of x squared."""
    xf = x.to_float().to(torch.float64).requires_grad_()
    unit = 2.0 ** int(x.e)
    return xf, torch.nn.functional.batch_norm(xf, None, None, training=True, eps=unit * unit)


def _inputs(seed: int, shape=(16, 6, 5, 5)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-127, 128, shape, generator=gen)
    x[:, 1] = x[:, 1] // 16 + 60          # offset, narrow channel
    x[:, 2] = 0                            # constant channel
    x[:, 3] = 0
    x[0, 3, 0, 0] = 1                      # one non-zero value: the largest normalised outlier
    x[:, 4] = torch.where(x[:, 4] > 0, 127, -127)  # the int8 extremes only
    x[:, 5] = x[:, 5].clamp(min=0)         # after a ReLU
    return x.to(torch.int8)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("exponent", [-30, -5, 0, 12])
@pytest.mark.parametrize("correlated_error", [False, True])
def test_forward_and_backward_against_float64(seed, exponent, correlated_error):
    x = QTensor.of(_inputs(seed), exponent)
    bn = IntBatchNorm(6).train()
    y = bn(x)
    assert y.v.dtype == torch.int8 and int(y.e) == -4
    xf, ref = _float_bn(x)
    # the fixed exponent: +-127 units of sigma/16; within half a unit plus the scale's rounding
    error = (y.to_float().to(torch.float64) - ref.clamp(-127 / 16, 127 / 16)).abs().max()
    assert error <= 16.0 ** -1 * (0.5 + 2.0**-10)
    if correlated_error:  # channel means far from zero, errors and inputs alike
        d = QTensor.of(_inputs(seed + 100).flip(0), exponent - 3)
    else:
        gen = torch.Generator().manual_seed(seed + 100)
        d = QTensor.of(torch.randint(-127, 128, x.v.shape, generator=gen).to(torch.int8), exponent - 3)
    dx = bn.backward(d, None)
    assert dx.v.dtype == torch.int8
    ref.backward(d.to_float().to(torch.float64))
    # h (the rounded output) stands in for the exact normalised value per element: within
    # about half a unit of the result
    assert (dx.to_float().to(torch.float64) - xf.grad).abs().max() <= 0.6 * 2.0 ** int(dx.e)
    assert dx.v.abs().max() >= 64  # requantised to full range


def test_clip_at_eight_standard_deviations():
    # one value of 4096 is ~64 sigma away: clipped to 127 (7.94 sigma), the others stay exact
    x = torch.zeros(4096, 1, dtype=torch.int8)
    x[0, 0] = 127
    y = IntBatchNorm(1).train()(QTensor.of(x, -7))
    assert int(y.v[0, 0]) == 127 and int(y.v[1:].abs().max()) <= 1


def test_stochastic_error_rounding_is_keyed_and_close():
    fmt = NumberFormat(error_rounding="stochastic")
    x = QTensor.of(_inputs(3), -6)
    d = QTensor.of(_inputs(4).flip(0), -9)
    results = []
    for step in (0, 0, 1):
        bn = IntBatchNorm(6, fmt).train()
        bn(x, StepContext(0, step))
        results.append(bn.backward(d, StepContext(0, step)))
    assert torch.equal(results[0].v, results[1].v) and not torch.equal(results[0].v, results[2].v)
    xf, ref = _float_bn(x)
    ref.backward(d.to_float().to(torch.float64))
    assert (results[2].to_float().to(torch.float64) - xf.grad).abs().max() <= 1.1 * 2.0 ** int(results[2].e)


def test_count_limit():
    bn = IntBatchNorm(1).train()
    with pytest.raises(ValueError, match="positions per channel"):
        bn(QTensor.of(torch.zeros(MAX_COUNT + 1, 1, dtype=torch.int8), 0))


def _wide_inputs(seed: int, shape=(16, 6, 5, 5)) -> torch.Tensor:
    """int16 inputs like ``_inputs`` (offset and narrow, constant, single-outlier, extreme-only and
    rectified channels) at full 16-bit scale, a random low byte below each int8 value."""
    gen = torch.Generator().manual_seed(seed + 50)
    low = torch.randint(0, 256, shape, generator=gen)
    x = (_inputs(seed, shape).to(torch.int32) * 256 + low).clamp(-32767, 32767)
    x[:, 2] = 0
    x[:, 3] = 0
    x[0, 3, 0, 0] = 1
    x[:, 4] = torch.where(x[:, 4] > 0, 32767, -32767)
    return x.to(torch.int16)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("exponent", [-30, 0])
@pytest.mark.parametrize("correlated_error", [False, True])
def test_dfp16_forward_and_backward_against_float64(seed, exponent, correlated_error):
    """16-bit values at a small count (no narrowing): the output within half a unit of 2**-12
    standard deviations plus 2**-5 (the multiplier's rounding, |x| * 2**-20) and the relative error
    of r = isqrt(M**2 (variance + 1)) (its floor: below 1 / r) times |y|; the input gradient within
    1.5 units plus twice that relative error of the channel's largest gradient (the floor enters
    1 / sigma and sum(dz * y) / r; it shows where sigma is below a few units, as in the channel
    holding a single 1)."""
    from intrain.numeric.formats import DFP16

    x = QTensor.of(_wide_inputs(seed), exponent)
    bn = IntBatchNorm(6, DFP16).train()
    y = bn(x)
    assert y.v.dtype == torch.int16 and int(y.e) == -12 and bn._saved[-1] == 0
    xf, ref = _float_bn(x)
    clipped = ref.clamp(-32767 / 4096, 32767 / 4096)
    units = x.v.double()
    r = (units.var((0, 2, 3), unbiased=False) + 1).sqrt() * (x.v.numel() // 6)
    bound = 2.0**-12 * (0.5 + 2.0**-5 + 2.0**-10) + clipped.abs() / r.view(1, -1, 1, 1)
    assert ((y.to_float().to(torch.float64) - clipped).abs() <= bound).all()
    if correlated_error:
        d = QTensor.of(_wide_inputs(seed + 100).flip(0), exponent - 3)
    else:
        gen = torch.Generator().manual_seed(seed + 100)
        d = QTensor.of(torch.randint(-32767, 32768, x.v.shape, generator=gen).to(torch.int16), exponent - 3)
    dx = bn.backward(d, None)
    assert dx.v.dtype == torch.int16
    ref.backward(d.to_float().to(torch.float64))
    error = (dx.to_float().to(torch.float64) - xf.grad).abs().amax((0, 2, 3))
    assert (error <= 1.5 * 2.0 ** int(dx.e) + 2 * xf.grad.abs().amax((0, 2, 3)) / r).all()
    assert dx.v.abs().max() >= 1 << 14  # requantised to full range


@pytest.mark.parametrize("samples, narrowing", [(64, 0), (1024, 2), (4096, 4)])
def test_dfp16_statistics_narrow_with_the_count(samples, narrowing):
    """At M positions per channel the statistics come from copies of min(16, 30 - ceil(log2 M))
    bits (the int64 bounds): each copy within one unit of 2**k input units, so the mean and the
    standard deviation within about 2**k units, the output within 2**k (1 + 1.5 |y|) / sigma; the
    input gradient close to float64's."""
    from intrain.numeric.formats import DFP16

    gen = torch.Generator().manual_seed(samples)
    v = (torch.randn(samples, 2, 8, 8, generator=gen) * 4000 + 700).round()
    v[:, 1] = v[:, 1].clamp(min=0)  # after a ReLU
    x = QTensor.of(v.clamp(-32767, 32767).to(torch.int16), -9)
    bn = IntBatchNorm(2, DFP16).train()
    y = bn(x)
    assert bn._saved[-1] == narrowing
    xf, ref = _float_bn(x)
    sigma = x.v.double().std((0, 2, 3), unbiased=False).view(1, -1, 1, 1)
    bound = 2.0**narrowing * (1 + 1.5 * ref.abs()) / sigma + 2.0**-11
    assert ((y.to_float().to(torch.float64) - ref).abs() <= bound).all()
    d = QTensor.of(torch.randint(-32767, 32768, x.v.shape, generator=gen).to(torch.int16), -20)
    dx = bn.backward(d, None)
    ref.backward(d.to_float().to(torch.float64))
    assert (dx.to_float().to(torch.float64) - xf.grad).abs().max() <= 2.0**(narrowing - 6) * xf.grad.abs().max()


def test_running_statistics_for_evaluation_and_checkpoints():
    x = QTensor.of(_inputs(5), -6)
    bn = IntBatchNorm(6).train()
    train_out = bn(x)
    bn.clear_saved()
    bn.eval()
    # the first batch sets the running statistics: evaluation on it gives the same bits
    assert torch.equal(bn(x).v, train_out.v)
    # the running statistics are real values: the same integers at a coarser exponent are a
    # twice larger input, which they normalise differently
    bigger = bn(QTensor.of(x.v, -5))
    assert int(bigger.v[:, 0].to(torch.int64).sum()) != int(train_out.v[:, 0].to(torch.int64).sum())
    # a checkpoint keeps them
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    assert set(state) == {"running_mean", "running_std", "stats_exp", "batches_tracked"}
    fresh = IntBatchNorm(6)
    fresh.load_state_dict(state)
    fresh.eval()
    assert torch.equal(fresh(x).v, train_out.v)
    # a layer that never trained normalises by the batch's own statistics
    assert torch.equal(IntBatchNorm(6).eval()(x).v, train_out.v)


def test_running_statistics_momentum_is_a_setting():
    bn = IntBatchNorm(1, momentum_shift=1).train()
    bn(QTensor.of(torch.tensor([[0], [16]], dtype=torch.int8), 0))    # mean 8 sets them
    bn(QTensor.of(torch.tensor([[80], [96]], dtype=torch.int8), 0))   # mean 88: half of the way
    assert int(bn.running_mean[0]) == 48 << 16


def test_running_statistics_move_by_an_eighth():
    bn = IntBatchNorm(1).train()
    first = QTensor.of(torch.tensor([[0], [16]], dtype=torch.int8), 0)    # mean 8
    second = QTensor.of(torch.tensor([[80], [96]], dtype=torch.int8), 0)  # mean 88
    bn(first)
    bn(second)
    # frame: 16 guard bits below the input's unit; mean 8 + (88 - 8) / 8 = 18
    assert int(bn.running_mean[0]) == 18 << 16 and int(bn.stats_exp) == -16 and int(bn.batches_tracked) == 2
    # the next batch has a coarser exponent: the averages move into its frame, exactly
    bn(QTensor.of(torch.tensor([[9], [9]], dtype=torch.int8), 1))  # mean 18 in the first unit
    assert int(bn.running_mean[0]) == 9 << 16 and int(bn.stats_exp) == -15


class ThreadCollective:
    """Two threads as two processes: sum and max by exchanging tensors at a barrier."""

    def __init__(self, rank: int, shared: dict, barrier: threading.Barrier) -> None:
        self.rank, self.world, self.shared, self.barrier = rank, 2, shared, barrier

    def _reduce(self, t, op):
        self.shared[self.rank] = t.clone()
        self.barrier.wait()
        out = op(self.shared[0], self.shared[1])
        self.barrier.wait()
        return out

    def sum(self, t):
        return self._reduce(t, torch.add)

    def max(self, t):
        return self._reduce(t, torch.maximum)


def _halves_give_the_whole(fmt, x, d, y, dx, whole):
    """Two threads, each a process of a ThreadCollective holding half of the batch x (errors d),
    give the outputs, input gradients and state of ``whole`` (which gave y and dx on all of it)."""
    shared, barrier, results, half = {}, threading.Barrier(2), {}, x.v.shape[0] // 2

    def run(rank):
        part = IntBatchNorm(6, fmt).train()
        ctx = StepContext(0, 0, sample_offset=half * rank, collective=ThreadCollective(rank, shared, barrier))
        rows = slice(half * rank, half * rank + half)
        out = part(QTensor(x.v[rows], x.e), ctx)
        grad = part.backward(QTensor(d.v[rows], d.e), ctx)
        results[rank] = (out, grad, part.state_dict())

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert torch.equal(torch.cat([results[0][0].v, results[1][0].v]), y.v)
    assert torch.equal(torch.cat([results[0][1].v, results[1][1].v]), dx.v)
    assert int(results[0][1].e) == int(results[1][1].e) == int(dx.e)
    for rank in (0, 1):
        for key, value in whole.state_dict().items():
            assert torch.equal(results[rank][2][key], value)


@pytest.mark.parametrize("error_rounding", ["nearest"])
def test_two_processes_give_the_bits_of_one(error_rounding):
    fmt = NumberFormat(error_rounding=error_rounding)
    x = QTensor.of(_inputs(6, (8, 6, 4, 4)), -6)
    d = QTensor.of(_inputs(7, (8, 6, 4, 4)), -9)
    whole = IntBatchNorm(6, fmt).train()
    y = whole(x, StepContext(0, 0))
    dx = whole.backward(d, StepContext(0, 0))
    _halves_give_the_whole(fmt, x, d, y, dx, whole)


@pytest.mark.parametrize("samples, narrowing", [(8, 0), (2048, 1)])
def test_dfp16_two_processes_give_the_bits_of_one(samples, narrowing):
    """16-bit values: the narrowing comes from the global count (one more sum over the
    processes), so two halves of a batch give the whole batch's bits, narrowed or not."""
    from intrain.numeric.formats import DFP16

    x = QTensor.of(_wide_inputs(8, (samples, 6, 4, 4)), -6)
    d = QTensor.of(_wide_inputs(9, (samples, 6, 4, 4)).flip(0), -9)
    whole = IntBatchNorm(6, DFP16).train()
    y = whole(x, StepContext(0, 0))
    assert whole._saved[-1] == narrowing
    dx = whole.backward(d, StepContext(0, 0))
    _halves_give_the_whole(DFP16, x, d, y, dx, whole)


def test_dfp16_resnet18_step_and_evaluation_are_integer_only():
    from intrain.methods.dfp16 import Dfp16, Dfp16Options

    options = Dfp16Options(lr=0.05, backend="reference")
    model = Dfp16.build_model(options, "resnet18", (1, 28, 28), 10, seed=0, width=0.125, device="cpu")
    trainer = Dfp16(model, options, seed=0, total_steps=10)
    gen = torch.Generator().manual_seed(0)
    x = Dfp16.network_input(QTensor.of(torch.randint(0, 128, (8, 1, 28, 28), generator=gen).to(torch.int8), -7))
    y = torch.arange(8) % 10
    with FloatAudit() as audit:
        trainer.train_step(x, y, step=0, epoch=0)
        model.eval()
        logits = model(x)
    assert audit.float_ops == [], sorted(set(audit.float_ops))
    assert logits.v.shape == (8, 10) and logits.v.dtype == torch.int16


def test_resnet18_has_integer_batch_norm_where_the_twin_has_batch_norm():
    model = build_int_model("resnet18", (1, 28, 28), 10, seed=0, width=0.125)
    twin = build_float_model("resnet18", (1, 28, 28), 10, width=0.125)
    int_norms = [m.channels for m in model.modules() if isinstance(m, IntBatchNorm)]
    float_norms = [m.num_features for m in twin.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert int_norms == float_norms and len(int_norms) == 20
    assert any(k.endswith("running_std") for k in model.state_dict())


@pytest.mark.parametrize("weight_bits", [8, 16])
def test_resnet18_step_and_evaluation_are_integer_only(weight_bits):
    options = NitiOptions(mu_schedule="0:2", weight_bits=weight_bits)
    model = build_int_model("resnet18", (1, 28, 28), 10, seed=0, backend="reference", width=0.125,
                            fmt=options.fmt)
    trainer = Niti(model, options, seed=0)
    gen = torch.Generator().manual_seed(0)
    x = QTensor.of(torch.randint(0, 128, (8, 1, 28, 28), generator=gen).to(torch.int8), -7)
    y = torch.arange(8) % 10
    with FloatAudit() as audit:
        trainer.train_step(x, y, step=0, epoch=0)
        model.eval()
        with trainer.averaged():
            logits = model(x)
    assert audit.float_ops == [], sorted(set(audit.float_ops))
    assert logits.v.shape == (8, 10)


def test_resnet18_recipe():
    from intrain.run.recipes import default_recipe

    int8, flt = default_recipe("mnist", "resnet18", "int8"), default_recipe("mnist", "resnet18", "float")
    assert (int8.epochs, int8.batch_size, flt.epochs, flt.batch_size) == (10, 64, 10, 64)
    assert int8.options == {"mu_schedule": "0:1,4:0", "weight_average": "none", "lr": 0.05, "update": "sgd"}
    fashion = default_recipe("fashion-mnist", "resnet18", "int8")
    assert (fashion.epochs, fashion.options["update"], fashion.options["lr"]) == (15, "sgd", 0.05)
    # the other models keep their dataset's numbers
    assert default_recipe("mnist", "lenet5", "int8").batch_size == 256
    assert default_recipe("mnist", "lenet5", "int8").options == {"mu_schedule": "0:5,8:4,14:3", "lr": 0.2}
