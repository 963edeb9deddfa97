"""The integer update: mu bits, clipping, the schedule, and 16-bit master weights."""

import pytest
import torch

from intrain.kernels import get_backend
from intrain.layers import IntLinear
from intrain.methods.update import IntegerUpdate, MuSchedule, apply_sign_update, apply_update
from intrain.layers import IntSequential
from intrain.numeric.formats import NITI_INT8_MASTER16


def test_update_has_at_most_mu_bits_and_clips():
    grad = torch.tensor([[1000, -1000, 500, 3, 0]], dtype=torch.int64)  # 10 bits -> shift 6 for mu 4
    w = torch.tensor([[0, 0, 0, 0, 120]], dtype=torch.int8)
    new = apply_update(w, grad, mu=4)
    assert new.dtype == torch.int8
    step = (w.to(torch.int64) - new.to(torch.int64)).abs()
    assert int(step.max()) <= 16 and new.tolist()[0][:2] == [-16, 16]  # 1000/64 = 15.6 -> 16
    assert apply_update(torch.tensor([125], dtype=torch.int8), torch.tensor([-1000]), 4).tolist() == [127]
    small = torch.tensor([3, -2], dtype=torch.int64)  # fewer bits than mu: applied as they are
    assert apply_update(torch.zeros(2, dtype=torch.int8), small, 4).tolist() == [-3, 2]


def test_master_weight_update_stays_in_int16_and_accumulates_small_steps():
    grad = torch.tensor([1000, -1000, 2000], dtype=torch.int64)
    master = torch.tensor([32700, 0, 0], dtype=torch.int16)
    new = apply_update(master, grad, mu=10)
    assert new.dtype == torch.int16 and new.tolist() == [32200, 500, -1000]  # 2000 has 11 bits: shift 1
    assert apply_update(torch.tensor([-32700], dtype=torch.int16), torch.tensor([4000]), 12).tolist() == [-32767]


def test_model_with_master_weights_moves_int8_view_only_after_enough_updates():
    layer = IntLinear(4, 1, get_backend("reference"), fmt=NITI_INT8_MASTER16)
    model = IntSequential(layer)
    layer.weight.fill_(10)
    layer.start_master_from_weight()
    assert layer.weight_master.tolist() == [[2560] * 4]
    update = IntegerUpdate(model, MuSchedule.parse("0:-1"))  # 8 - 1 = 7 master bits hold 64: a quarter int8 step
    views = []
    for step in range(4):
        layer.weight_grad = torch.tensor([[-64, -64, -64, -64]], dtype=torch.int64)
        update.step(0)
        views.append(int(layer.weight[0, 0]))
    assert layer.weight_master.tolist() == [[2560 + 4 * 64] * 4]
    assert views == [10, 11, 11, 11]  # 2624/256 = 10.25 -> 10; 2688/256 = 10.5 -> 11 (nearest)


def test_mu_schedule_parse_and_lookup():
    s = MuSchedule.parse("0:5,100:4,150:3")
    assert [s(0), s(99), s(100), s(149), s(150), s(10**6)] == [5, 5, 4, 4, 3, 3]
    assert str(s) == "0:5,100:4,150:3"
    for bad in ("", "5", "1:5", "0:5,x:3", "0:16", "0:-17", "0:5:1"):
        with pytest.raises(ValueError):
            MuSchedule.parse(bad)


def test_master_weight_refresh_near_the_int16_limit():
    layer = IntLinear(3, 1, get_backend("reference"), fmt=NITI_INT8_MASTER16)
    layer.weight_master.copy_(torch.tensor([[32767, -32767, 32640]], dtype=torch.int16))
    layer.refresh_weight()
    assert layer.weight.tolist() == [[127, -127, 127]]


@pytest.mark.parametrize("dtype, bits", [(torch.int8, 0), (torch.int8, 2), (torch.int8, 7), (torch.int16, 8),
                                         (torch.int16, 10), (torch.int16, 15)])
@pytest.mark.parametrize("grad_dtype", [torch.int32, torch.int64])
def test_sign_update_moves_every_element_by_the_same_step(dtype, bits, grad_dtype):
    """Each element with a non-zero gradient moves by 2**bits against its sign, clipped to the
    symmetric range; gradients at the dtype's extremes (int64's -2**63 included) and zero ones."""
    limit = torch.iinfo(dtype).max
    info = torch.iinfo(grad_dtype)
    weights = [-limit, -limit, -1, 0, 0, 1, limit - 1, limit, limit, 3, -3, 0]
    grads = [info.min, info.max, 1, 0, -1, info.max, -5, -1, 1, 0, 0, info.min]
    w = torch.tensor(weights, dtype=dtype)
    g = torch.tensor(grads, dtype=grad_dtype)
    new = apply_sign_update(w, g, bits)
    expected = [max(-limit, min(limit, wi - (gi > 0) * 2**bits + (gi < 0) * 2**bits)) for wi, gi in zip(weights, grads)]
    assert new.dtype == dtype and new.tolist() == expected


