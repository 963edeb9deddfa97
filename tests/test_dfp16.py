"""DFP16 (issue 12): the int32-chunked accumulator and its bound, the integer-only SGD and AdamW
against the float ones, the float twin's optimiser as the recipe's, and the method through the
command line (training, resume, eval, foreign options)."""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings, strategies as st

from cli_checks import assert_refused, run_until_crash
from gradients import record_mean_gradients
from intrain.cli import main
from intrain.kernels import get_backend
from intrain.kernels.cpu import CpuBackend, CpuSettings
from intrain.kernels.cuda import CudaBackend
from intrain.layers import IntConv2d, IntLinear
from intrain.methods import METHODS
from intrain.methods.dfp16 import Dfp16, Dfp16Options
from intrain.methods.float_master import to_format
from intrain.methods.float_twin import lr_at, warmup_length
from intrain.methods.sgd_fixed import COS_BITS, PI_Q64, cos_pi, fixed, schedule_fraction
from intrain.numeric import wide
from intrain.numeric.accumulate import (INT32_MAX, MAX_SHIFT, chunk_bound, headroom_operands, headroom_shifts,
                                        plain_int32_wraps)
from intrain.numeric.formats import DFP16, NITI_INT8, NumberFormat
from intrain.numeric.qtensor import QTensor
from intrain.run import checkpoint
from intrain.run.config import TrainConfig

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True)
REF = get_backend("reference")
BACKENDS = (REF, CpuBackend(CpuSettings(use_int8_gemm=False)), CpuBackend(CpuSettings(use_int8_gemm=True)),
            CudaBackend())
#: The longest reductions of the model zoo. Forward and input gradient: AlexNet's first linear
#: layer (256 * 6 * 6 = 9216 inputs at 224 pixels). Weight gradient: ResNet-18's and AlexNet's
#: stem at 224 pixels and batch 256, 256 * 112 * 112 = 3,211,264 positions (ResNet-18's 7x7
#: stride-2 stem; the longest of any layer, since later layers have fewer positions).
LONGEST_FORWARD = 256 * 6 * 6
LONGEST_WEIGHT_GRAD = 256 * 112 * 112


# ------------------------------------------------------------------------------- the format

def test_dfp16_is_a_preset_of_the_one_format():
    assert (DFP16.bits, DFP16.limit, DFP16.dtype, DFP16.accumulator) == (16, 32767, torch.int16, "int32-chunked")
    assert NITI_INT8.accumulator == "exact" and NITI_INT8.chunk_length == DFP16.chunk_length
    for bad in (dict(accumulator="int48"), dict(chunk_length=0), dict(headroom=16), dict(headroom=-1),
                dict(chunk_length=True)):
        with pytest.raises(ValueError):
            NumberFormat(bits=16, **bad)


# ------------------------------------------------------------------- the accumulator's bound

@PROPERTY
@given(max_a=st.integers(0, 32767), max_b=st.integers(0, 32767), terms=st.integers(1, 10**7),
       chunk=st.integers(1, 4096), headroom=st.integers(0, 15))
def test_headroom_is_the_least_that_keeps_int32_chunks_from_wrapping(max_a, max_b, terms, chunk, headroom):
    ha, hb = headroom_shifts(max_a, max_b, terms, chunk, headroom)
    length = min(chunk, terms)
    assert min(ha, hb) >= headroom and max(ha, hb) <= MAX_SHIFT
    assert chunk_bound(max_a, max_b, length, ha, hb) <= INT32_MAX
    if ha + hb > 2 * headroom:  # one bit less, split any way, would not do
        total = ha + hb - 1
        assert all(chunk_bound(max_a, max_b, length, s, total - s) > INT32_MAX
                   for s in range(headroom, total - headroom + 1))


@pytest.mark.parametrize("value", [32767, -32767])
def test_shifted_maximum_is_attained(value):
    """The bound's A' is what nearest rounding really gives for the largest value."""
    a = torch.tensor([value], dtype=torch.int16)
    for shift in range(1, 17):
        shifted, _, total = headroom_operands(a, torch.ones(1, dtype=torch.int16), 10**6, 1, shift)
        assert abs(int(shifted)) == (32767 + (1 << (shift - 1))) >> shift and total == 2 * shift


