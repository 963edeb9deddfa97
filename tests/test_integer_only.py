"""The integer-only audit: whole LeNet-5 and ResNet-18 training steps under a dispatch mode that records every
aten operator, failing if any operator receives or returns a floating-point tensor."""

from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from intrain.methods.niti import Niti, NitiOptions
from intrain.models import build_int_model
from intrain.numeric import native
from intrain.numeric.qtensor import QTensor
from intrain.layers import weighted_layers


@pytest.fixture(autouse=True)
def rounding_as_aten_operators(monkeypatch):
    """A dispatch mode sees aten operators only, not the C rounding kernels (``numeric.native``),
    so they are switched off here and every rounding runs as PyTorch operators the audit records.
    ``tests/test_native.py`` shows the kernels give the same bits and receive integer tensors
    only in an integer step."""
    monkeypatch.setattr(native, "library", lambda: None)


class FloatAudit(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []
        self.float_ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [x for x in tree_flatten((args, kwargs, out))[0] if isinstance(x, torch.Tensor)]
        self.ops.append(str(func))
        if any(x.is_floating_point() or x.is_complex() for x in tensors):
            self.float_ops.append(str(func))
        return out


def _batch(n=8):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 128, (n, 1, 28, 28), generator=gen).to(torch.int8)
    y = torch.randint(0, 10, (n,), generator=gen)
    return QTensor.of(x, -7), y


@pytest.mark.parametrize("model_name, width, weight_bits", [("lenet5", 1.0, 8), ("lenet5", 1.0, 16),
                                                         ("resnet18", 0.125, 16)])
def test_training_step_uses_only_integer_tensors(model_name, width, weight_bits):
    mu = "0:5" if weight_bits == 8 else "0:4"
    options = NitiOptions(mu_schedule=mu, weight_bits=weight_bits, weight_average="phase",
                          error_rounding="stochastic" if model_name == "resnet18" else "nearest",
                          weight_decay_shift=12 if weight_bits == 16 else None)
    model = build_int_model(model_name, (1, 28, 28), 10, seed=0, backend="reference", width=width, fmt=options.fmt)
    trainer = Niti(model, options, seed=0)
    x, y = _batch()
    trained = "weight_master" if weight_bits == 16 else "weight"
    before = [getattr(layer, trained).clone() for layer in weighted_layers(model)]
    with FloatAudit() as audit:
        trainer.train_step(x, y, step=0, epoch=0)
        trainer.train_step(x, y, step=1, epoch=0)
        with trainer.averaged():  # the epoch mean used for evaluation and the saved model
            pass
    assert audit.float_ops == [], f"float tensors seen in: {sorted(set(audit.float_ops))}"
    names = set(audit.ops)
    # The audit saw the real work: products, shifts, the loss division and the update.
    for op in ("aten.mm", "aten.__rshift__", "aten.div.Tensor_mode", "aten.clamp", "aten.amax", "aten.add_"):
        assert any(name.startswith(op) for name in names), (op, sorted(names))
    assert all(not torch.equal(b, getattr(layer, trained)) for b, layer in zip(before, weighted_layers(model)))


@pytest.mark.parametrize("accumulator, optimizer", [("int32-chunked", "sgd"), ("exact", "sgd"),
                                                    ("int32-chunked", "adamw")])
def test_dfp16_training_step_uses_only_integer_tensors(accumulator, optimizer):
    """DFP16's integer-only mode (int32 masters and momentum or AdamW's moments, fixed-point
    learning rate and decay factors): two steps, products through either accumulator, no float
    tensor anywhere (AdamW's C kernels replaced by the PyTorch code whose bits they give,
    tests/test_niti_adamw.py)."""
    from intrain.methods.dfp16 import Dfp16, Dfp16Options

    options = Dfp16Options(lr=0.05, backend="reference", dfp16_accumulator=accumulator, optimizer=optimizer)
    model = Dfp16.build_model(options, "lenet5", (1, 28, 28), 10, seed=0, width=1.0, device="cpu")
    trainer = Dfp16(model, options, seed=0, total_steps=10)
    x, y = _batch()
    before = [(layer.weight.clone(), layer.weight_exp.clone()) for layer in weighted_layers(model)]
    with FloatAudit() as audit, mock.patch.object(native, "adamw_second_moment", lambda *args: None), \
            mock.patch.object(native, "adamw_quotient", lambda *args: None):
        x = Dfp16.network_input(x)
        trainer.train_step(x, y, step=0, epoch=0)
        trainer.train_step(x, y, step=1, epoch=0)
    assert audit.float_ops == [], f"float tensors seen in: {sorted(set(audit.float_ops))}"
    names = set(audit.ops)
    for op in ("aten.mm", "aten.__rshift__", "aten.div.Tensor_mode", "aten.mul", "aten.amax", "aten.where"):
        assert any(name.startswith(op) for name in names), (op, sorted(names))
    assert all(not torch.equal(w, layer.weight) for (w, _), layer in zip(before, weighted_layers(model)))


