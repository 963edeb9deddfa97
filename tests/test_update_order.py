"""NITI updates each layer as soon as backward has made its gradient (``StepContext.gradient_ready``):
no two layers hold a gradient at once, and the result is the update after the whole backward;
with any update (NITI's, or the SGD or AdamW recipe's)."""

import copy

import pytest
import torch

from intrain.layers import StepContext, weighted_layers
from intrain.methods.loss import cross_entropy_grad
from intrain.methods.niti import Niti, NitiOptions
from intrain.methods.adamw_fixed import AdamWUpdate
from intrain.methods.sgd_fixed import FixedPointSgd
from intrain.methods.update import IntegerUpdate
from intrain.numeric.qtensor import QTensor


@pytest.mark.parametrize("update", ["niti", "sgd", "adamw"])
@pytest.mark.parametrize("name, shape, width", [("lenet5", (1, 28, 28), 0.5), ("resnet18", (3, 16, 16), 0.125)])
def test_layers_are_updated_one_at_a_time_with_the_same_result(name, shape, width, update, monkeypatch):
    if update == "niti":
        options = NitiOptions(mu_schedule="0:2", weight_average="none", error_rounding="stochastic",
                              weight_decay_shift=6)
    else:
        options = NitiOptions(update=update, lr=0.5, weight_average="none", error_rounding="stochastic")
    gen = torch.Generator().manual_seed(1)
    x = QTensor(torch.randint(0, 128, (6, *shape), dtype=torch.int8, generator=gen), torch.tensor(-7))
    y = torch.randint(0, 10, (6,), generator=gen)
    model = Niti.build_model(options, name, shape, 10, seed=3, width=width, device="cpu")
    start = copy.deepcopy(model.state_dict())

    # the update after the whole backward, without the hook
    method = Niti(model, options, seed=5, total_steps=10)
    ctx = StepContext(5, 0)
    logits = model(x, ctx)
    model.backward(cross_entropy_grad(logits, y, 5, 0, options.fmt), ctx)
    if update == "niti":
        method.update.step(0)
    else:
        method.twin.step(0, 6)
    expected = copy.deepcopy(model.state_dict())

    model.load_state_dict(start)
    method = Niti(model, options, seed=5, total_steps=10)
    holding = []
    updater = {"niti": IntegerUpdate, "sgd": FixedPointSgd, "adamw": AdamWUpdate}[update]
    original = updater.step

    def spy(self, *args, **kwargs):
        holding.append(sum(layer.weight_grad is not None for layer in weighted_layers(model)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(updater, "step", spy)
    method.train_step(x, y, 0, 0)
    assert max(holding) == 1 and len(holding) > len(weighted_layers(model))  # one per layer, then the final call
    assert holding[-1] == 0
    state = model.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert any(not torch.equal(state[k], start[k]) for k in start)