def test_sign_update_refuses_a_step_int32_cannot_hold():
    with pytest.raises(ValueError, match="0..23 bits"):
        apply_sign_update(torch.zeros(2, dtype=torch.int16), torch.ones(2, dtype=torch.int32), 24)


def _tr_lstm_after_one_step(weight_bits: int, **options):
    """A small int8 TR-LSTM after one NITI step with ``options``, and one never trained."""
    from intrain.methods.niti import Niti, NitiOptions
    from intrain.models import build_int_model
    from intrain.numeric.qtensor import QTensor

    gen = torch.Generator().manual_seed(0)
    x = QTensor.of(torch.randint(-128, 128, (8, 6, 16, 16), generator=gen).to(torch.int8), -7)
    y = torch.randint(0, 8, (8,), generator=gen)
    options = NitiOptions(weight_bits=weight_bits, weight_average="none", **options)
    models = [build_int_model("tr-lstm", (6, 16, 16), 8, seed=0, backend="reference", width=0.25, fmt=options.fmt)
              for _ in range(2)]
    Niti(models[0], options, seed=0).train_step(x, y, step=0, epoch=0)
    return models


@pytest.mark.parametrize("weight_bits", [8, 16])
@pytest.mark.parametrize("mu, core_mu", [(2, None), (4, 1)])
def test_sign_rule_changes_the_cores_only(weight_bits, mu, core_mu):
    """One training step of a tensor-ring LSTM with --core-update sign against one with niti from
    the same weights: every layer that is not a core ends identical; every core element moved by
    0 or exactly 2**core_mu int8 steps (clipped; core_mu is mu's unless the cores have their own
    schedule), and more of them moved than under NITI's rule."""
    from intrain.layers import weighted_layers
    from intrain.layers.tensor_ring import TensorRingCore

    schedules = dict(mu_schedule=f"0:{mu}", core_mu_schedule=None if core_mu is None else f"0:{core_mu}")
    niti, fresh = _tr_lstm_after_one_step(weight_bits, core_update="niti", **schedules)
    sign, _ = _tr_lstm_after_one_step(weight_bits, core_update="sign", **schedules)
    moved = {"niti": 0, "sign": 0}
    for before, niti, sign in zip(weighted_layers(fresh), weighted_layers(niti), weighted_layers(sign)):
        if not isinstance(before, TensorRingCore):
            assert torch.equal(niti.update_target, sign.update_target)
            continue
        step = 2 ** ((mu if core_mu is None else core_mu) + (8 if weight_bits == 16 else 0))
        limit = torch.iinfo(before.update_target.dtype).max
        delta = (sign.update_target.to(torch.int32) - before.update_target.to(torch.int32)).abs()
        clipped = sign.update_target.abs() == limit
        assert bool(((delta == 0) | (delta == step) | clipped).all())
        moved["sign"] += int((delta != 0).sum())
        moved["niti"] += int((niti.update_target != before.update_target).sum())
    assert moved["sign"] > moved["niti"] > 0


def test_core_schedule_changes_the_cores_only():
    """--core-mu-schedule gives the cores their own mu: with mu 4 for the other layers, cores at
    mu 1 end unlike cores at mu 4, and every other layer ends as with one schedule for all."""
    from intrain.layers import weighted_layers
    from intrain.layers.tensor_ring import TensorRingCore

    own, _ = _tr_lstm_after_one_step(8, mu_schedule="0:4", core_mu_schedule="0:1")
    shared, _ = _tr_lstm_after_one_step(8, mu_schedule="0:4")
    same = [torch.equal(a.weight, b.weight) for a, b in zip(weighted_layers(own), weighted_layers(shared))]
    cores = [isinstance(layer, TensorRingCore) for layer in weighted_layers(own)]
    assert all(s for s, core in zip(same, cores) if not core) and not any(s for s, core in zip(same, cores) if core)


def _decaying_layer(value: int, n: int = 4000, fmt=None) -> tuple[IntLinear, IntSequential]:
    layer = IntLinear(n, 1, get_backend("reference"), **({} if fmt is None else {"fmt": fmt}))
    layer.weight.fill_(value)
    if fmt is not None:
        layer.start_master_from_weight()
    return layer, IntSequential(layer)


def test_weight_decay_is_stochastic_with_the_mean_of_its_fraction():
    """A zero gradient leaves only the decay: 100 / 2**(K - mu) = 100 / 16 = 6.25 per step, so about
    a quarter of the weights lose 7 and the rest 6 (nearest rounding would take 6 from all, NITI's
    pseudo-stochastic rounding, whose randomness is the value's own low bits, too)."""
    layer, model = _decaying_layer(100)
    update = IntegerUpdate(model, MuSchedule.parse("0:3"), decay_shift=7, seed=1)
    layer.weight_grad = torch.zeros(1, 4000, dtype=torch.int64)
    update.step(0, step=0)
    lost = 100 - layer.weight.to(torch.int64)
    assert set(lost.unique().tolist()) == {6, 7}
    assert 900 <= int((lost == 7).sum()) <= 1100  # 1000 expected, 27 one standard deviation


