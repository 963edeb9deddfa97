"""Integer biases (``--biases on``): the bias added into the exact accumulator before the layer's
one rounding (``numeric.requant.add_bias``, ``layers.base``), its exact gradient, every update
training it without weight decay, shards, the integer-only audit, the options and the run files."""

import copy
from dataclasses import replace
from fractions import Fraction

import pytest
import torch

from cli_checks import assert_refused, run_until_crash
from intrain.cli import main
from intrain.kernels import get_backend
from intrain.layers import IntBias, IntConv2d, IntLinear, weighted_layers
from intrain.methods.dfp16 import Dfp16, Dfp16Options
from intrain.methods.float_master import FloatMaster
from intrain.methods.adamw_fixed import AdamWUpdate
from intrain.methods.niti import Niti, NitiOptions
from intrain.methods.sgd_fixed import FixedPointSgd
from intrain.models import build_int_model
from intrain.numeric.formats import DFP16, NITI_INT8
from intrain.numeric.qtensor import QTensor
from intrain.numeric.requant import BIAS_MAX_SHIFT, add_bias, requantize
from intrain.run import checkpoint
from test_integer_only import FloatAudit
from test_shards import ThreadGroup, _shards


def _nearest(value: Fraction) -> int:
    """``value`` rounded to the nearest integer, ties away from zero (``shift_round``'s nearest)."""
    magnitude = abs(value)
    rounded = int(magnitude + Fraction(1, 2))
    return rounded if value >= 0 else -rounded


def _exact_sums(total: torch.Tensor, e: int, bias: torch.Tensor, eb: int) -> list[list[Fraction]]:
    return [[Fraction(int(t)) * Fraction(2) ** e + Fraction(int(b)) * Fraction(2) ** eb
             for t, b in zip(row, bias.tolist())] for row in total.tolist()]


@pytest.mark.parametrize("dtype, bits", [(torch.int32, 8), (torch.int64, 16)])
@pytest.mark.parametrize("gap", [0, 1, 7, 23, BIAS_MAX_SHIFT])
def test_a_bias_as_coarse_as_the_accumulator_or_coarser_is_added_exactly_and_rounded_once(dtype, bits, gap):
    """Accumulators at the extremes of their type's range (int32 for int8 products, the DFP16
    chunked sum's int64) and biases from -128 to 127, the bias's unit ``gap`` bits above the
    accumulator's: the requantised sum is the exact sum's nearest value at the result's unit."""
    top = 2**31 - 1 if dtype == torch.int32 else 2**46
    gen = torch.Generator().manual_seed(gap)
    total = torch.randint(-top, top, (6, 4), generator=gen, dtype=torch.int64)
    total[0] = top
    total[1] = -top
    total[2] = 0
    total = total.to(dtype)
    bias = torch.tensor([-128, 127, -1, 0], dtype=torch.int8)
    e = -20
    summed, base = add_bias(total.clone(), torch.tensor(e), bias, torch.tensor(e + gap))
    assert summed.dtype == torch.int64 and int(base) == e
    out = requantize(summed, base, bits=bits)
    unit = Fraction(2) ** int(out.e)
    for got_row, exact_row in zip(out.v.tolist(), _exact_sums(total, e, bias, e + gap)):
        for got, exact in zip(got_row, exact_row):
            assert got == max(-(2 ** (bits - 1) - 1), min(2 ** (bits - 1) - 1, _nearest(exact / unit)))
    assert int(out.v.abs().max()) >= 2 ** (bits - 2)  # the shift came from the sum's own maximum


def test_a_bias_finer_than_the_accumulator_enters_rounded_to_its_unit():
    total = torch.tensor([[5, -5, 0, 1 << 30]], dtype=torch.int32)
    bias = torch.tensor([3, -3, 2, -2], dtype=torch.int8)  # at 2**-2 of the accumulator's unit
    summed, base = add_bias(total, torch.tensor(0), bias, torch.tensor(-2))
    assert int(base) == 0
    assert summed.tolist() == [[6, -6, 1, (1 << 30) - 1]]  # 0.75 -> 1, -0.75 -> -1, 0.5 -> 1, -0.5 -> -1


