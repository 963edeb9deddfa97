"""NITI's VGG-small family: layer layout and counts, --width, CIFAR-10 and MNIST shapes, a few
integer training steps, and the float twin built from the same spec."""

import pytest
import torch

from intrain.cli import main
from intrain.methods.niti import Niti, NitiOptions
from intrain.methods.float_twin import FloatOptions, FloatTwin
from intrain.layers import IntConv2d, IntDropout, IntLinear
from intrain.models import MODELS, build_float_model, build_int_model, model_spec
from intrain.numeric.qtensor import QTensor
from intrain.layers import weighted_layers

VGGS = ("vgg-small-7", "vgg-small-8", "vgg-small-9")


def _convs(spec):
    return [s.args[1] for s in spec if s.kind == "conv"]


def test_listed_in_models():
    assert set(VGGS) <= set(MODELS)


@pytest.mark.parametrize("name, convs", [
    ("vgg-small-7", [128, 128, 256, 256, 512, 512]),
    ("vgg-small-8", [128, 128, 128, 256, 256, 512, 512]),
    ("vgg-small-9", [128, 128, 128, 256, 256, 256, 512, 512]),
])
def test_layer_counts_and_widths(name, convs):
    spec = model_spec(name, (3, 32, 32), 10)
    assert _convs(spec) == convs
    weighted = [s for s in spec if s.kind in ("conv", "linear")]
    assert len(weighted) == int(name[-1]) and weighted[-1].kind == "linear"
    assert sum(s.kind == "maxpool" for s in spec) == 3
    assert all(s.args[2:] == (3, 1, 1) for s in spec if s.kind == "conv")  # 3x3, stride 1, pad 1
    kinds = [s.kind for s in spec]
    assert kinds[-3:] == ["flatten", "dropout", "linear"] and "batchnorm" not in kinds
    assert spec[-1].args == (512 * 4 * 4, 10)
    # Every conv is followed by a ReLU; pooling ends each stage.
    assert all(kinds[i + 1] == "relu" for i, k in enumerate(kinds) if k == "conv")
    quarter = model_spec(name, (3, 32, 32), 10, width=0.25)
    assert _convs(quarter) == [c // 4 for c in convs]


def test_quarter_width_vgg7_layout():
    spec = model_spec("vgg-small-7", (3, 32, 32), 10, width=0.25)
    layout = ["M" if s.kind == "maxpool" else s.args[1] for s in spec if s.kind in ("conv", "maxpool")]
    assert layout == [32, 32, "M", 64, 64, "M", 128, 128, "M"]


@pytest.mark.parametrize("name", VGGS)
@pytest.mark.parametrize("shape, flat", [((3, 32, 32), 128 * 4 * 4), ((1, 28, 28), 128 * 3 * 3)])
def test_shapes_int_and_float(name, shape, flat):
    int_model = build_int_model(name, shape, 10, seed=0, width=0.25)
    float_model = build_float_model(name, shape, 10, width=0.25)
    int_w = [layer.weight.shape for layer in weighted_layers(int_model)]
    float_w = [m.weight.shape for m in float_model if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert int_w == float_w and len(int_w) == int(name[-1])
    assert int_w[-1] == (10, flat)
    assert any(isinstance(layer, IntDropout) for layer in int_model.layers)
    assert any(isinstance(m, torch.nn.Dropout) for m in float_model)

    x = torch.randint(-127, 128, (2, *shape), dtype=torch.int8)
    int_model.eval()
    out = int_model(QTensor.of(x, -7))
    assert out.v.shape == (2, 10) and out.v.dtype == torch.int8
    float_model.eval()
    assert float_model(x.float() / 128).shape == (2, 10)


def test_too_small_images_are_refused():
    with pytest.raises(ValueError, match="8x8"):
        model_spec("vgg-small-7", (1, 7, 7), 10)
    with pytest.raises(ValueError, match="width"):
        model_spec("vgg-small-7", (3, 32, 32), 10, width=0)


@pytest.mark.parametrize("name, shape", [("vgg-small-7", (3, 32, 32)), ("vgg-small-9", (1, 28, 28))])
def test_int8_training_steps_change_weights(name, shape):
    torch.manual_seed(0)
    model = build_int_model(name, shape, 10, seed=1, width=0.25)
    before = [layer.weight.clone() for layer in weighted_layers(model)]
    trainer = Niti(model, NitiOptions(mu_schedule="0:5"), seed=1)
    x = QTensor.of(torch.randint(-127, 128, (4, *shape), dtype=torch.int8), -7)
    y = torch.tensor([0, 3, 5, 9])
    for step in range(2):
        logits = trainer.train_step(x, y, step, epoch=0)
        assert logits.v.shape == (4, 10) and logits.v.dtype == torch.int8
    after = [layer.weight for layer in weighted_layers(model)]
    assert all(a.dtype == torch.int8 and int(a.abs().max()) <= 127 for a in after)
    changed = [not torch.equal(a, b) for a, b in zip(after, before)]
    assert changed[-1] and sum(changed) >= len(changed) // 2, changed
    assert all(isinstance(layer, (IntConv2d, IntLinear)) for layer in weighted_layers(model))


def test_float_twin_training_step():
    torch.manual_seed(0)
    model = build_float_model("vgg-small-8", (3, 32, 32), 10, width=0.25)
    trainer = FloatTwin(model, FloatOptions(lr=0.05), total_steps=(1) * (2))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    for step in range(2):
        assert trainer.train_step(x, y, step, 0).shape == (4, 10)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_cli_trains_a_quarter_width_vgg_on_digits(tmp_path, capsys):
    out = tmp_path / "vgg"
    argv = ["train", "--model", "vgg-small-7", "--width", "0.25", "--epochs", "1", "--train-limit", "32",
            "--batch-size", "16", "--out", str(out)]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("eval_acc=")
    saved = torch.load(out / "model.pt", weights_only=True)
    assert saved["config"]["width"] == 0.25 and saved["config"]["model"] == "vgg-small-7"
    assert saved["state_dict"]["layers.0.weight"].shape == (32, 1, 3, 3)


def test_cli_refuses_a_bad_width(capsys):
    assert main(["train", "--width", "0"]) == 2
    assert "--width" in capsys.readouterr().err


@pytest.mark.parametrize("name, shape",
                         [("vgg-small-7", (1, 28, 28)), ("resnet18", (3, 32, 32)), ("lenet5", (1, 28, 28))])
def test_the_float_twin_with_the_integer_models_parameters_holds_exactly_their_weights(name, shape):
    """``--float-params integer``: the float twin's parameters are the integer model's weights,
    shape for shape (no biases, no BatchNorm scale or shift); the default twin has more."""
    int_shapes = [tuple(layer.weight.shape) for layer in weighted_layers(build_int_model(name, shape, 10, 0, width=0.25))]
    bare = build_float_model(name, shape, 10, width=0.25, biases=False)
    assert [tuple(p.shape) for p in bare.parameters()] == int_shapes
    full = build_float_model(name, shape, 10, width=0.25)
    assert sum(p.numel() for p in full.parameters()) > sum(p.numel() for p in bare.parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) and not m.affine for m in bare.modules()) == (name == "resnet18")
    bare.train()(torch.randn(2, *shape)).sum().backward()  # trains: every parameter gets a gradient
    assert all(p.grad is not None for p in bare.parameters())