@pytest.mark.parametrize("core_update", ["niti", "sign", "adamw"])
def test_tr_lstm_training_step_uses_only_integer_tensors(core_update):
    if core_update == "adamw":  # the float twin's AdamW recipe for every layer, cores included
        options = NitiOptions(update="adamw", lr=0.003, weight_average="none")
    else:
        options = NitiOptions(mu_schedule="0:4", weight_average="phase", core_update=core_update)
    model = build_int_model("tr-lstm", (10, 16, 16), 8, seed=0, backend="reference", width=0.25, fmt=options.fmt)
    trainer = Niti(model, options, seed=0, total_steps=10)
    gen = torch.Generator().manual_seed(0)
    x = QTensor.of(torch.randint(0, 128, (4, 10, 16, 16), generator=gen).to(torch.int8), -7)
    y = torch.randint(0, 8, (4,), generator=gen)
    before = [layer.weight.clone() for layer in weighted_layers(model)]
    with FloatAudit() as audit:
        trainer.train_step(x, y, step=0, epoch=0)
        with trainer.averaged():
            pass
    assert audit.float_ops == [], f"float tensors seen in: {sorted(set(audit.float_ops))}"
    assert len(before) == 4 + 4 + 2  # four input and four output cores, the recurrent and output weights
    assert all(not torch.equal(b, layer.weight) for b, layer in zip(before, weighted_layers(model)))


def test_audit_catches_a_float_operation():
    with FloatAudit() as audit:
        torch.ones(3, dtype=torch.int8).to(torch.float32).sum()
    assert audit.float_ops


def test_training_step_with_the_sgd_update_uses_only_integer_tensors():
    options = NitiOptions(update="sgd", lr=0.05, weight_average="none", error_rounding="stochastic",
                          activation_rounding="stochastic", biases="on", relu_scale="positive")
    model = build_int_model("lenet5", (1, 28, 28), 10, seed=0, backend="reference", fmt=options.fmt, biases=True)
    trainer = Niti(model, options, seed=0, total_steps=10)
    x, y = _batch()
    before = [(layer.weight.clone(), layer.weight_exp.clone()) for layer in weighted_layers(model)]
    with FloatAudit() as audit:
        trainer.train_step(x, y, step=0, epoch=0)
        trainer.train_step(x, y, step=1, epoch=0)
    assert audit.float_ops == [], f"float tensors seen in: {sorted(set(audit.float_ops))}"
    assert any(name.startswith("aten.mul") for name in audit.ops)  # the fixed-point factors
    assert all(not (torch.equal(w, layer.weight) and torch.equal(e, layer.weight_exp))
               for (w, e), layer in zip(before, weighted_layers(model)))


def test_data_parallel_training_step_uses_only_integer_tensors():
    """A ResNet-18 step split over 3 shards (threads standing for processes, test_shards.ThreadGroup),
    each audited in its own thread (dispatch modes are per thread): the reductions over the
    shards add no float either."""
    from intrain.numeric.collective import shard_range
    from test_shards import ThreadGroup

    options = NitiOptions(mu_schedule="0:4", weight_bits=16, error_rounding="stochastic")
    x, y = _batch(5)

    def shard(rank, collective):
        model = build_int_model("resnet18", (1, 28, 28), 10, seed=0, backend="reference", width=0.125,
                                fmt=options.fmt)
        trainer = Niti(model, options, seed=0, collective=collective)
        first, stop = shard_range(5, rank, collective.world)
        with FloatAudit() as audit:
            trainer.train_step(QTensor(x.v[first:stop], x.e), y[first:stop], step=0, epoch=0, sample_offset=first)
        return audit

    audits = ThreadGroup(3).run(shard)
    assert all(audit.float_ops == [] for audit in audits), [sorted(set(a.float_ops)) for a in audits]
    assert all(any(name.startswith("aten.maximum") for name in audit.ops) for audit in audits)
