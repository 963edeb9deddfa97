"""The integer update: mu bits, clipping, the schedule, and 16-bit master weights."""

import pytest
import torch

from intrain.kernels import get_backend
from intrain.layers import IntLinear
from intrain.methods.update import IntegerUpdate, MuSchedule, apply_update
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