def test_an_accumulator_far_finer_than_the_bias_is_first_rounded_to_its_limit():
    total = torch.tensor([[3, -3, (1 << 31) - 1]], dtype=torch.int32)
    bias = torch.tensor([1, 1, -1], dtype=torch.int8)
    summed, base = add_bias(total, torch.tensor(-10), bias, torch.tensor(BIAS_MAX_SHIFT - 8))
    assert int(base) == -8  # the bias shifted by BIAS_MAX_SHIFT, the accumulator rounded by 2 bits
    assert summed.tolist() == [[(1 << BIAS_MAX_SHIFT) + 1, (1 << BIAS_MAX_SHIFT) - 1,
                                -(1 << BIAS_MAX_SHIFT) + (1 << 29)]]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_the_cpu_in_place_sum_is_the_general_one(dtype):
    """Every gap from far finer to far coarser than BIAS_MAX_SHIFT, accumulators at their type's
    extremes (where the int32 sum must widen to int64), biases from -128 to 127."""
    from intrain.numeric.requant import add_bias_by_tensors

    top = torch.iinfo(dtype).max >> (0 if dtype == torch.int32 else 3)
    gen = torch.Generator().manual_seed(7)
    for gap in (-30, -9, -1, 0, 1, 8, 17, 33, BIAS_MAX_SHIFT, BIAS_MAX_SHIFT + 1, BIAS_MAX_SHIFT + 9):
        for extreme in (False, True):
            total = torch.randint(-1000, 1000, (3, 4, 2), generator=gen, dtype=torch.int64).to(dtype)
            if extreme:
                total[0] = top
                total[1] = -top
            bias = torch.tensor([-128, 127, 1, 0], dtype=torch.int8)
            e, eb = torch.tensor(-5), torch.tensor(-5 + gap)
            fast, fast_e = add_bias(total.clone(), e, bias, eb)
            general, general_e = add_bias_by_tensors(total.clone(), e, bias, eb)
            assert torch.equal(fast.to(torch.int64), general) and int(fast_e) == int(general_e), (gap, extreme)


def test_a_zero_bias_adds_nothing_whatever_its_exponent():
    total = torch.tensor([[7, -9]], dtype=torch.int32)
    summed, base = add_bias(total, torch.tensor(-60), torch.zeros(2, dtype=torch.int8), torch.tensor(0))
    assert summed is total and int(base) == -60


def _layer(kind: str, fmt, backend: str, channels: int, gen):
    kernels = get_backend(backend, "cpu")
    if kind == "conv":
        layer = IntConv2d(channels, 5, 3, kernels, padding=1, fmt=fmt, bias=True)
    else:
        layer = IntLinear(channels, 5, kernels, fmt=fmt, bias=True)
    layer.weight.copy_(torch.randint(-fmt.limit, fmt.limit + 1, layer.weight.shape, generator=gen).to(fmt.dtype))
    layer.weight_exp.fill_(-9)
    return layer


def _input(kind: str, fmt, channels: int, gen, worst: bool):
    shape = (3, channels, 4, 4) if kind == "conv" else (3, channels)
    if worst:  # every product at full scale with one sign: the longest reduction's largest sum
        return QTensor(torch.full(shape, fmt.limit, dtype=fmt.dtype), torch.tensor(-7))
    return QTensor(torch.randint(-fmt.limit, fmt.limit + 1, shape, generator=gen).to(fmt.dtype), torch.tensor(-7))


