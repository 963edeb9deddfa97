"""The float32 twin's recipe: lr schedule values, optimizer settings, determinism, learning."""

import math

import pytest
import torch

from intrain.methods.float_twin import FloatOptions, FloatTwin, lr_at


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def test_warmup_is_linear_then_cosine_to_zero():
    trainer = FloatTwin(_net(), FloatOptions(lr=0.1), total_steps=(10) * (100))  # 1000 steps
    assert trainer.total_steps == 1000 and trainer.warmup_steps == 20  # 2 %
    assert trainer.lr_at(0) == pytest.approx(0.1 / 20)
    assert trainer.lr_at(9) == pytest.approx(0.1 * 10 / 20)
    assert trainer.lr_at(19) == pytest.approx(0.1)  # peak at the end of warm-up
    assert trainer.lr_at(20) == pytest.approx(0.1)  # cosine starts at the peak
    assert trainer.lr_at(20 + 490) == pytest.approx(0.05)  # halfway through the decay
    assert trainer.lr_at(20 + 245) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert 0 < trainer.lr_at(999) < 1e-5  # last step: almost zero
    assert trainer.lr_at(1000) == 0.0 and trainer.lr_at(5000) == 0.0
    decay = [trainer.lr_at(s) for s in range(20, 1000)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_short_runs_still_warm_up_one_step():
    assert lr_at(0, base_lr=0.2, total_steps=10, warmup_steps=1) == pytest.approx(0.2)
    trainer = FloatTwin(_net(), FloatOptions(lr=0.2), total_steps=(1) * (10))
    assert trainer.warmup_steps == 1
    assert trainer.lr_at(0) == pytest.approx(0.2)
    assert trainer.lr_at(5) == pytest.approx(0.1 * (1 + math.cos(math.pi * 4 / 9)))
    FloatTwin(_net(), FloatOptions(lr=0.2), total_steps=(0) * (10))  # zero epochs: allowed


def test_optimizer_is_nesterov_sgd_with_decay_on_weights_only():
    net = _net()
    opt = FloatTwin(net, FloatOptions(lr=0.1), total_steps=(1) * (10)).optimizer
    assert isinstance(opt, torch.optim.SGD)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
    assert all(g["momentum"] == 0.9 and g["nesterov"] for g in opt.param_groups)
    assert {id(p) for p in decayed["params"]} == {id(net[1].weight), id(net[3].weight)}
    assert {id(p) for p in plain["params"]} == {id(net[1].bias), id(net[3].bias)}


def test_train_step_uses_the_scheduled_lr_and_returns_pre_update_logits():
    net = _net()
    trainer = FloatTwin(net, FloatOptions(lr=0.1), total_steps=(2) * (50))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    before = net(x).detach()
    logits = trainer.train_step(x, y, step=30, epoch=0)
    assert torch.equal(logits, before) and not logits.requires_grad
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(trainer.lr_at(30))
    assert not torch.equal(net(x).detach(), before)  # the weights moved


def test_predict_is_eval_mode_without_grad_and_restores_train_mode():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5))
    trainer = FloatTwin(net, FloatOptions(lr=0.1), total_steps=(1) * (1))
    x = torch.randn(5, 4)
    out = trainer.predict(x)
    assert torch.equal(out, net[0](x).detach()) and not out.requires_grad  # dropout off
    assert net.training


