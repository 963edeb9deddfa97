"""A batch cut into shards, each requantised with the maxima over all shards and random numbers
at its elements' positions in the whole batch, gives exactly the rows of the whole batch's result.

The shards run in threads of this process, each one standing for a process of a data-parallel
run: ``ThreadGroup`` is a real all-reduce between them (every reduction waits until every shard
has contributed, as torch.distributed's does), so a shard that skipped a reduction or made an
extra one would hang the group and fail the test (the barrier times out). The two-process runs
over torch.distributed are in ``test_data_parallel.py``.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from intrain.kernels import CpuBackend, CpuSettings
from intrain.layers import weighted_layers
from intrain.methods.niti import Niti, NitiOptions
from intrain.numeric import rng
from intrain.numeric.collective import shard_range
from intrain.numeric.qtensor import QTensor
from intrain.numeric.requant import add_aligned, requantize, requantize_product

BARRIER_SECONDS = 60


class ThreadGroup:
    """Shared slots and a barrier for ``world`` threads; ``member(rank)`` is one's Collective."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=BARRIER_SECONDS)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.calls = [0] * world

    def reduce(self, rank: int, t: torch.Tensor, combine) -> torch.Tensor:
        self.slots[rank] = t.clone()
        self.calls[rank] += 1
        self.barrier.wait()
        result = self.slots[0]
        for other in self.slots[1:]:
            if other.shape != result.shape or other.dtype != result.dtype:
                raise AssertionError(f"shards reduce different tensors: {tuple(result.shape)} {result.dtype} "
                                     f"and {tuple(other.shape)} {other.dtype}")
            result = combine(result, other)
        self.barrier.wait()  # nobody refills a slot before everyone has read them all
        return result

    def member(self, rank: int) -> "ThreadCollective":
        return ThreadCollective(self, rank)

    def run(self, work) -> list:
        """``work(rank, collective)`` in one thread per rank; their results, in rank order."""
        results, errors = [None] * self.world, []

        def body(rank):
            try:
                results[rank] = work(rank, self.member(rank))
            except BaseException as err:  # noqa: BLE001 - reported below, with the others stopped
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(rank,)) for rank in range(self.world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        assert len(set(self.calls)) == 1, f"shards made different numbers of reductions: {self.calls}"
        return results


class ThreadCollective:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank, self.world = group, rank, group.world

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.group.reduce(self.rank, t, torch.add)

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return self.group.reduce(self.rank, t, torch.maximum)


def _shards(rows: int, world: int) -> list[slice]:
    return [slice(*shard_range(rows, rank, world)) for rank in range(world)]


def test_shard_range_splits_in_order_evenly():
    for rows in range(0, 12):
        for world in range(1, 6):
            bounds = [shard_range(rows, rank, world) for rank in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank 2 is not one of the 2 processes"):
        shard_range(4, 2, 2)


def test_uint32_offset_continues_the_stream():
    key = rng.derive_key(5, 6, 7)
    whole = rng.uint32(key, (5, 3))
    assert torch.equal(rng.uint32(key, (2, 3), offset=9), whole[3:])
    assert torch.equal(rng.uniform_bits(key, (4,), 20, offset=11), rng.uniform_bits(key, (15,), 20)[11:])
    with pytest.raises(ValueError, match="element positions in"):
        rng.uint32(key, (4,), offset=2**32 - 3)


@pytest.mark.parametrize("rows, world", [(7, 3), (2, 3), (9, 2)])
@pytest.mark.parametrize("mode", ["nearest", "stochastic"])
def test_requantize_of_shards_is_the_whole_batch(rows, world, mode):
    gen = torch.Generator().manual_seed(rows * 10 + world)
    acc = torch.randint(-2**20, 2**20, (rows, 3, 4), generator=gen, dtype=torch.int32)
    acc[rows // 2] *= 8  # the largest values in one shard only
    key = rng.derive_key(1, 2, 3) if mode == "stochastic" else None
    e = torch.tensor(-9)
    whole = requantize(acc, e, mode=mode, key=key)

    def shard(rank, collective):
        part = acc[_shards(rows, world)[rank]]
        return requantize(part, e, mode=mode, key=key, offset=_shards(rows, world)[rank].start * 12,
                          reduce_max=collective.max)

    parts = ThreadGroup(world).run(shard)
    assert torch.equal(torch.cat([p.v for p in parts]), whole.v)
    assert all(int(p.e) == int(whole.e) for p in parts)


@pytest.mark.parametrize("mode", ["nearest", "stochastic"])
def test_residual_add_of_shards_is_the_whole_batch(mode):
    """One operand is zero in the first shard only (and in an empty one), the other is zero
    everywhere but in the last: the "all zero" tests must be the whole batch's."""
    rows, world = 5, 3
    a = torch.randint(-127, 128, (rows, 6), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    a[:2] = 0
    b = torch.zeros((rows, 6), dtype=torch.int8)
    b[-1] = 100
    qa, qb = QTensor(a, torch.tensor(-3)), QTensor(b, torch.tensor(-12))
    key = rng.derive_key(4) if mode == "stochastic" else None
    whole = add_aligned(qa, qb, mode=mode, key=key)

    def shard(rank, collective):
        rows_of = _shards(rows, world)[rank]
        return add_aligned(QTensor(a[rows_of], qa.e), QTensor(b[rows_of], qb.e), mode=mode, key=key,
                           offset=rows_of.start * 6, reduce_max=collective.max)

    parts = ThreadGroup(world).run(shard)
    assert torch.equal(torch.cat([p.v for p in parts]), whole.v)
    assert all(int(p.e) == int(whole.e) for p in parts)
    # zero from a shard's own view would have given it b's exponent for a: a different result
    alone = add_aligned(QTensor(a[:2], qa.e), QTensor(b[:2], qb.e))
    assert int(alone.e) != int(whole.e)


@pytest.mark.parametrize("product, args", [
    ("conv2d_forward", lambda x, w: (x, w, 1, 1)),
    ("conv2d_backward_input", lambda x, w: (x, w, (6, 6), 1, 1)),
    ("linear_forward", None),
])
def test_cpu_fused_requantisation_of_shards_is_the_whole_batch(product, args, monkeypatch):
    """The cpu backend's ``product_to_int8`` in small chunks (``requantize_chunks``, the
    convolutions here) and whole (``exact_to_narrow``, the linear product) takes the whole batch's
    shift."""
    import intrain.kernels.cpu.backend as cpu_backend

    chunked = []
    original = cpu_backend.requantize_chunks
    monkeypatch.setattr(cpu_backend, "requantize_chunks",
                        lambda *a, **k: chunked.append(1) or original(*a, **k))
    backend = CpuBackend(CpuSettings(float_chunk_bytes=2**10, int8_gemm_chunk_bytes=2**10))
    gen = torch.Generator().manual_seed(1)
    rows, world = 9, 2
    if args is None:
        x = torch.randint(-127, 128, (rows, 40), dtype=torch.int8, generator=gen)
        w = torch.randint(-127, 128, (7, 40), dtype=torch.int8, generator=gen)
        call = lambda part: (part, w)  # noqa: E731
    else:
        x = torch.randint(-127, 128, (rows, 8, 6, 6), dtype=torch.int8, generator=gen)
        w = torch.randint(-127, 128, (8, 8, 3, 3), dtype=torch.int8, generator=gen)
        call = lambda part: args(part, w)  # noqa: E731
    x[0] = x[0] // 64  # the shards' maxima differ
    e = torch.tensor(0)
    # forward products also rounded from their positive part (a ReLU follows: ``rectify``)
    for rectify in (False, True) if product.endswith("_forward") else (False,):
        exact = getattr(backend, product)(*call(x))
        whole = requantize(exact.clamp(min=0) if rectify else exact, e)
        assert torch.equal(requantize_product(backend, product, call(x), e, rectify=rectify).v, whole.v)

        def shard(rank, collective):
            return requantize_product(backend, product, call(x[_shards(rows, world)[rank]]), e,
                                      reduce_max=collective.max, rectify=rectify)

        parts = ThreadGroup(world).run(shard)
        assert torch.equal(torch.cat([p.v for p in parts]), whole.v)
        assert all(int(p.e) == int(whole.e) for p in parts)
    assert bool(chunked) == (args is not None)


def _model(name: str, shape, options: NitiOptions, width: float):
    return Niti.build_model(options, name, shape, 10, seed=3, width=width, device="cpu")


@pytest.mark.parametrize("name, shape, width, weight_bits, relu_scale, activation_rounding", [
    ("lenet5", (1, 28, 28), 1.0, 8, "magnitude", "stochastic"),
    ("resnet18", (1, 16, 16), 0.125, 16, "magnitude", "nearest"),
    ("vgg-small-7", (1, 16, 16), 0.0625, 8, "positive", "stochastic"),  # dropout: its mask by element position
])
def test_training_steps_of_shards_are_the_whole_batch(name, shape, width, weight_bits, relu_scale,
                                                      activation_rounding):
    """Steps with global batches of 7 (shards 2, 2, 3) and 2 (one shard empty) on 3 shards:
    every shard's model ends with the one-process weights, and its logits are its rows (the
    stochastic roundings, of errors and of activations, keyed by global element position)."""
    options = NitiOptions(mu_schedule="0:3", backend="cpu", weight_bits=weight_bits,
                          error_rounding="stochastic", weight_average="none", relu_scale=relu_scale,
                          activation_rounding=activation_rounding)
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randint(-127, 128, (rows, *shape), dtype=torch.int8, generator=gen),
                torch.randint(0, 10, (rows,), generator=gen)) for rows in (7, 2, 7)]
    whole_model = _model(name, shape, options, width)
    start = copy.deepcopy(whole_model.state_dict())
    whole_method = Niti(whole_model, options, seed=11)
    whole_logits = [whole_method.train_step(QTensor(x, torch.tensor(-7)), y, step, 0)
                    for step, (x, y) in enumerate(batches)]
    world = 3

    def shard(rank, collective):
        model = _model(name, shape, options, width)
        model.load_state_dict(start)
        method = Niti(model, options, seed=11, collective=collective)
        logits = []
        for step, (x, y) in enumerate(batches):
            rows = _shards(x.shape[0], world)[rank]
            logits.append(method.train_step(QTensor(x[rows], torch.tensor(-7)), y[rows], step, 0,
                                            sample_offset=rows.start))
        return model.state_dict(), logits

    results = ThreadGroup(world).run(shard)
    expected = whole_model.state_dict()
    for state, _ in results:
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected)
    for step, whole in enumerate(whole_logits):
        assert torch.equal(torch.cat([logits[step].v for _, logits in results]), whole.v)
        assert all(int(logits[step].e) == int(whole.e) for _, logits in results)
    assert any(not torch.equal(expected[k], start[k]) for k in start), "the steps changed nothing"
    assert all(layer.weight_grad is None for layer in weighted_layers(whole_model))