@pytest.mark.parametrize("kind, channels", [("linear", 4608), ("conv", 512)])
@pytest.mark.parametrize("fmt", [NITI_INT8, DFP16], ids=["int8", "dfp16"])
@pytest.mark.parametrize("worst", [False, True])
@pytest.mark.parametrize("relu_scale", ["magnitude", "positive"])
def test_a_layers_output_is_its_product_plus_bias_rounded_once_on_every_backend(kind, channels, fmt, worst,
                                                                                 relu_scale):
    """The output is the layer's accumulator (the exact product, or DFP16's int32-chunked one)
    plus the bias shifted to its unit, rounded once, with the shift taken from the sum (a
    following ReLU with ``relu_scale="positive"``: from the sum's positive part); the longest
    reductions of the models (4608 terms, 512 channels x 3 x 3), full-scale operands of one sign
    included, identical on the reference and cpu backends."""
    fmt = replace(fmt, relu_scale=relu_scale)
    outputs = []
    for backend in ("reference", "cpu"):
        layer = _layer(kind, fmt, backend, channels, torch.Generator().manual_seed(1))
        if worst:
            layer.weight.fill_(fmt.limit)
        layer.bias.weight.copy_(torch.tensor([-fmt.limit, fmt.limit, 3, 0, -1], dtype=fmt.dtype))
        layer.bias.weight_exp.fill_(2)
        layer.relu_follows = True
        x = _input(kind, fmt, channels, torch.Generator().manual_seed(2), worst)
        outputs.append(layer(x))
        if backend == "reference":
            product, args = (("conv2d_forward", (x.v, layer.weight, layer.stride, layer.padding)) if kind == "conv"
                             else ("linear_forward", (x.v, layer.weight)))
            acc, e = layer.accumulate(product, args, x.e + layer.weight_exp, layer.fan_in)
            gap = 2 - int(e)
            assert gap > 0
            shape = (1, -1) + (1,) * (acc.dim() - 2)
            sums = acc.to(torch.int64) + (layer.bias.weight.to(torch.int64) << gap).reshape(shape)
            if relu_scale == "positive":
                sums = sums.clamp(min=0)
            expected = requantize(sums, e, bits=fmt.bits)
    reference, cpu = outputs
    assert torch.equal(reference.v, cpu.v) and int(reference.e) == int(cpu.e)
    assert torch.equal(reference.v, expected.v) and int(reference.e) == int(expected.e)
    if worst:  # equal products: the biases (-L, L, 3, 0, -1 at 2**2) order the channels, the range is used
        column = reference.v.reshape(3, 5, -1)[0, :, 5 if kind == "conv" else 0].tolist()  # conv: no padding
        assert column[1] > column[2] >= column[3] >= column[4] > column[0] > 0
        assert column[1] >= 2 ** (fmt.bits - 2)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("fmt", [NITI_INT8, DFP16], ids=["int8", "dfp16"])
def test_a_zero_bias_gives_the_bias_free_layers_bits(kind, fmt):
    gen = torch.Generator().manual_seed(5)
    with_bias = _layer(kind, fmt, "cpu", 64, gen)
    without = copy.deepcopy(with_bias)
    without.bias = None
    x = _input(kind, fmt, 64, gen, worst=False)
    a, b = with_bias(x), without(x)
    assert torch.equal(a.v, b.v) and int(a.e) == int(b.e)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_the_bias_gradient_is_the_exact_sum_of_the_error_and_the_error_below_is_unchanged(kind):
    gen = torch.Generator().manual_seed(6)
    layer = _layer(kind, DFP16, "cpu", 16, gen)
    layer.bias.weight.copy_(torch.tensor([100, -200, 300, 0, 7], dtype=torch.int16))
    without = copy.deepcopy(layer)
    without.bias = None
    x = _input(kind, DFP16, 16, gen, worst=False)
    layer.train(), without.train()
    out = layer(x)
    without(x)
    d = QTensor(torch.full(out.v.shape, -32767, dtype=torch.int16), torch.tensor(-30))  # worst case
    d.v[0].random_(-32767, 32768, generator=gen)
    below, below_free = layer.backward(d, None), without.backward(d, None)
    assert torch.equal(below.v, below_free.v) and int(below.e) == int(below_free.e)
    expected = [sum(int(v) for v in d.v.select(1, c).flatten()) for c in range(5)]
    assert layer.bias.weight_grad.dtype == torch.int64 and layer.bias.weight_grad.tolist() == expected
    assert int(layer.bias.weight_grad_exp) == -30
    assert torch.equal(layer.weight_grad, without.weight_grad)


@pytest.mark.parametrize("side, extreme", [(16, 32767), (300, -32768), (300, 32767)])
def test_the_bias_gradient_sums_without_wrapping_at_the_longest_maps(side, extreme):
    """90,000 positions of full-scale int16 errors (-32768 included) sum past 2**31 in magnitude
    per sample: past int32, so those are summed in int64 (16 x 16 positions in int32)."""
    bias = IntBias(2, DFP16)
    v = torch.full((3, 2, side, side), extreme, dtype=torch.int16)
    v[:, 1] = 1
    bias.store_gradient(QTensor(v, torch.tensor(-3)))
    assert bias.weight_grad.tolist() == [3 * side * side * extreme, 3 * side * side]