def _train(seed, steps=60):
    torch.manual_seed(seed)
    net = _net(seed)
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(96, 4, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    trainer = FloatTwin(net, FloatOptions(lr=0.1), total_steps=(steps // 6) * (6))
    for step in range(steps):
        i = (step % 6) * 16
        trainer.train_step(x[i:i + 16], y[i:i + 16], step, step // 6)
    acc = (trainer.predict(x).argmax(1) == y).float().mean().item()
    return net.state_dict(), acc


def test_same_seed_same_weights_and_it_learns():
    a, acc = _train(0)
    b, _ = _train(0)
    c, _ = _train(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert acc > 0.85  # a nearly separable 3-class problem


def _built(weight_init, model="vgg-small-7"):
    options = FloatOptions(lr=0.05, weight_init=weight_init)
    return FloatTwin.build_model(options, model, (1, 28, 28), 10, seed=3, width=0.25, device="cpu")


def test_kaiming_init_has_the_integer_models_scale_and_zero_biases():
    layers = [m for m in _built("kaiming").modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 7
    for m in layers:
        bound = math.sqrt(6 / m.weight[0].numel())
        top = float(m.weight.detach().abs().max())
        assert 0.9 * bound < top <= bound  # uniform over the whole range
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
    default = [m for m in _built("torch").modules() if isinstance(m, torch.nn.Conv2d)]
    for m in default:  # PyTorch's own: uniform in +-sqrt(1 / fan_in), non-zero biases
        assert float(m.weight.detach().abs().max()) <= math.sqrt(1 / m.weight[0].numel())
        assert float(m.bias.detach().abs().max()) > 0


def test_kaiming_init_is_seeded():
    a, b = _built("kaiming").state_dict(), _built("kaiming").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_recipe_takes_kaiming_for_vgg_only_and_old_runs_keep_the_default():
    from intrain.run.recipes import default_recipe

    assert default_recipe("fashion-mnist", "vgg-small-7", "float").options["weight_init"] == "kaiming"
    assert default_recipe("cifar10", "vgg-small-8", "float").options["weight_init"] == "kaiming"
    assert "weight_init" not in default_recipe("mnist", "lenet5", "float").options
    assert "weight_init" not in default_recipe("fashion-mnist", "vgg-small-7", "dfp16").options
    # A run saved before the option existed resolves to what it was trained with.
    assert FloatTwin.make_options({"lr": 0.05}, {}).weight_init == "torch"
    assert FloatTwin.make_options({}, default_recipe("mnist", "lenet5", "float").options).weight_init == "torch"


def _gradient_norm(net):
    return float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in net.parameters()])))


def test_clip_grad_norm_rescales_the_step_gradient_and_is_off_by_default():
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(5)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    plain, clipped = _net(), _net()
    FloatTwin(plain, FloatOptions(lr=0.1), total_steps=10).train_step(x, y, step=0, epoch=0)
    FloatTwin(clipped, FloatOptions(lr=0.1, clip_grad_norm=0.01), total_steps=10).train_step(x, y, step=0, epoch=0)
    full = _gradient_norm(plain)
    assert full > 0.1  # the gradient the step left behind is the one it used
    assert _gradient_norm(clipped) == pytest.approx(0.01, rel=1e-4)
    for p, q in zip(plain.parameters(), clipped.parameters()):  # same direction, scaled
        torch.testing.assert_close(q.grad, p.grad * (0.01 / full), rtol=1e-4, atol=1e-7)
    assert FloatTwin.make_options({"lr": 0.05}, {}).clip_grad_norm is None  # runs saved before the option


def test_clip_grad_norm_must_be_positive():
    from intrain.methods.base import MethodOptionError

    with pytest.raises(MethodOptionError, match="--clip-grad-norm"):
        FloatTwin.check_options(FloatOptions(lr=0.1, clip_grad_norm=-1.0))


def test_weight_decay_is_an_option_of_the_weights_only():
    """--weight-decay sets the decay of the matrices (5e-4 unless given; 0 turns it off); biases
    are never decayed. With a zero gradient only the decay moves a weight: by lr x decay x (1 + 0.9)
on the first step (Nesterov adds the momentum buffer, itself the decay term, once more)."""
    assert FloatTwin.make_options({"lr": 0.05}, {}).weight_decay == 5e-4  # runs saved before the option
    for decay in (0.0, 0.1):
        net = _net()
        trainer = FloatTwin(net, FloatOptions(lr=1.0, weight_decay=decay), total_steps=1)
        assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [decay, 0.0]
        before = [p.detach().clone() for p in net.parameters()]
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        trainer.optimizer.step()
        for b, p in zip(before, net.parameters()):
            shrink = decay * trainer.optimizer.param_groups[0]["lr"] * 1.9 if p.dim() > 1 else 0.0
            torch.testing.assert_close(p.detach(), b * (1 - shrink))