def test_weight_decay_follows_mu_and_is_the_same_fraction_of_a_master_weight():
    """mu 3 then 5 with K = 7: shifts 4 then 2; an int16 master (the int8 value times 256) loses the
    same fraction of itself, exactly here because it is divisible."""
    layer, model = _decaying_layer(10, n=8, fmt=NITI_INT8_MASTER16)
    update = IntegerUpdate(model, MuSchedule.parse("0:3,1:5"), decay_shift=7)
    layer.weight_grad = torch.zeros(1, 8, dtype=torch.int64)
    update.step(0, step=0)
    assert layer.weight_master.tolist() == [[2560 - 160] * 8]  # 2560 / 2**4
    layer.weight_grad = torch.zeros(1, 8, dtype=torch.int64)
    update.step(1, step=1)
    assert layer.weight_master.tolist() == [[2400 - 600] * 8]  # 2400 / 2**2


def test_weight_decay_never_flips_a_sign_and_is_keyed_by_seed_and_step():
    values = torch.tensor([-127, -64, -3, -2, -1, 0, 1, 2, 3, 64, 127], dtype=torch.int8).repeat(200)
    results = {}
    for seed, step in ((0, 0), (0, 0), (0, 1), (1, 0)):
        layer = IntLinear(values.numel(), 1, get_backend("reference"))
        layer.weight.copy_(values.reshape(1, -1))
        layer.weight_grad = torch.zeros(1, values.numel(), dtype=torch.int64)
        IntegerUpdate(IntSequential(layer), MuSchedule.parse("0:4"), decay_shift=5, seed=seed).step(0, step=step)
        new = layer.weight.reshape(-1).to(torch.int64)
        old = values.to(torch.int64)
        assert bool(((new * old) >= 0).all()) and bool((new.abs() <= old.abs()).all())
        assert bool((new.abs() < old.abs())[old.abs() >= 2].all())  # shift 1: at least half of |w| >= 2 goes
        results.setdefault((seed, step), []).append(new)
    assert torch.equal(*results[0, 0])  # replayable: a function of (seed, step, layer) only
    assert not torch.equal(results[0, 0][0], results[0, 1][0]) and not torch.equal(results[0, 0][0], results[1, 0][0])


def test_weight_decay_comes_from_the_weight_before_the_update_and_clips():
    """w = +-120, gradient steps of -+16 and decays of +-120 / 2 = +-60 (exact, so not random):
    clip(120 + 16) - 60 = 67 (a decay of the clipped weight, 127 / 2, would leave 63 or 64)."""
    layer = IntLinear(2, 1, get_backend("reference"))
    layer.weight.copy_(torch.tensor([[120, -120]], dtype=torch.int8))
    layer.weight_grad = torch.tensor([[-1000, 1000]], dtype=torch.int64)  # 10 bits, mu 4: steps of 16
    IntegerUpdate(IntSequential(layer), MuSchedule.parse("0:4"), decay_shift=5).step(0, step=0)
    assert layer.weight.tolist() == [[67, -67]]


def test_weight_decay_shift_must_exceed_every_mu():
    layer, model = _decaying_layer(1, n=2)
    with pytest.raises(ValueError, match="must exceed every mu"):
        IntegerUpdate(model, MuSchedule.parse("0:3,5:6"), decay_shift=6)
    with pytest.raises(ValueError, match="must exceed every mu"):
        IntegerUpdate(model, MuSchedule.parse("0:3"), core_schedule=MuSchedule.parse("0:7"), decay_shift=6)


@pytest.mark.parametrize("fmt", [None, NITI_INT8_MASTER16], ids=["int8", "master16"])
def test_weight_decay_is_the_same_bits_with_and_without_the_c_kernels(fmt, monkeypatch):
    """The decay's one-pass C rounding against the PyTorch operators, on weights at the extremes
    (+-127, the int16 master's +-32767) and shifts 1 to 20 (every mu, with K = mu + 1 and K = 20)."""
    from intrain.numeric import native

    if not native.available():
        pytest.skip("no C compiler here: only the PyTorch path exists")
    gen = torch.Generator().manual_seed(3)
    limit = 32767 if fmt is not None else 127
    values = torch.randint(-limit, limit + 1, (3, 1000), generator=gen)
    values[0, :4] = torch.tensor([limit, -limit, 1, -1])
    results = []
    for kernels in (True, False):
        if not kernels:
            monkeypatch.setattr(native, "library", lambda: None)
        runs = []
        for mu in range(16):
            for shift in (mu + 1, 20):
                layer = IntLinear(1000, 3, get_backend("reference"), **({} if fmt is None else {"fmt": fmt}))
                (layer.weight_master if fmt is not None else layer.weight).copy_(values)
                update = IntegerUpdate(IntSequential(layer), MuSchedule.parse(f"0:{mu}"), decay_shift=shift, seed=9)
                runs.append(update._decay(layer.update_target, layer, step=mu, mu=mu))
        results.append(runs)
    for with_kernels, without in zip(*results):
        assert torch.equal(with_kernels.to(torch.int32), without.to(torch.int32))
    assert any(bool(r.ne(0).any()) for r in results[0])