def test_biases_keep_the_bias_free_models_weights_and_layer_ids():
    plain = build_int_model("vgg-small-7", (1, 16, 16), 10, seed=4, width=0.0625)
    biased = build_int_model("vgg-small-7", (1, 16, 16), 10, seed=4, width=0.0625, biases=True)
    plain_layers = weighted_layers(plain)
    biased_layers = [layer for layer in weighted_layers(biased) if not isinstance(layer, IntBias)]
    assert len(weighted_layers(biased)) == 2 * len(plain_layers)
    assert [layer.layer_id for layer in plain_layers] == [layer.layer_id for layer in biased_layers]
    assert all(torch.equal(a.weight, b.weight) and int(a.weight_exp) == int(b.weight_exp)
               for a, b in zip(plain_layers, biased_layers))
    assert all(not bool(layer.bias.weight.any()) for layer in biased_layers)


@pytest.mark.parametrize("model", ["resnet18", "lstm"])
def test_models_with_batch_normalisation_or_lstms_refuse_biases(model):
    shape = (10, 16, 16) if model == "lstm" else (1, 16, 16)
    with pytest.raises(ValueError, match="batch normalisation|recurrent"):
        build_int_model(model, shape, 10, seed=0, width=0.125, biases=True)


def _set_gradients(layers, value: int) -> None:
    for layer in layers:
        layer.weight_grad = torch.full(layer.weight.shape, value, dtype=torch.int64)
        layer.weight_grad_exp = torch.tensor(-12)


@pytest.mark.parametrize("update", ["sgd", "adamw", "fp32-sgd", "fp32-adamw"])
def test_every_update_leaves_biases_undecayed_and_decays_weights(update):
    """With zero gradients only weight decay moves anything: the weights shrink, the biases stay."""
    model = build_int_model("lenet5", (1, 28, 28), 10, seed=0, fmt=DFP16, biases=True)
    layers = weighted_layers(model)
    for layer in layers:
        if isinstance(layer, IntBias):
            layer.weight.copy_(torch.arange(layer.weight.numel()).to(torch.int16) * 100 - 200)
            layer.weight_exp.fill_(-14)
    if update.startswith("fp32"):
        trainer = FloatMaster(model, DFP16, lr=1.0, total_steps=4, optimizer=update.split("-")[1])
    else:
        trainer = (FixedPointSgd if update == "sgd" else AdamWUpdate)(model, DFP16, 1.0, 4)
    before = [(layer.weight.clone(), int(layer.weight_exp)) for layer in layers]
    _set_gradients(layers, 0)
    trainer.step(2, 8)
    for layer, (weight, exponent) in zip(layers, before):
        value = lambda w, e: w.double() * 2.0**e
        moved = not torch.equal(value(layer.weight, int(layer.weight_exp)), value(weight, exponent))
        assert moved == (not isinstance(layer, IntBias)), type(layer).__name__


def test_niti_sgd_training_moves_biases_and_shards_give_the_whole_batch():
    """Steps of a LeNet-5 with biases, batches of 7 and 2 on 3 shards (threads for processes):
    every shard ends with the one-process weights and biases, and the biases moved."""
    options = NitiOptions(update="sgd", lr=0.5, error_rounding="stochastic", weight_average="none",
                          relu_scale="positive", biases="on")
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randint(-127, 128, (rows, 1, 28, 28), dtype=torch.int8, generator=gen),
                torch.randint(0, 10, (rows,), generator=gen)) for rows in (7, 2, 7)]

    def build():
        return Niti.build_model(options, "lenet5", (1, 28, 28), 10, seed=3, width=0.5, device="cpu")

    whole_model = build()
    start = copy.deepcopy(whole_model.state_dict())
    whole = Niti(whole_model, options, seed=11, total_steps=6)
    for step, (x, y) in enumerate(batches):
        whole.train_step(QTensor(x, torch.tensor(-7)), y, step, 0)

    def shard(rank, collective):
        model = build()
        model.load_state_dict(start)
        method = Niti(model, options, seed=11, total_steps=6, collective=collective)
        for step, (x, y) in enumerate(batches):
            rows = _shards(x.shape[0], 3)[rank]
            method.train_step(QTensor(x[rows], torch.tensor(-7)), y[rows], step, 0, sample_offset=rows.start)
        return model.state_dict()

    expected = whole_model.state_dict()
    for state in ThreadGroup(3).run(shard):
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    bias_keys = [k for k in expected if ".bias." in k and k.endswith("weight")]
    assert len(bias_keys) == 5 and all(bool(expected[k].any()) for k in bias_keys)


