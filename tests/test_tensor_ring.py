"""Tensor-ring and tensor-train layers against the dense matrix their cores represent."""

from __future__ import annotations

import pytest
import torch

from intrain.kernels import get_backend
from intrain.layers.init import init_weight
from intrain.layers.tensor_ring import (FloatTensorRing, IntTensorRing, TensorRingShape, check_factors,
                                        merge_order)
from intrain.numeric.qtensor import QTensor
from intrain.numeric.requant import requantize

SHAPES = [((2, 3), (4, 2), 2, True), ((3, 2, 2), (2, 3), 3, True), ((2, 3), (4, 2), 2, False),
          ((6,), (5,), 4, True), ((2, 2, 3), (3, 2, 2), 2, False)]


def dense_from_cores(cores: list[torch.Tensor], n_in: int) -> torch.Tensor:
    """``W [I, O]`` by the definition: the trace of the product of core slices for every index,
    one core at a time in int64 (or float64), independent of the layer's merge order."""
    chain = cores[0].to(torch.float64 if cores[0].is_floating_point() else torch.int64)
    for core in cores[1:]:  # chain [r0, D1..Dk, rk] as [r0, P, rk]
        core = core.to(chain.dtype)
        chain = torch.einsum("apb,bqc->apqc", chain, core).reshape(chain.shape[0], -1, core.shape[2])
    w = torch.einsum("apa->p", chain)
    in_size = 1
    for core in cores[:n_in]:
        in_size *= core.shape[1]
    return w.reshape(in_size, -1)


def small_cores(layer: IntTensorRing, seed: int) -> None:
    """Cores in {-1, 0, 1}: no merge can reach 128 at these sizes, so no requantisation shifts."""
    g = torch.Generator().manual_seed(seed)
    for core in layer.cores:
        core.weight.copy_(torch.randint(-1, 2, core.weight.shape, generator=g).to(torch.int8))
        core.weight_exp.fill_(-2)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("in_f,out_f,rank,ring", SHAPES)
def test_integer_layer_is_its_dense_matrix_bit_for_bit(in_f, out_f, rank, ring, backend):
    shape = TensorRingShape(in_f, out_f, rank, ring)
    layer = IntTensorRing(shape, get_backend(backend, "cpu"))
    small_cores(layer, 0)
    w = dense_from_cores([c.weight for c in layer.cores], len(in_f))
    assert torch.equal(layer.matrix().v.to(torch.int64), w.T)
    assert int(layer.matrix().e) == -2 * len(layer.cores)
    g = torch.Generator().manual_seed(1)
    for rows in (1, 3, 200):  # both contraction orders are taken among these
        x = torch.randint(-127, 128, (rows, shape.in_size), generator=g).to(torch.int8)
        expected = requantize(x.to(torch.int64) @ w, torch.tensor(-7 - 2 * len(layer.cores)))
        y = layer(QTensor.of(x, -7))
        assert torch.equal(y.v, expected.v) and int(y.e) == int(expected.e)


def test_worst_case_cores_stay_exact_on_the_data_path():
    """All cores at +127: merges round, but the data path is exact: the output is ``x @ W`` for
    the integer matrix ``W`` the layer reports, requantised once, for all-127 inputs too."""
    shape = TensorRingShape((4, 8, 8, 4), (4, 4, 8, 8), 16, True)
    layer = IntTensorRing(shape, get_backend("cpu", "cpu"))
    for core in layer.cores:
        core.weight.fill_(127)
    w = layer.matrix()
    for x in (torch.full((3, 1024), 127, dtype=torch.int8), torch.full((300, 1024), -127, dtype=torch.int8)):
        y = layer(QTensor.of(x, 0))
        expected = requantize(x.to(torch.int64) @ w.v.to(torch.int64).T, w.e)
        assert torch.equal(y.v, expected.v) and int(y.e) == int(expected.e)


@pytest.mark.parametrize("in_f,out_f,rank,ring", SHAPES)
def test_float_layer_is_its_dense_matrix(in_f, out_f, rank, ring):
    torch.manual_seed(0)
    layer = FloatTensorRing(TensorRingShape(in_f, out_f, rank, ring)).double()
    w = dense_from_cores(list(layer.cores), len(in_f))
    torch.testing.assert_close(layer.matrix(), w.T, rtol=1e-12, atol=1e-12)
    for rows in (1, 200):
        x = torch.randn(rows, w.shape[0], dtype=torch.float64)
        torch.testing.assert_close(layer(x), x @ w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("in_f,out_f,rank,ring", SHAPES)
def test_integer_backward_against_float64_autograd(in_f, out_f, rank, ring):
    """With cores that merge without rounding, every core gradient of one merge-free side is the
    exact float64 gradient; through merges it is the gradient of rounded errors, within a few
    units of the largest."""
    shape = TensorRingShape(in_f, out_f, rank, ring)
    layer = IntTensorRing(shape, get_backend("reference", "cpu"))
    small_cores(layer, 2)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-127, 128, (5, shape.in_size), generator=g).to(torch.int8)
    d = torch.randint(-127, 128, (5, shape.out_size), generator=g).to(torch.int8)
    layer(QTensor.of(x, 0))
    dx = layer.backward(QTensor.of(d, 0), None)
    cores = [c.weight.double().requires_grad_() for c in layer.cores]
    xf = x.double().requires_grad_()
    (xf @ dense_from_cores(cores, len(in_f)) * d.double()).sum().backward()
    true_dx = xf.grad * 2.0 ** (-2 * len(cores))
    torch.testing.assert_close(dx.to_float().double(), true_dx, rtol=0, atol=float(true_dx.abs().max()) / 100)
    for core, ref in zip(layer.cores, cores):
        got = core.weight_grad.double() * 2.0 ** float(core.weight_grad_exp)
        want = ref.grad * 2.0 ** (-2 * (len(cores) - 1))
        torch.testing.assert_close(got, want, rtol=0, atol=float(want.abs().max()) / 25 + 1e-12)


def test_initialisation_gives_a_dense_layers_scale():
    shape = TensorRingShape((4, 8, 8, 4), (4, 4, 8, 8), 8, True)
    layer = IntTensorRing(shape, get_backend("reference", "cpu"))
    for k, core in enumerate(layer.cores):
        core.layer_id = k + 1
        init_weight(core, seed=0)
    w = layer.matrix().to_float().double()
    std = float(w.std()) * 1024 ** 0.5  # a dense layer's Kaiming uniform: std sqrt(2/1024) x sqrt(1024) = 1.41
    assert 0.35 < std < 5.7, std  # within the factor 2 per core of the power-of-two exponents, overall


def test_merge_order_and_bad_factorisations():
    assert merge_order([2, 3], [4, 4, 4]) == (0, 1)
    assert merge_order([100, 2, 2], [1, 1, 1, 1]) == (0, (1, 2))  # the small pair first
    with pytest.raises(ValueError, match="multiply to 12, not the input size 10"):
        check_factors((3, 4), 10, "input")
    with pytest.raises(ValueError, match="rank must be 1 or more"):
        TensorRingShape((2,), (2,), 0)
    assert TensorRingShape((4, 8, 8, 4), (4, 4, 8, 8), 8).parameters == 64 * 48
    assert TensorRingShape((4, 8, 8, 4), (4, 4, 8, 8), 8, ring=False).parameters == 64 * 48 - 8 * 4 * 7 - 8 * 8 * 7
