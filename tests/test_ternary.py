"""Ternary residual networks: exact ternary products, the residual decomposition, the ranking,
switching edges, integer-only inference, and the command line (issue 13)."""

import itertools

import pytest
import torch

from cli_checks import assert_refused
from intrain.cli import main
from intrain.data import load_dataset
from intrain.kernels import get_backend
from intrain.kernels.ternary import group_sums, ternary_conv2d, ternary_linear
from intrain.layers.ternary import TernaryLayer, set_active_residuals
from intrain.methods import get_method
from intrain.numeric.qtensor import QTensor
from intrain.run.loop import predictions
from intrain.ternary.convert import (TernarySettings, calibration_batch, convert, load_source, read_source,
                                     ternary_layers)
from intrain.ternary.quantize import _support, decompose
from test_integer_only import FloatAudit

BACKENDS = ("reference", "cpu")


def _ternary(shape, gen, density=0.6):
    t = torch.randint(-1, 2, shape, generator=gen, dtype=torch.int8)
    return t * (torch.rand(shape, generator=gen) < density)


# ------------------------------------------------------------------------------------ products

@pytest.mark.parametrize("k, n", [(64, 4), (75, 8), (75, 75), (300, 7)])
def test_linear_products_bit_identical(k, n):
    gen = torch.Generator().manual_seed(k + n)
    g = -(-k // n)
    t = _ternary((9, g, n), gen)
    t.reshape(9, -1)[:, k:] = 0  # the padding of the last group
    alpha = torch.randint(0, 128, (9, g), generator=gen, dtype=torch.int16)
    x = torch.randint(-127, 128, (5, k), generator=gen, dtype=torch.int8)
    w = (alpha.to(torch.int64)[:, :, None] * t).reshape(9, -1)[:, :k]
    exact = x.to(torch.int64) @ w.T
    for backend in BACKENDS:
        for product in ("adds", "dense"):
            y = ternary_linear(x, t, alpha, get_backend(backend), product)
            assert y.dtype == torch.int32 and torch.equal(y.to(torch.int64), exact), (backend, product)


def test_worst_case_stays_exact():
    """Every input at +-127, every weight +-1 with the same sign, every scale 127: the largest sum."""
    k, n = 4096, 16
    t = torch.ones((3, k // n, n), dtype=torch.int8)
    t[1] = -1
    alpha = torch.full((3, k // n), 127, dtype=torch.int16)
    x = torch.full((2, k), 127, dtype=torch.int8)
    x[1] = -127
    for backend in BACKENDS:
        for product in ("adds", "dense"):
            y = ternary_linear(x, t, alpha, get_backend(backend), product)
            assert y.tolist() == [[127 * 127 * k, -127 * 127 * k, 127 * 127 * k],
                                  [-127 * 127 * k, 127 * 127 * k, -127 * 127 * k]]


def test_group_sums_are_the_signed_sums():
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(-127, 128, (4, 12), generator=gen, dtype=torch.int8)
    t = _ternary((3, 3, 4), gen)
    expected = (x.to(torch.int64).reshape(4, 1, 3, 4) * t.to(torch.int64)).sum(dim=3)
    assert torch.equal(group_sums(x, t).to(torch.int64), expected)


@pytest.mark.parametrize("stride, padding", [((1, 1), (0, 0)), ((2, 1), (1, 2))])
def test_conv_products_bit_identical(stride, padding):
    gen = torch.Generator().manual_seed(3)
    c, kh, kw, o, n = 3, 3, 3, 5, 4
    k = c * kh * kw
    g = -(-k // n)
    t = _ternary((o, g, n), gen)
    t.reshape(o, -1)[:, k:] = 0
    alpha = torch.randint(0, 128, (o, g), generator=gen, dtype=torch.int16)
    x = torch.randint(-127, 128, (2, c, 9, 8), generator=gen, dtype=torch.int8)
    w = (alpha.to(torch.int64)[:, :, None] * t).reshape(o, -1)[:, :k].reshape(o, c, kh, kw)
    exact = get_backend("reference").conv2d_forward(x, w.to(torch.int8), stride, padding)
    for backend in BACKENDS:
        for product in ("adds", "dense"):
            y = ternary_conv2d(x, t, alpha, (kh, kw), stride, padding, get_backend(backend), product)
            assert torch.equal(y, exact), (backend, product)


def _filled_layer(kind, shape, backend, product, bias, gen):
    layer = TernaryLayer(kind, shape, 4, 3, get_backend(backend), product, bias, padding=(1, 1) if kind == "conv"
                         else (0, 0))
    layer.ternary.copy_(_ternary(layer.ternary.shape, gen))
    layer.alpha.copy_(torch.randint(0, 128, layer.alpha.shape, generator=gen, dtype=torch.int16))
    layer.alpha_exp.copy_(torch.tensor([-3, -6, -10]))
    layer.rank.copy_(torch.randint(0, 50, layer.rank.shape, generator=gen))
    layer.rank[0] = -1
    if bias:
        layer.bias.copy_(torch.randint(-2**15 + 1, 2**15, (shape[0],), generator=gen, dtype=torch.int32))
        layer.bias_exp.fill_(-12)
    return layer.eval()


@pytest.mark.parametrize("kind, shape", [("linear", (6, 20)), ("conv", (4, 2, 3, 3))])
@pytest.mark.parametrize("bias", [False, True])
def test_layer_bit_identical_across_backends_and_products(kind, shape, bias):
    x_shape = (3, 20) if kind == "linear" else (3, 2, 6, 6)
    x = QTensor.of(torch.randint(-127, 128, x_shape, generator=torch.Generator().manual_seed(5), dtype=torch.int8), -7)
    outs = []
    for backend, product in itertools.product(BACKENDS, ("adds", "dense")):
        layer = _filled_layer(kind, shape, backend, product, bias, torch.Generator().manual_seed(7))
        for active in (0, 20, 50):
            layer.active_residuals = active
            y = layer(x)
            outs.append((active, y.v, int(y.e)))
    for active in (0, 20, 50):
        same = [(v, e) for a, v, e in outs if a == active]
        assert all(torch.equal(v, same[0][0]) and e == same[0][1] for v, e in same)


def test_bias_alignment_is_the_rounded_sum():
    """One output: its real value must be the nearest int8 of x.w + b at the output exponent."""
    layer = TernaryLayer("linear", (1, 4), 4, 1, get_backend("reference"), "dense", True)
    layer.ternary[0, 0, 0] = torch.tensor([1, -1, 1, 0], dtype=torch.int8)
    layer.alpha[0, 0, 0] = 3
    layer.alpha_exp.fill_(-2)
    layer.bias.fill_(5)
    layer.bias_exp.fill_(-1)
    x = QTensor.of(torch.tensor([[4, 1, 2, 9]], dtype=torch.int8), -3)
    y = layer.eval()(x)
    exact = (4 - 1 + 2) * 3 * 2.0**-5 + 5 * 2.0**-1
    assert float(y.to_float()) == exact  # small enough to be exact in int8 at that exponent


# ------------------------------------------------------------------------------------ decomposition

def test_optimal_threshold_is_the_best_support():
    """The ``optimal`` rule's support gives the least l2 error of all 2**N supports (N = 6)."""
    gen = torch.Generator().manual_seed(11)
    r = torch.randn((5, 3, 6), generator=gen, dtype=torch.float64)
    valid = torch.ones((3, 6), dtype=torch.bool)
    support = _support(r, valid, "optimal")

    def error(mask):
        m = mask.sum(dim=-1, keepdim=True).clamp(min=1)
        a = (r.abs() * mask).sum(dim=-1, keepdim=True) / m
        return ((r - a * torch.sign(r) * mask) ** 2).sum(dim=-1)

    best = torch.stack([error(torch.tensor(bits, dtype=torch.bool).expand_as(r))
                        for bits in itertools.product([0, 1], repeat=6)]).min(dim=0).values
    assert torch.allclose(error(support), best, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rule", ["optimal", "mean"])
@pytest.mark.parametrize("group_size", [4, 16, 1000])
def test_l2_error_falls_with_every_edge(rule, group_size):
    gen = torch.Generator().manual_seed(group_size)
    w = torch.randn((32, 8, 3, 3), generator=gen, dtype=torch.float64) * 0.01
    d = decompose(w, group_size, 6, rule)
    per_layer = d.remainder_sq.sum(dim=(1, 2))
    assert torch.all(per_layer[1:] < per_layer[:-1]), per_layer
    assert torch.all(d.remainder_sq[1:] <= d.remainder_sq[:-1] + 1e-18)  # never grows in any group
    recon = (d.alpha.to(torch.float64) * 2.0 ** d.alpha_exp.to(torch.float64)[:, None, None])[..., None] * d.ternary
    assert torch.allclose(((d.remainders[0] - recon.sum(0)) ** 2).sum(), per_layer[-1])


# ------------------------------------------------------------------------------------ converted runs

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A narrow int8 MLP on digits (32 and 16 hidden units: narrow enough that ternarising costs
    accuracy, so that rankings differ), a short float run of the same net and a short int8 run
    with biases."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", "--width", "0.0625", "--epochs", "10", "--out", str(root / "int8")]) == 0
    assert main(["train", "--arith", "float", "--width", "0.0625", "--epochs", "3", "--out", str(root / "float")]) == 0
    assert main(["train", "--width", "0.0625", "--epochs", "3", "--update", "sgd", "--biases", "on",
                 "--out", str(root / "int8-biases")]) == 0
    return root


def _convert(run, **kw):
    cfg, saved = read_source(run)
    int_model, float_net, layers = load_source(cfg, saved, run)
    settings = TernarySettings(**kw)
    cal = calibration_batch(cfg, 256) if settings.ranking == "perturbation" else None
    return convert(int_model, float_net, layers, settings, cal)


def _accuracy(model):
    splits = load_dataset("digits")
    preds = predictions(model, get_method("int8"), splits.eval, None, 256)
    return float((preds == splits.eval.labels).double().mean())


def test_perturbation_ranking_beats_random(runs):
    for budget in (0.25, 0.5):
        ranked = _accuracy(_convert(runs / "int8", group_size=1000, budget=budget)[0])
        random = [_accuracy(_convert(runs / "int8", group_size=1000, budget=budget, ranking="random", seed=s)[0])
                  for s in range(3)]
        assert ranked > max(random), (budget, ranked, random)


@pytest.mark.parametrize("ranking", ["perturbation", "l2"])
def test_switching_edges_off_is_converting_with_a_smaller_budget(runs, ranking):
    big, kept_big = _convert(runs / "int8", group_size=8, budget=1.5, ranking=ranking)
    small, kept_small = _convert(runs / "int8", group_size=8, budget=0.5, ranking=ranking)
    assert 0 < kept_small < kept_big
    set_active_residuals(big, kept_small)
    x = QTensor.of(torch.randint(0, 128, (64, 1, 8, 8), generator=torch.Generator().manual_seed(0),
                                 dtype=torch.int8), -7)
    for a, b in zip(ternary_layers(big), ternary_layers(small)):
        assert torch.equal(a.edge_on(), b.edge_on())
        assert torch.equal(a.alpha * a.edge_on(), b.alpha * b.edge_on())
    ya, yb = big(x), small(x)
    assert torch.equal(ya.v, yb.v) and int(ya.e) == int(yb.e)


def test_more_edges_lower_the_weight_error_of_a_trained_model(runs):
    errors = []
    for budget in (0, 0.5, 1, 2, 3):
        model, _ = _convert(runs / "int8", group_size=4, budget=budget, ranking="l2")
        err = 0.0
        cfg, saved = read_source(runs / "int8")
        _, _, sources = load_source(cfg, saved, runs / "int8")
        for layer, source in zip(ternary_layers(model), sources):
            w = source.weight.reshape(source.weight.shape[0], -1)
            scale = layer.alpha.to(torch.float64) * 2.0 ** layer.alpha_exp.to(torch.float64)[:, None, None]
            approx = ((scale * layer.edge_on())[..., None] * layer.ternary).sum(0).reshape(w.shape[0], -1)
            err += float(((w - approx[:, :w.shape[1]]) ** 2).sum())
        errors.append(err)
    assert all(b < a for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("product", ["adds", "dense"])
def test_ternary_inference_is_integer_only(runs, product):
    for source in ("int8", "float"):
        model, kept = _convert(runs / source, group_size=4, budget=1)
        for layer in ternary_layers(model):
            layer.product = product
            layer.backend = get_backend("reference")
        x = QTensor.of(torch.randint(0, 128, (8, 1, 8, 8), dtype=torch.int8), -7)
        with FloatAudit() as audit:
            y = model(x)
        assert audit.float_ops == [], sorted(set(audit.float_ops))
        assert y.v.dtype == torch.int8 and kept > 0


def test_an_int8_run_with_biases_keeps_them_exactly(runs):
    from intrain.layers import IntBias, weighted_layers

    cfg, saved = read_source(runs / "int8-biases")
    method = get_method("int8")
    options = method.make_options({k: cfg[k] for k in method.option_names() if cfg.get(k) is not None}, {})
    assert options.biases == "on"
    source = method.build_model(options, cfg["model"], tuple(cfg["image_shape"]), 10, seed=0, width=0.0625,
                                device="cpu")
    source.load_state_dict(saved["state_dict"])
    trained = [layer for layer in weighted_layers(source) if isinstance(layer, IntBias)]
    model, _ = _convert(runs / "int8-biases", group_size=4, budget=1)
    layers = ternary_layers(model)
    assert len(layers) == len(trained) == 3 and all(bool(layer.weight.any()) for layer in trained)
    for layer, bias in zip(layers, trained):
        assert torch.equal(layer.bias.double() * 2.0 ** int(layer.bias_exp),
                           bias.weight.double() * 2.0 ** int(bias.weight_exp))
    assert _accuracy(model) > 0.5


# ------------------------------------------------------------------------------------ command line

def test_cli_ternarize_and_eval(runs, tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["ternarize", "--run", str(runs / "int8"), "--group-size", "8", "--budget", "1",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(out)]) == 0
    full = capsys.readouterr().out.splitlines()
    assert full[-1].startswith("eval_acc=") and any(line.startswith("model size (bits)") for line in full)
    assert main(["eval", "--run", str(out), "--residuals", "0"]) == 0
    plain = capsys.readouterr().out
    assert "residual edges on: 0 of" in plain
    base, _ = _convert(runs / "int8", group_size=8, budget=0)
    assert f"eval_acc={100 * _accuracy(base):.2f}" in plain


def test_cli_converts_a_float_run(runs, tmp_path, capsys):
    out = tmp_path / "f"
    assert main(["ternarize", "--run", str(runs / "float"), "--group-size", "4", "--budget", "0.5",
                 "--out", str(out)]) == 0
    assert main(["eval", "--run", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("eval_acc=")


@pytest.mark.parametrize("case", ["no-model", "flipped-model", "truncated-model", "group-size-0", "budget-negative",
                                  "budget-too-large", "out-is-run", "out-holds-a-run", "ternary-source",
                                  "residuals-on-int8-run", "residuals-above-1"])
def test_cli_bad_input(case, runs, tmp_path, capsys):
    import shutil

    run = shutil.copytree(runs / "int8", tmp_path / "run")
    out = tmp_path / "out"
    argv = ["ternarize", "--run", str(run), "--group-size", "4", "--budget", "1", "--out", str(out)]
    if case == "no-model":
        (run / "model.pt").unlink()
    elif case == "flipped-model":
        data = bytearray((run / "model.pt").read_bytes())
        data[len(data) // 2] ^= 1
        (run / "model.pt").write_bytes(bytes(data))
    elif case == "truncated-model":
        (run / "model.pt").write_bytes((run / "model.pt").read_bytes()[:1000])
    elif case == "group-size-0":
        argv[4] = "0"
    elif case == "budget-negative":
        argv[6] = "-0.5"
    elif case == "budget-too-large":
        argv[6] = "7"
    elif case == "out-is-run":
        argv[-1] = str(run)
    elif case == "out-holds-a-run":
        shutil.copytree(runs / "float", out)
    elif case == "ternary-source":
        assert main(argv) == 0
        capsys.readouterr()
        argv = ["ternarize", "--run", str(out), "--group-size", "4", "--budget", "1", "--out", str(tmp_path / "o2")]
    elif case == "residuals-on-int8-run":
        argv = ["eval", "--run", str(run), "--residuals", "0.5"]
    elif case == "residuals-above-1":
        argv = ["eval", "--run", str(run), "--residuals", "1.5"]
    assert_refused(argv, capsys, tmp_path)


def test_converted_model_bit_identical_across_backends_and_products(runs):
    model, kept = _convert(runs / "float", group_size=4, budget=1)
    x = QTensor.of(torch.randint(0, 128, (32, 1, 8, 8), generator=torch.Generator().manual_seed(2),
                                 dtype=torch.int8), -7)
    outs = []
    for backend, product in itertools.product(BACKENDS, ("adds", "dense")):
        for layer in ternary_layers(model):
            layer.backend, layer.product = get_backend(backend), product
        for active in (0, kept // 2, kept):
            set_active_residuals(model, active)
            y = model(x)
            outs.append((active, y.v, int(y.e)))
    for active in (0, kept // 2, kept):
        same = [(v, e) for a, v, e in outs if a == active]
        assert all(torch.equal(v, same[0][0]) and e == same[0][1] for v, e in same)