@pytest.mark.parametrize("method", ["int8", "dfp16"])
def test_a_training_step_with_biases_uses_only_integer_tensors(method):
    from intrain.numeric import native
    from test_integer_only import _batch

    if method == "int8":
        options = NitiOptions(update="sgd", lr=0.05, weight_average="none", biases="on", backend="reference")
        model = Niti.build_model(options, "lenet5", (1, 28, 28), 10, seed=0, width=1.0, device="cpu")
        trainer = Niti(model, options, seed=0, total_steps=10)
    else:
        options = Dfp16Options(lr=0.05, backend="reference", biases="on")
        model = Dfp16.build_model(options, "lenet5", (1, 28, 28), 10, seed=0, width=1.0, device="cpu")
        trainer = Dfp16(model, options, seed=0, total_steps=10)
    x, y = _batch()
    x = type(trainer).network_input(x)
    saved = native.library
    native.library = lambda: None  # as the audit's fixture does: the C roundings run as aten operators
    try:
        with FloatAudit() as audit:
            trainer.train_step(x, y, step=0, epoch=0)
            trainer.train_step(x, y, step=1, epoch=0)
    finally:
        native.library = saved
    assert audit.float_ops == [], f"float tensors seen in: {sorted(set(audit.float_ops))}"
    biases = [layer for layer in weighted_layers(model) if isinstance(layer, IntBias)]
    assert len(biases) == 5 and all(bool(layer.weight.any()) for layer in biases)


