"""A ReLU followed by a max pooling in a sequence hands its mask to the pooling and keeps nothing
(``layers.pooling``): the same bits as the two layers each doing their own part, and less memory."""

import pytest
import torch

from intrain.layers import IntSequential, StepContext, weighted_layers
from intrain.layers.activation import IntReLU
from intrain.layers.pooling import IntMaxPool2d
from intrain.methods.dfp16 import Dfp16, Dfp16Options
from intrain.methods.niti import Niti, NitiOptions
from intrain.numeric.qtensor import QTensor


def _unlink(model) -> int:
    """Back to each layer doing its own part; returns how many pairs were linked."""
    pairs = 0
    for module in model.modules():
        if isinstance(module, IntReLU) and module.mask_applied_by_next:
            module.mask_applied_by_next = False
            pairs += 1
        if isinstance(module, IntMaxPool2d):
            module.masks_relu = False
    return pairs


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16])
def test_the_pair_routes_the_same_error_with_zero_windows_and_ties(dtype):
    gen = torch.Generator().manual_seed(0)
    limit = torch.iinfo(dtype).max
    x = torch.randint(-limit, limit + 1, (3, 4, 7, 9), generator=gen).to(dtype)  # odd sizes: dropped rows
    x[0, 0, :4, :4] = -5             # windows of negatives only: the maximum 0 after the ReLU
    x[0, 1, :2, :2] = 0              # a window of zeros
    x[1, 2, :2, :2] = limit          # a tie at the maximum
    x[2, 3, :2, :2] = torch.tensor([[-limit - 1, 0], [0, -3]], dtype=dtype)  # the most negative value
    d = QTensor(torch.randint(-limit, limit + 1, (3, 4, 3, 4), generator=gen).to(dtype), torch.tensor(-3))
    results = []
    for linked in (True, False):
        pair = IntSequential(IntReLU(), IntMaxPool2d(2)).train()
        if not linked:
            assert _unlink(pair) == 1
        out = pair(QTensor(x.clone(), torch.tensor(-2)))
        kept_by_relu = pair[0]._output
        grad = pair.backward(d, None, need_input_grad=True)
        results.append((out.v, grad.v, grad.e, kept_by_relu))
    (out, grad, exp, kept), (out_ref, grad_ref, exp_ref, kept_ref) = results
    assert torch.equal(out, out_ref) and torch.equal(grad, grad_ref) and exp == exp_ref
    assert kept is None and kept_ref is not None  # linked, the ReLU keeps nothing
    assert bool((grad_ref[0, 0, :4, :4] == 0).all()) and bool((grad_ref != 0).any())


def _step_states(method_name, model_name, shape, width, linked, steps=3):
    gen = torch.Generator().manual_seed(1)
    x = QTensor(torch.randint(0, 128, (8, *shape), dtype=torch.int8, generator=gen), torch.tensor(-7))
    y = torch.randint(0, 10, (8,), generator=gen)
    if method_name == "int8":
        options = NitiOptions(mu_schedule="0:2", weight_average="none", error_rounding="stochastic")
        model = Niti.build_model(options, model_name, shape, 10, seed=3, width=width, device="cpu")
        method = Niti(model, options, seed=5, total_steps=steps)
    else:
        options = Dfp16Options(lr=0.05)
        model = Dfp16.build_model(options, model_name, shape, 10, seed=3, width=width, device="cpu")
        method = Dfp16(model, options, seed=5, total_steps=steps)
        x = Dfp16.network_input(x)
    pairs = 0 if linked else _unlink(model)
    for step in range(steps):
        method.train_step(x, y, step, 0)
    return model.state_dict(), pairs


@pytest.mark.parametrize("method_name", ["int8", "dfp16"])
@pytest.mark.parametrize("model_name, shape, width", [("lenet5", (1, 28, 28), 0.5), ("vgg-small-7", (3, 32, 32), 0.0625)])
def test_training_steps_end_with_the_same_weights(method_name, model_name, shape, width):
    linked, _ = _step_states(method_name, model_name, shape, width, linked=True)
    unlinked, pairs = _step_states(method_name, model_name, shape, width, linked=False)
    assert pairs >= 2  # the models pool after ReLUs
    assert all(torch.equal(linked[k], unlinked[k]) for k in linked)


def test_the_pooled_output_is_the_next_layers_kept_input():
    options = NitiOptions(mu_schedule="0:2", weight_average="none")
    model = Niti.build_model(options, "lenet5", (1, 28, 28), 10, seed=3, width=1.0, device="cpu").train()
    x = QTensor(torch.randint(0, 128, (4, 1, 28, 28), dtype=torch.int8), torch.tensor(-7))
    model(x, StepContext(0, 0))
    layers = list(model.layers)
    for i, layer in enumerate(layers[:-1]):
        if isinstance(layer, IntMaxPool2d):
            assert layers[i - 1]._output is None
            after = next(l for l in layers[i + 1:] if getattr(l, "_saved_input", None) is not None)
            kept = getattr(after._saved_input, "v", after._saved_input)
            if kept.dim() == 4:  # a convolution keeps the pooled tensor itself
                assert kept.untyped_storage().data_ptr() == layer._output.untyped_storage().data_ptr()
    assert weighted_layers(model)