def _full_scale(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[2, K] and [K, 3] int16 operands at +-32767: rows of equal signs (every product +2**30 -
    2**16 + 1, the largest sum) and rows whose signs cancel (partial sums as large as they get)."""
    idx = torch.arange(k)
    alternating = 1 - 2 * (idx % 2)
    a = torch.stack([alternating, torch.ones(k, dtype=torch.int64)]) * 32767
    b = torch.stack([alternating, -alternating, torch.ones(k, dtype=torch.int64)], dim=1) * 32767
    return a.to(torch.int16), b.to(torch.int16)


def _int32_chunk_sums(a: torch.Tensor, b: torch.Tensor, chunk: int) -> torch.Tensor:
    """What int32 accumulators do: every chunk of ``chunk`` terms summed in int32 (wrapping if it
    must), the chunk sums then added in int64."""
    m, k = a.shape
    pad = -k % chunk
    a32 = torch.nn.functional.pad(a.to(torch.int32), (0, pad)).view(m, 1, -1, chunk)
    b32 = torch.nn.functional.pad(b.to(torch.int32).t(), (0, pad)).view(1, b.shape[1], -1, chunk)
    partial = (a32 * b32).cumsum(-1, dtype=torch.int32)[..., -1]  # int32 running sums: they wrap
    return partial.to(torch.int64).sum(-1)


@pytest.mark.parametrize("k", [LONGEST_FORWARD, LONGEST_WEIGHT_GRAD])
def test_full_scale_int16_a_plain_int32_accumulator_wraps_the_controlled_one_is_exact(k):
    a, b = _full_scale(k)
    exact = REF.linear_forward(a, b.t().contiguous())  # int64 reference: [2, 3]
    assert exact.dtype == torch.int64
    plain = _int32_chunk_sums(a, b, k)  # one int32 accumulator over the whole reduction
    assert not torch.equal(plain, exact) and plain_int32_wraps(exact) > 0
    # with chunks of one term no headroom is needed (32767**2 < 2**31): the int64 reference itself
    a1, b1, shift = headroom_operands(a, b, k, 1, 0)
    assert shift == 0 and torch.equal(_int32_chunk_sums(a1, b1, 1), exact)
    # the default chunk length needs headroom; the int32 chunk sums give the exact sum of the
    # shifted operands, which is what every backend computes for them
    a16, b16, shift = headroom_operands(a, b, k, DFP16.chunk_length, 0)
    assert shift == 3  # (3, 0): 16 * 4096 * 32767 < 2**31 - 1, where (2, 1) gives 16 * 8192 * 16384 = 2**31
    controlled = _int32_chunk_sums(a16, b16, DFP16.chunk_length)
    assert torch.equal(controlled, REF.linear_forward(a16, b16.t().contiguous()))
    # and stands for the exact sum within the rounding of the shifted operand: with a = 8a' - r,
    # |r| <= 4, |ab - 8a'b| = |r b| <= 4 * 32767 per term
    assert ((controlled << shift) - exact).abs().max() <= k * 4 * 32767


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: repr(b))
def test_every_backend_is_exact_for_full_scale_int16_at_the_longest_reductions(backend, sign):
    a, b = _full_scale(LONGEST_FORWARD)
    a = a * sign
    w = b.t().contiguous()
    assert torch.equal(backend.linear_forward(a, w), REF.linear_forward(a, w))
    assert torch.equal(backend.linear_backward_input(a, b), REF.linear_backward_input(a, b))
    d, x = _full_scale(LONGEST_WEIGHT_GRAD)
    d, x = (sign * d).t().contiguous(), x
    assert torch.equal(backend.linear_backward_weight(d, x), REF.linear_backward_weight(d, x))
    # 3x3 convolutions over 512 channels (VGG-small's and ResNet-18's longest, 4608 terms)
    xc = (sign * 32767 * torch.ones(2, 512, 4, 4, dtype=torch.int64)).to(torch.int16)
    wc = (32767 * (1 - 2 * (torch.arange(3 * 512 * 9) % 2))).view(3, 512, 3, 3).to(torch.int16)
    assert torch.equal(backend.conv2d_forward(xc, wc, 1, 1), REF.conv2d_forward(xc, wc, 1, 1))
    dc = REF.conv2d_forward(xc, wc, 1, 1).clamp(-32767, 32767).to(torch.int16)
    assert torch.equal(backend.conv2d_backward_input(dc, wc, (4, 4), 1, 1), REF.conv2d_backward_input(dc, wc, (4, 4), 1, 1))
    assert torch.equal(backend.conv2d_backward_weight(dc, xc, 3, 1, 1), REF.conv2d_backward_weight(dc, xc, 3, 1, 1))


def _layer_results(layer, weight, x, d):
    layer.weight.copy_(weight)
    y = layer(x, None)
    g = layer.backward(d, None)
    return y.v, y.e, g.v, g.e, layer.weight_grad, layer.weight_grad_exp


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), extreme=st.booleans(), chunk=st.sampled_from([1, 16, 256]),
       headroom=st.integers(0, 3), conv=st.booleans())
def test_dfp16_layers_are_bit_identical_on_every_backend(seed, extreme, chunk, headroom, conv):
    """Forward, input error and weight gradient of int16 layers under the int32-chunked
    accumulator (random and all-+-32767 operands): every backend gives the reference's bits."""
    gen = torch.Generator().manual_seed(seed)

    def draw(shape):
        if extreme:
            return ((torch.randint(0, 2, shape, generator=gen) * 2 - 1) * 32767).to(torch.int16)
        return torch.randint(-32767, 32768, shape, generator=gen).to(torch.int16)

    fmt = NumberFormat(bits=16, accumulator="int32-chunked", chunk_length=chunk, headroom=headroom)
    if conv:
        make = lambda be: IntConv2d(5, 4, 3, be, stride=2, padding=1, fmt=fmt).train()
        x, d = QTensor.of(draw((3, 5, 9, 9)), -15), QTensor.of(draw((3, 4, 5, 5)), -20)
        weight = draw((4, 5, 3, 3))
    else:
        make = lambda be: IntLinear(37, 6, be, fmt=fmt).train()
        x, d = QTensor.of(draw((7, 37)), -15), QTensor.of(draw((7, 6)), -20)
        weight = draw((6, 37))
    expected = _layer_results(make(REF), weight, x, d)
    for backend in BACKENDS[1:]:
        got = _layer_results(make(backend), weight, x, d)
        assert all(g.dtype == e.dtype and torch.equal(g, e) for g, e in zip(got, expected))


# ------------------------------------------------------------------ the integer-only update

def test_fixed_point_factors_are_the_nearest_31_bit_values():
    for num, den in [(1, 3), (9, 10), (1, 64), (5, 10000), (*(0.05).as_integer_ratio(),), (2**40 + 1, 7)]:
        f, e = fixed(num, den)
        assert 2**30 <= f < 2**31
        assert abs(Fraction(f) * Fraction(2) ** e - Fraction(num, den)) <= Fraction(2) ** e / 2
    assert fixed(0, 5) == (0, 0)


def test_integer_schedule_is_the_float_twins():
    assert abs(PI_Q64 / 2**64 - math.pi) < 1e-15
    for a, b in [(0, 1), (1, 1), (1, 3), (2, 7), (999, 1000)]:
        assert abs(cos_pi(a, b) / 2**COS_BITS - math.cos(math.pi * a / b)) < 1e-15
    total = 937
    warmup = warmup_length(total)
    for step in range(0, total + 3):
        num, den = schedule_fraction(step, total, warmup)
        assert abs(0.05 * num / den - lr_at(step, base_lr=0.05, total_steps=total, warmup_steps=warmup)) < 1e-15


@PROPERTY
@given(a=st.integers(-2**31 + 1, 2**31 - 1), b=st.integers(-2**31 + 1, 2**31 - 1),
       ea=st.integers(-80, 20), eb=st.integers(-80, 20), f=st.integers(-2**31 + 1, 2**31 - 1))
def test_wide_operations_round_once(a, b, ea, eb, f):
    """add and scale are within one unit of their result's exponent of the exact values."""
    qa = QTensor(torch.tensor([a], dtype=torch.int32), torch.tensor(ea))
    qb = QTensor(torch.tensor([b], dtype=torch.int32), torch.tensor(eb))
    for got, exact in ((wide.add(qa, qb), Fraction(a) * 2**ea + Fraction(b) * 2**eb),
                       (wide.scale(qa, (f, eb)), Fraction(a) * f * Fraction(2) ** (ea + eb))):
        assert abs(int(got.v)) <= 2**31 - 1
        unit = Fraction(2) ** int(got.e)
        assert abs(int(got.v) * unit - exact) <= unit


def test_float_masters_become_dfp16_weights_with_the_largest_at_full_scale():
    master = torch.tensor([[0.75, -0.001, 3.0e-6], [0.0, -0.5, 0.25]], dtype=torch.float32)
    values, exponent = to_format(master, DFP16)
    assert values.dtype == torch.int16 and int(exponent) == -15  # max |W| = 0.75 < 2**0
    assert int(values.abs().max()) == 24576 and 2**14 <= 24576 < 2**15
    assert torch.equal(values[1], torch.tensor([0, -16384, 8192], dtype=torch.int16))  # exact
    assert int(values[0, 1]) == round(-0.001 * 2**15)
    assert to_format(torch.zeros(3), DFP16) is None


def _model_and_method(master: str, accumulator: str = "int32-chunked", backend: str = "reference",
                      optimizer: str = "sgd", weight_decay: float | None = None):
    lr = 0.003 if optimizer == "adamw" else 0.05
    decay = {} if weight_decay is None else {"weight_decay": weight_decay}
    options = Dfp16Options(lr=lr, dfp16_master=master, dfp16_accumulator=accumulator, backend=backend,
                           optimizer=optimizer, **decay)
    model = Dfp16.build_model(options, "lenet5", (1, 28, 28), 10, seed=0, width=1.0, device="cpu")
    return model, Dfp16(model, options, seed=0, total_steps=50)


def _batch(n=16):
    gen = torch.Generator().manual_seed(0)
    x = QTensor.of(torch.randint(0, 128, (n, 1, 28, 28), generator=gen).to(torch.int8), -7)
    return Dfp16.network_input(x), torch.randint(0, 10, (n,), generator=gen)


@pytest.mark.parametrize("weight_decay", [None, 0.05])
def test_int32_masters_follow_the_float32_masters(weight_decay):
    """Three steps from the same weights: the integer-only update lands where float32 SGD does
    (relative to the layer's largest weight, within a few units of float32's rounding), with the
    float twin's weight decay or ``--weight-decay``'s."""
    x, y = _batch()
    steps = {}
    for master in ("int32", "fp32"):
        model, method = _model_and_method(master, backend="cpu", weight_decay=weight_decay)
        for step in range(3):  # same gradients at step 0; the later ones differ by rounding only
            method.train_step(x, y, step, 0)
        steps[master] = method.update
    for (v, e), f in zip(steps["int32"].state_dict()["master"], steps["fp32"].state_dict()["master"]):
        as_float = torch.ldexp(v.to(torch.float64), e.to(torch.float64))
        assert (as_float - f.to(torch.float64)).abs().max() <= 1e-4 * f.abs().max()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("master", ["int32", "fp32"])
def test_weight_decay_is_the_float_twins_unless_given(master, optimizer):
    """Both masters and both optimisers take ``--weight-decay`` where given, else the float twin's
    5e-4 (the update's decay factor: a fixed-point scalar, a rational, or torch's group setting)."""
    from intrain.methods.sgd_fixed import fixed

    for given, decay in ((None, 5e-4), (0.0, 0.0), (0.003, 0.003)):
        _, method = _model_and_method(master, optimizer=optimizer, weight_decay=given)
        update = method.update
        if master == "fp32":
            assert update.optimizer.param_groups[0]["weight_decay"] == decay
        elif optimizer == "sgd":
            assert update.decay == fixed(*decay.as_integer_ratio())
        else:
            assert update.decay == decay.as_integer_ratio()


def test_int32_adamw_masters_follow_the_float32_ones_element_by_element():
    """One AdamW step from the same weights and gradients: each int32 master element within
    ``lr * (2**-20 + 8 * 2**-31 * max|g| / |g|)`` (and float32's rounding) of float32 AdamW's (``methods.adamw_fixed``: the
    first moment and the denominator hold 31 bits of the layer's largest, so an element's step
    is as precise as its gradient is large against the layer's largest; AdamW moves every
    element by about the rate, however small its gradient)."""
    x, y = _batch()
    lr = 0.003
    masters, grads = {}, {}
    for master in ("int32", "fp32"):
        _, method = _model_and_method(master, backend="cpu", optimizer="adamw")
        seen = {}
        record_mean_gradients(method.update, method.update.layers, seen)
        start = method.update.state_dict()["master"]
        start = [s.double() if master == "fp32" else torch.ldexp(s[0].double(), s[1].double()) for s in start]
        method.train_step(x, y, 0, 0)
        after = method.update.state_dict()["master"]
        masters[master] = [(a.double() if master == "fp32" else torch.ldexp(a[0].double(), a[1].double())) - s
                           for a, s in zip(after, start)]
        grads[master] = [seen[i] for i in range(len(method.update.layers))]
    for g_int, g_float, step_int, step_float, weight in zip(grads["int32"], grads["fp32"], masters["int32"],
                                                            masters["fp32"], start):
        assert torch.equal(g_int, g_float)  # the same weights: the same exact gradient
        # plus the float32 master's own rounding (its unit at the weight is at most 2**-23 |W|)
        bound = lr * (2**-20 + 8 * 2**-31 * g_float.abs().max() / g_float.abs()) + 2**-23 * weight.abs()
        assert bool(((step_int - step_float).abs() <= bound).all())
        assert step_float.abs().max() >= 0.9 * lr  # AdamW's first step: about the rate everywhere


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("master", ["int32", "fp32"])
def test_updating_each_layer_as_backward_reaches_it_changes_no_bit(master, optimizer):
    """A step that updates each layer as soon as its gradient is made (``train_step``) ends with
    the weights, masters and optimiser state of one that updates every layer after backward."""
    from intrain.layers import StepContext
    from intrain.methods.loss import cross_entropy_grad

    x, y = _batch()
    _, at_once = _model_and_method(master, backend="cpu", optimizer=optimizer)
    model, per_layer = _model_and_method(master, backend="cpu", optimizer=optimizer)
    for step in range(3):
        ctx = StepContext(at_once.seed, step)
        logits = at_once.model(x, ctx)
        at_once.model.backward(cross_entropy_grad(logits, y, at_once.seed, step, at_once.fmt), ctx)
        at_once.update.step(step, y.shape[0])
        per_layer.train_step(x, y, step, 0)
    for (name, a), (_, b) in zip(at_once.model.state_dict().items(), per_layer.model.state_dict().items()):
        assert torch.equal(a, b), name
    state_a, state_b = at_once.update.state_dict(), per_layer.update.state_dict()
    if master == "int32":
        keys = ("master", "momentum") if optimizer == "sgd" else ("master", "first_moment", "second_moment")
        pairs = [(a, b) for key in keys for pa, pb in zip(state_a[key], state_b[key]) for a, b in zip(pa, pb)]
        assert len(pairs) == 2 * 5 * len(keys)
    else:  # the optimizer's state is keyed by parameter, filled in another order
        moments_a, moments_b = state_a["optimizer"]["state"], state_b["optimizer"]["state"]
        assert sorted(moments_a) == sorted(moments_b) == list(range(5))
        keys = ("momentum_buffer",) if optimizer == "sgd" else ("exp_avg", "exp_avg_sq", "step")
        pairs = list(zip(state_a["master"], state_b["master"]))
        pairs += [(moments_a[i][key], moments_b[i][key]) for i in range(5) for key in keys]
        assert len(pairs) == 5 * (1 + len(keys))
    for a, b in pairs:
        assert torch.equal(a, b)


def test_plain_int32_would_wrap_in_a_lenet_step_and_the_control_never_does():
    x, y = _batch()
    counts = {}
    for accumulator in ("exact", "int32-chunked"):
        model, method = _model_and_method("int32", accumulator)
        method.train_step(x, y, 0, 0)
        counts[accumulator] = method.int32_wraps()
    assert sum(counts["exact"]) > 0 and counts["int32-chunked"] == [0] * 5


# ------------------------------------------------------------------------ the command line

JOB = ["train", "--arith", "dfp16", "--epochs", "2", "--train-limit", "96", "--batch-size", "16",
       "--seed", "3", "--checkpoint-every", "4"]


def _state(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]


@pytest.mark.parametrize("master, optimizer", [("int32", "sgd"), ("fp32", "sgd"), ("int32", "adamw"),
                                               ("fp32", "adamw")])
def test_train_resume_and_eval(tmp_path, monkeypatch, capsys, master, optimizer):
    job = [*JOB, "--dfp16-master", master, "--optimizer", optimizer] + (["--lr", "0.003"] if optimizer == "adamw" else [])
    assert main([*job, "--out", str(tmp_path / "ref")]) == 0
    run_until_crash(monkeypatch, Dfp16, 9, [*job, "--out", str(tmp_path / "run")])
    saved = checkpoint.load(checkpoint.checkpoint_path(tmp_path / "run"))
    assert saved["global_step"] == 8 and saved["dfp16_update"]["master"]
    if master == "int32":
        assert ("second_moment" in saved["dfp16_update"]) == (optimizer == "adamw")
    else:
        assert type(saved["dfp16_update"]["optimizer"]["state"][0].get("exp_avg")) is (
            torch.Tensor if optimizer == "adamw" else type(None))
    assert saved["train_config"]["options"]["optimizer"] == optimizer
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    ref, run = _state(tmp_path / "ref"), _state(tmp_path / "run")
    assert ref.keys() == run.keys() and all(torch.equal(ref[k], run[k]) for k in ref)
    assert {v.dtype for k, v in ref.items() if k.endswith(".weight")} == {torch.int16}
    out = capsys.readouterr().out
    assert main(["eval", "--run", str(tmp_path / "ref")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == out.splitlines()[-1]  # the same eval_acc


@pytest.mark.parametrize("argv, words", [
    (["train", "--arith", "dfp16", "--mu-schedule", "0:5"], "--mu-schedule does not apply to --arith dfp16"),
    (["train", "--arith", "dfp16", "--weight-bits", "16"], "--weight-bits does not apply to --arith dfp16"),
    (["train", "--dfp16-master", "fp32"], "--dfp16-master does not apply to --arith int8"),
    (["train", "--arith", "float", "--dfp16-chunk", "8"], "--dfp16-chunk does not apply to --arith float"),
    (["train", "--arith", "dfp16", "--dfp16-master", "fp64"], "--dfp16-master"),
    (["train", "--arith", "dfp16", "--dfp16-chunk", "0"], "--dfp16-chunk"),
    (["train", "--arith", "dfp16", "--dfp16-headroom", "16"], "--dfp16-headroom"),
    (["train", "--arith", "dfp16", "--optimizer", "adam"], "--optimizer"),
    (["train", "--optimizer", "adamw"], "--optimizer does not apply to --arith int8"),
    # a recipe's rate is its own optimiser's: another optimiser needs its own --lr
    (["train", "--arith", "dfp16", "--optimizer", "adamw"], "--optimizer adamw needs --lr here: the recipe's rate 0.025 is for its sgd"),
    (["train", "--arith", "float", "--optimizer", "adamw"], "--optimizer adamw needs --lr here: the recipe's rate 0.025 is for its sgd"),
    (["train", "--arith", "dfp16", "--dataset", "moving-mnist-actions", "--model", "tr-lstm", "--optimizer", "sgd"],
     "--optimizer sgd needs --lr here: the recipe's rate 0.003 is for its adamw"),
    (["train", "--arith", "float", "--dataset", "moving-mnist-actions", "--model", "lstm", "--optimizer", "sgd"],
     "--optimizer sgd needs --lr here: the recipe's rate 0.003 is for its adamw"),
])
def test_foreign_and_bad_dfp16_options_are_refused(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert words in assert_refused(argv, capsys, tmp_path)


def test_dfp16_is_registered():
    assert METHODS["dfp16"] is Dfp16 and Dfp16.integer


def test_dfp16_takes_the_float_twins_optimiser_and_rate_from_the_recipe():
    """The float recipe unchanged: AdamW at the float twin's rate where the twin trains with it
    (the recurrent models), SGD elsewhere; a config saved before DFP16 had ``optimizer`` keeps
    SGD, the update it trained with."""
    for model in ("tr-lstm", "lstm"):
        resolved = TrainConfig(dataset="moving-mnist-actions", model=model, arith="dfp16").resolved()
        twin = TrainConfig(dataset="moving-mnist-actions", model=model, arith="float").resolved()
        assert (resolved.options["optimizer"], resolved.options["lr"]) == ("adamw", 0.003)
        assert (twin.options["optimizer"], twin.options["lr"], twin.batch_size, twin.epochs) == \
            ("adamw", 0.003, resolved.batch_size, resolved.epochs)
    resolved = TrainConfig(dataset="mnist", model="lenet5", arith="dfp16").resolved()
    assert (resolved.options["optimizer"], resolved.options["lr"]) == ("sgd", 0.05)
    saved = TrainConfig(dataset="moving-mnist-actions", model="tr-lstm", arith="dfp16").resolved().__dict__
    saved = {**saved, "options": {k: v for k, v in saved["options"].items() if k != "optimizer"}}
    assert TrainConfig.from_dict(saved).options["optimizer"] == "sgd"