@pytest.mark.parametrize("argv, words", [
    (["--biases", "on"], "--update sgd or adamw"),
    (["--biases", "on", "--model", "resnet18", "--update", "sgd", "--width", "0.125"], "batch normalisation"),
    (["--arith", "float", "--biases", "on"], "does not apply to --arith float"),
    (["--biases", "yes", "--update", "sgd"], "invalid choice"),
])
def test_biases_where_they_cannot_apply_are_refused(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert words in assert_refused(["train", *argv, "--out", str(tmp_path / "run")], capsys, tmp_path)


def test_a_run_with_biases_resumes_bit_for_bit_and_evaluates_as_trained(tmp_path, monkeypatch, capsys):
    job = ["train", "--update", "sgd", "--biases", "on", "--epochs", "2", "--train-limit", "96", "--batch-size", "16",
           "--seed", "3", "--checkpoint-every", "4"]
    assert main([*job, "--out", str(tmp_path / "ref")]) == 0
    run_until_crash(monkeypatch, Niti, 9, [*job, "--out", str(tmp_path / "run")])
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    ref, run = (torch.load(tmp_path / name / "model.pt", weights_only=True)["state_dict"] for name in ("ref", "run"))
    assert ref.keys() == run.keys() and all(torch.equal(ref[k], run[k]) for k in ref)
    assert any(".bias." in k and bool(v.any()) for k, v in ref.items())
    out = capsys.readouterr().out
    assert main(["eval", "--run", str(tmp_path / "ref")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == out.splitlines()[-1]
    saved = checkpoint.load(checkpoint.checkpoint_path(tmp_path / "ref"))
    assert len(saved["sgd_update"]["master"]) == 2 * 3  # the MLP's three layers and their biases


def test_recipes_give_dfp16_the_float_twins_biases_and_fashion_lenet5_and_vgg_int8_their_chosen_ones():
    from intrain.run.recipes import default_recipe

    for model in ("lenet5", "vgg-small-7"):
        assert default_recipe("fashion-mnist", model, "int8").options["biases"] == "on"
    # VGG-small-7's int8 recipe trains 30 epochs, what float32's 20 cost on the CPU it was chosen on
    assert [default_recipe("fashion-mnist", "vgg-small-7", arith).epochs for arith in ("int8", "float", "dfp16")] \
        == [30, 20, 20]
    assert default_recipe("fashion-mnist", "lenet5", "int8").epochs == 20
    assert "biases" not in default_recipe("mnist", "lenet5", "int8").options  # NITI's update: none
    for model in ("mlp", "lenet5", "vgg-small-7", "alexnet"):
        assert default_recipe("fashion-mnist", model, "dfp16").options["biases"] == "on"
    for model in ("resnet18", "lstm", "tr-lstm"):
        assert "biases" not in default_recipe("moving-mnist-actions", model, "dfp16").options


@pytest.mark.parametrize("arith", ["int8", "dfp16"])
def test_a_run_saved_before_biases_existed_resumes_without_them(arith):
    from intrain.run.config import TrainConfig

    options = {"lr": 0.05, "update": "sgd"} if arith == "int8" else {"lr": 0.05}
    saved = TrainConfig(dataset="fashion-mnist", model="lenet5", arith=arith, epochs=2, batch_size=64,
                        options=options)
    payload = {k: v for k, v in saved.__dict__.items()}
    assert TrainConfig.from_dict(payload).resolved().options["biases"] == "off"
    assert TrainConfig(dataset="fashion-mnist", model="lenet5", arith=arith).resolved().options["biases"] == "on"


@pytest.mark.parametrize("settings", [
    dict(use_int8_gemm=True, int8_gemm_chunk_bytes=2**12),  # int8 GEMM in chunks of samples
    dict(use_int8_gemm=False, float_chunk_bytes=2**12),  # float units in chunks (direct for 1 channel)
    dict(use_int8_gemm=False),  # one call, requantised whole
], ids=["int8-gemm-chunks", "float-chunks", "whole"])
@pytest.mark.parametrize("bits, shapes", [
    (8, ((6, 32, 12, 12), (32, 32, 3, 3))), (8, ((6, 1, 14, 14), (8, 1, 5, 5))),
    (16, ((5, 16, 10, 10), (16, 16, 3, 3))),
])
@pytest.mark.parametrize("rectify", [False, True])
@pytest.mark.parametrize("gap", [-3, 9])
def test_the_fused_requantisations_add_the_bias_before_rounding_on_every_path(settings, bits, shapes, rectify,
                                                                              gap):
    """``requantize_product`` with a bias on the cpu backend's fused paths (chunks of samples on
    the int8 GEMM, on the float units or the int16 halves, or one call) against the reference
    backend's exact product plus the bias, requantised: the same bits, full-scale operands
    (-128 and -32768 included in the inputs) and biases from -limit to limit."""
    from intrain.kernels import CpuBackend, CpuSettings
    from intrain.numeric.requant import aligned_bias, requantize_product

    dtype = torch.int8 if bits == 8 else torch.int16
    low, high = torch.iinfo(dtype).min, torch.iinfo(dtype).max
    gen = torch.Generator().manual_seed(gap + bits)
    x = torch.randint(low, high + 1, shapes[0], generator=gen).to(dtype)
    x[0] = low
    w = torch.randint(low + 1, high + 1, shapes[1], generator=gen).to(dtype)
    channels = shapes[1][0]
    bias = torch.randint(low + 1, high + 1, (channels,), generator=gen).to(dtype)
    bias[0], bias[1] = low + 1, high
    e = torch.tensor(-20)
    aligned = aligned_bias(bias, torch.tensor(-20 + gap), e)
    args = (x, w, (1, 1), (1, 1))
    cpu = CpuBackend(CpuSettings(**settings))
    got = requantize_product(cpu, "conv2d_forward", args, e, bits, rectify=rectify, bias=aligned)
    exact = get_backend("reference").conv2d_forward(*args).to(torch.int64) + aligned.reshape(1, -1, 1, 1)
    expected = requantize(exact.clamp(min=0) if rectify else exact, e, bits=bits)
    assert torch.equal(got.v, expected.v) and int(got.e) == int(expected.e)


@pytest.mark.parametrize("dtype, room", [(torch.float32, 2**24), (torch.float64, 2**53), (torch.int16, 2**15 - 1),
                                         (torch.int32, 2**31 - 1)])
def test_a_bias_is_added_in_the_products_own_type_only_where_that_is_exact(dtype, room):
    from intrain.kernels.cpu.backend import exact_with_bias as with_bias  # floats: the cpu backend's

    bias = torch.tensor([3 << 20, -(5 << 9), 1], dtype=torch.int64) if room > 2**15 else torch.tensor([300, -7, 1])
    for top, widened in ((room - int(bias.abs().max()), False), (room - 1, True)):
        exact = torch.tensor([[top, -top, 0], [1, 2, 3]], dtype=torch.int64)
        expected = exact + bias
        got = with_bias(exact.to(dtype), bias)
        assert got.dtype == (torch.int64 if widened else dtype)
        assert torch.equal(got.to(torch.int64), expected)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16])
@pytest.mark.parametrize("name, args", [
    ("linear_forward", ((3, 40), (24, 40))),
    ("linear_backward_input", ((3, 24), (24, 40))),
    ("conv2d_forward", ((2, 5, 6, 6), (7, 5, 3, 3), (1, 1), (1, 1))),
    ("conv2d_backward_input", ((2, 7, 6, 6), (7, 5, 3, 3), (6, 6), (1, 1), (1, 1))),
])
def test_the_cpu_backends_product_bound_is_the_largest_entry_full_scale_operands_of_one_sign_reach(dtype, name,
                                                                                                    args):
    """``product_bound`` from the operands' types and shapes alone: never below an entry of the
    product (so the bias may be added in place without measuring), and reached by the entry that
    sums the most terms when every operand is the type's minimum (-128 x -128, -32768 x -32768),
    so it is no looser than it must be; output and input channels differ, so a bound counted over
    the wrong dimension fails."""
    from intrain.kernels.cpu.backend import product_bound

    low = torch.iinfo(dtype).min
    operand, weight = (torch.full(shape, low, dtype=dtype) for shape in args[:2])
    exact = getattr(get_backend("reference"), name)(operand, weight, *args[2:])
    assert int(exact.abs().max()) == product_bound(name, operand, weight)


def test_a_bias_is_added_without_measuring_the_product_where_its_bound_leaves_room(monkeypatch):
    """``with_bias`` given a ``bound`` that leaves room adds in place without the ``aminmax``
    pass; given one that does not, it measures, and still adds in place where the measured
    maximum leaves room (and widens where it does not): the same sums every way."""
    from intrain.numeric import requant

    bias = torch.tensor([5, -7, 1], dtype=torch.int64)
    exact = torch.tensor([[100, -90, 0], [1, 2, 3]], dtype=torch.int64)
    room = 110
    measured = []
    real_aminmax = torch.aminmax
    monkeypatch.setattr(requant.torch, "aminmax", lambda t: measured.append(1) or real_aminmax(t))
    for bound, measures, widened, top in ((room - 7, False, False, 100), (room, True, False, 100),
                                          (room, True, True, room - 3)):
        measured.clear()
        values = exact.clone()
        values[0, 0] = top
        got = requant.with_bias(values.to(torch.float32), bias, room, bound)
        assert bool(measured) == measures
        assert got.dtype == (torch.int64 if widened else torch.float32)
        assert torch.equal(got.to(torch.int64), values + bias)


@pytest.mark.parametrize("settings", [
    dict(use_int8_gemm=True, int8_gemm_chunk_bytes=2**12), dict(use_int8_gemm=False, float_chunk_bytes=2**12),
    dict(use_int8_gemm=False)], ids=["int8-gemm-chunks", "float-chunks", "whole"])
@pytest.mark.parametrize("bits, shapes", [(8, ((6, 32, 12, 12), (32, 32, 3, 3))),
                                          (16, ((5, 16, 10, 10), (16, 16, 3, 3)))])
def test_the_fused_paths_add_a_bias_without_another_pass_over_the_product(monkeypatch, settings, bits, shapes):
    """On the cpu backend's fused requantisations a bias costs no ``aminmax`` pass of its own
    where the product's type bound leaves room (``product_bound``; here 288 int8 or 144 int16
    terms): the biased product is measured exactly as often as the bias-free one."""
    from intrain.kernels import CpuBackend, CpuSettings
    from intrain.numeric.requant import aligned_bias, requantize_product

    dtype = torch.int8 if bits == 8 else torch.int16
    low, high = torch.iinfo(dtype).min, torch.iinfo(dtype).max
    gen = torch.Generator().manual_seed(bits)
    x = torch.randint(low, high + 1, shapes[0], generator=gen).to(dtype)
    w = torch.randint(low, high + 1, shapes[1], generator=gen).to(dtype)
    bias = aligned_bias(torch.full((shapes[1][0],), high, dtype=dtype), torch.tensor(-17), torch.tensor(-20))
    passes = []
    real_aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: passes.append(t.numel()) or real_aminmax(t))
    counts = []
    for with_bias in (None, bias):
        passes.clear()
        requantize_product(CpuBackend(CpuSettings(**settings)), "conv2d_forward", (x, w, (1, 1), (1, 1)),
                           torch.tensor(-20), bits, bias=with_bias)
        counts.append(len(passes))
    assert counts[0] == counts[1]
