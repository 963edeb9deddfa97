"""Integer LSTM: gate tables, forward and backward through time against float64 autograd."""

from __future__ import annotations

import pytest
import torch

from intrain.kernels import get_backend
from intrain.layers.linear import IntLinear
from intrain.layers.recurrent import GATE_EXPONENT, WIDE_LIMIT, IntLSTM, gate_tables, to_fixed
from intrain.layers.tensor_ring import IntTensorRing, TensorRingShape
from intrain.numeric.qtensor import QTensor


def test_gate_tables_within_one_unit_of_the_float_functions():
    sigmoid, tanh = gate_tables()
    x = torch.arange(-32767, 32768, dtype=torch.float64) / 2**11
    assert (sigmoid.double() - torch.sigmoid(x) * 2**14).abs().max() <= 1
    assert (tanh.double() - torch.tanh(x) * 2**14).abs().max() <= 1
    assert sigmoid[32767] == 2**13 and tanh[32767] == 0
    assert sigmoid[0] == 0 and sigmoid[-1] == 2**14 and tanh[-1] == 2**14 and tanh[0] == -2**14


def float64_lstm(x, u_weight, w_weight, hidden, forget_bias=0.0):
    """The same LSTM in float64 with autograd (exact sigmoid and tanh)."""
    n, steps = x.shape[:2]
    u = (x.reshape(n * steps, -1) @ u_weight.T).reshape(n, steps, -1)
    h = x.new_zeros((n, hidden))
    c = torch.zeros_like(h)
    for t in range(steps):
        zi, zf, zg, zo = (u[:, t] + h @ w_weight.T).chunk(4, dim=1)
        zf = zf + forget_bias
        c = torch.sigmoid(zf) * c + torch.sigmoid(zi) * torch.tanh(zg)
        h = torch.sigmoid(zo) * torch.tanh(c)
    return h


def random_weights(layer, exps, seed):
    g = torch.Generator().manual_seed(seed)
    for module, e in zip(layer, exps):
        module.weight.copy_(torch.randint(-127, 128, module.weight.shape, generator=g).to(torch.int8))
        module.weight_exp.fill_(e)


def cosine(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("steps, forget_bias", [(1, 0.0), (3, 0.0), (12, 0.0), (12, 1.0), (12, -2.5)])
def test_forward_and_backward_through_time_against_float64(steps, forget_bias):
    torch.manual_seed(0)
    n, frame, hidden = 6, 8, 5
    backend = get_backend("reference", "cpu")
    lstm = IntLSTM(IntLinear(frame, 4 * hidden, backend), hidden, backend, forget_bias=forget_bias)
    random_weights([lstm.input_map, lstm.recurrent], [-8, -8], 1)
    g = torch.Generator().manual_seed(2)
    x = QTensor.of(torch.randint(-127, 128, (n, steps, frame), generator=g).to(torch.int8), -7)
    h = lstm(x)
    d = QTensor.of(torch.randint(-127, 128, (n, hidden), generator=g).to(torch.int8), -9)
    dx = lstm.backward(d, None, need_input_grad=True)

    xf = x.to_float().double().requires_grad_()
    u = lstm.input_map.weight_q.to_float().double().requires_grad_()
    w = lstm.recurrent.weight_q.to_float().double().requires_grad_()
    hf = float64_lstm(xf, u, w, hidden, forget_bias)
    # forward: the int8 hidden state is the float one rounded to 2**-7, up to the tables' and
    # the Q11 roundings
    assert (h.to_float().double() - hf).abs().max() < 3 * 2**-7
    (hf * d.to_float().double()).sum().backward()
    for got, want in ((lstm.input_map.weight_grad.double() * 2.0 ** float(lstm.input_map.weight_grad_exp), u.grad),
                      (lstm.recurrent.weight_grad.double() * 2.0 ** float(lstm.recurrent.weight_grad_exp), w.grad),
                      (dx.to_float().double(), xf.grad)):
        if not want.any():  # one step: h_0 = 0, so the recurrent weight has no gradient
            assert not got.any()
            continue
        assert cosine(got, want) > 0.99, cosine(got, want)
        assert (got - want).abs().max() <= 0.05 * want.abs().max()


def test_forget_bias_is_a_fixed_offset_of_the_forget_gate_alone():
    """The offset moves the forget gate by exactly round(b 2**11) Q11 units, leaves the other gates
    bit-identical, and saturates like any pre-activation (an offset of 8 on inputs already at +16)."""
    n, frame, hidden, steps = 3, 6, 4, 5
    backend = get_backend("reference", "cpu")
    g = torch.Generator().manual_seed(5)
    x = QTensor.of(torch.randint(-127, 128, (n, steps, frame), generator=g).to(torch.int8), -7)
    gates = {}
    for bias in (0.0, 1.0, 8.0):
        lstm = IntLSTM(IntLinear(frame, 4 * hidden, backend), hidden, backend, forget_bias=bias)
        random_weights([lstm.input_map, lstm.recurrent], [-6, -8], 3)
        lstm.train()
        lstm(x)
        gates[bias] = lstm._saved[0]  # step 0: h = 0, c = 0, so only the input map reaches the gates
    i0, f0, g0, o0 = gates[0.0][:4]
    i1, f1, g1, o1 = gates[1.0][:4]
    assert torch.equal(i0, i1) and torch.equal(g0, g1) and torch.equal(o0, o1)
    sigmoid, _ = gate_tables()
    u = lstm.input_map(QTensor(x.v.reshape(n * steps, frame), x.e))  # as the LSTM runs it: all frames at once
    zf = to_fixed(u.v, u.e, GATE_EXPONENT, WIDE_LIMIT).reshape(n, steps, 4 * hidden)[:, 0, hidden:2 * hidden]
    for bias, saved in gates.items():
        want = sigmoid[((zf + round(bias * 2048)).clamp(-32767, 32767) + 32767).long()]
        assert torch.equal(saved[1].to(torch.int16), want)
    assert (gates[1.0][1] >= gates[0.0][1]).all() and (gates[1.0][1] > gates[0.0][1]).any()


@pytest.mark.parametrize("kernel", [True, False])
def test_the_input_maps_term_saturates_only_in_the_sum(kernel, monkeypatch):
    """``U x`` past +-16 is added to ``W h`` unsaturated, and only the sum saturates (module
    docstring). Every ``U x`` is about +19.75 and, at step 1, every ``W h`` about -15.06, so with a
    forget offset of -8 the forget gate reads sigmoid(-3.3); saturating ``U x`` at 16 first would
    give sigmoid(-7.1). The C kernel and the PyTorch code alike."""
    from intrain.numeric import native
    if not kernel:
        monkeypatch.setattr(native, "lstm_step_forward", lambda *args: None)
    elif native.library() is None:
        pytest.skip("no C compiler here: the PyTorch case covers the same step")
    n, frame, hidden, steps = 2, 1, 3, 2
    backend = get_backend("reference", "cpu")
    lstm = IntLSTM(IntLinear(frame, 4 * hidden, backend), hidden, backend, forget_bias=-8.0)
    lstm.input_map.weight.fill_(127)
    lstm.input_map.weight_exp.fill_(0)
    lstm.recurrent.weight.fill_(-106)
    lstm.recurrent.weight_exp.fill_(-4)
    x = QTensor.of(torch.full((n, steps, frame), 80, dtype=torch.int8), -9)
    lstm.train()
    lstm(x)
    sigmoid, _ = gate_tables()
    u = lstm.input_map(QTensor(x.v.reshape(n * steps, frame), x.e))
    u_q11 = int(to_fixed(u.v, u.e, GATE_EXPONENT, WIDE_LIMIT).max())
    assert u_q11 > 32767  # past +-16
    h1 = lstm._saved[1][-1]  # the hidden state step 1 starts from
    w_h = int(h1[0].to(torch.int64).sum()) * -106  # Q11 exactly: exponents -7 and -4
    assert -32767 < w_h < -15 * 2048
    z_f = u_q11 + w_h - 8 * 2048
    assert -8 * 2048 < z_f < -2 * 2048
    f = lstm._saved[1][1]
    assert torch.equal(f.to(torch.int64), sigmoid[z_f + 32767].to(torch.int64).expand_as(f))
    assert sigmoid[z_f + 32767] != sigmoid[32767 + w_h - 8 * 2048 + 32767]  # what saturating U x first gives


def test_long_sequences_saturate_instead_of_overflowing():
    """200 steps with large weights: the cell state saturates at +-16 (Q11 int16) and the hidden
    state stays in int8."""
    n, frame, hidden, steps = 4, 6, 3, 200
    backend = get_backend("reference", "cpu")
    lstm = IntLSTM(IntLinear(frame, 4 * hidden, backend), hidden, backend)
    lstm.input_map.weight.fill_(127)
    lstm.input_map.weight_exp.fill_(-4)
    lstm.recurrent.weight.fill_(10)
    lstm.recurrent.weight_exp.fill_(-8)
    x = QTensor.of(torch.full((n, steps, frame), 100, dtype=torch.int8), -7)
    h = lstm(x)
    assert h.v.dtype == torch.int8 and int(h.v.max()) == 127
    c_last = lstm._saved[-1][5]
    assert int(c_last.max()) == 2**15 - 1


def test_errors_do_not_vanish_over_200_steps_when_the_forget_gate_is_open():
    """With the forget gate at exactly 1 and g = 0 the cell state carries the error unchanged:
    the error reaching the inputs of step 0 equals that of step 199, bit for bit."""
    n, frame, hidden, steps = 4, 6, 3, 200
    backend = get_backend("reference", "cpu")
    lstm = IntLSTM(IntLinear(frame, 4 * hidden, backend), hidden, backend)
    signs = torch.tensor([1, -1] * (frame // 2), dtype=torch.int8)
    weight = torch.full((4 * hidden, frame), 3, dtype=torch.int8)  # i, g, o: pre-activation 0
    weight[hidden:2 * hidden] = 127 * signs  # forget gate: pre-activation above 16, sigmoid 1 in Q14
    lstm.input_map.weight.copy_(weight)
    lstm.input_map.weight_exp.fill_(-5)
    lstm.recurrent.weight.zero_()
    x = QTensor.of((100 * signs).expand(n, steps, frame).contiguous(), -7)  # g = tanh(0): c stays 0
    lstm(x)
    dx = lstm.backward(QTensor.of(torch.full((n, hidden), 64, dtype=torch.int8), -7), None)
    assert int(dx.v[:, 0].abs().max()) > 0
    assert torch.equal(dx.v[:, 0], dx.v[:, -1])


def test_tensor_ring_input_map_trains_through_the_lstm():
    backend = get_backend("reference", "cpu")
    shape = TensorRingShape((2, 4), (4, 2, 2), 3)
    lstm = IntLSTM(IntTensorRing(shape, backend), 4, backend)
    g = torch.Generator().manual_seed(0)
    for core in lstm.input_map.cores:
        core.weight.copy_(torch.randint(-127, 128, core.weight.shape, generator=g).to(torch.int8))
        core.weight_exp.fill_(-7)
    x = QTensor.of(torch.randint(-127, 128, (3, 5, 8), generator=g).to(torch.int8), -7)
    lstm(x)
    assert lstm.backward(QTensor.of(torch.ones((3, 4), dtype=torch.int8), 0), None, need_input_grad=False) is None
    assert all(core.weight_grad is not None and core.weight_grad.abs().sum() > 0 for core in lstm.input_map.cores)


def test_align_steps_keeps_eight_more_bits_below_the_largest_step():
    from intrain.layers.recurrent import align_steps

    v = torch.tensor([127, -127, 1, -1, 64, 0], dtype=torch.int8)
    parts = [QTensor.of(v, e) for e in (-3, -11, -15, -18, -43)]
    out = align_steps(parts)
    assert all(p.v.dtype == torch.int16 and int(p.e) == -11 for p in out)
    assert out[0].v.tolist() == [127 * 256, -127 * 256, 256, -256, 64 * 256, 0]  # the largest, exact
    assert torch.equal(out[1].v, v.to(torch.int16))  # 8 bits below: all 7 bits kept
    assert out[2].v.tolist() == [8, -8, 0, 0, 4, 0]  # 12 bits below: 127 / 16 = 7.94, 1 / 16 and 64 / 16 exact
    assert out[3].v.tolist() == [1, -1, 0, 0, 1, 0]  # 15 bits below: 127 / 128 and the tie 64 / 128 round to 1
    assert not out[4].v.any()  # 40 bits below: nothing left


def test_small_errors_of_early_steps_reach_the_input_weights():
    """Two steps; frame feature 0 (step 1 only) closes the forget gate of step 1 (f about 2**-11.5),
    so the errors of step 0 are about 2**-12 of step 1's. Feature 1 (step 0 only) gets its gradient
    from step 0 alone: with all steps at one int8 exponent it was 0; now it follows float64."""
    n, frame, hidden = 4, 2, 1
    backend = get_backend("reference", "cpu")
    lstm = IntLSTM(IntLinear(frame, 4 * hidden, backend), hidden, backend)
    # rows: gates i, f, g, o; columns: features 0, 1 (exponent -3: pre-activations -78 / 10 x 0.098
    # for a feature of 100 x 2**-7: f of step 1 is sigmoid(-7.6), i and g of step 0 unsaturated)
    weight = torch.tensor([[0, 10], [-78, 0], [0, 10], [0, 10]], dtype=torch.int8)
    lstm.input_map.weight.copy_(weight)
    lstm.input_map.weight_exp.fill_(-3)
    lstm.recurrent.weight.zero_()
    x = torch.zeros((n, 2, frame), dtype=torch.int8)
    x[:, 0, 1] = torch.tensor([100, 90, 80, 70], dtype=torch.int8)
    x[:, 1, 0] = 100
    x = QTensor.of(x, -7)
    lstm(x)
    lstm.backward(QTensor.of(torch.full((n, hidden), 100, dtype=torch.int8), -7), None, need_input_grad=False)
    got = lstm.input_map.weight_grad.double() * 2.0 ** float(lstm.input_map.weight_grad_exp)

    xf = x.to_float().double()
    u = lstm.input_map.weight_q.to_float().double().requires_grad_()
    w = lstm.recurrent.weight_q.to_float().double()
    (float64_lstm(xf, u, w, hidden) * (100 * 2.0**-7)).sum().backward()
    early, late = u.grad[:, 1], u.grad[:, 0]
    assert 2**-14 < early.abs().max() / late.abs().max() < 2**-9  # the scenario holds
    assert got[:, 1].abs().max() > 0
    assert cosine(got[:, 1], early) > 0.99
    assert (got[:, 1] - early).abs().max() <= 0.05 * early.abs().max()


def _lstm_over(ring: bool, backend, forget_bias: float = 0) -> tuple[IntLSTM, list]:
    """An LSTM of 8 units over 16 inputs, its input map a tensor ring (4x4 in, 4x4x2 out, rank 3)
    or dense, built with torch seeded 0; and the input map's weighted layers."""
    torch.manual_seed(0)
    if ring:
        input_map = IntTensorRing(TensorRingShape((4, 4), (4, 4, 2), 3), backend)
        maps = list(input_map.cores)
    else:
        input_map = IntLinear(16, 32, backend)
        maps = [input_map]
    return IntLSTM(input_map, 8, backend, forget_bias=forget_bias), maps


@pytest.mark.parametrize("ring", [False, True])
def test_backward_through_time_same_bits_on_every_cpu_path(ring):
    """The weight gradients take int16 gate errors: every backend and CPU path gives the same bits."""
    from intrain.kernels import CpuSettings

    results = []
    for backend in (get_backend("reference", "cpu"), get_backend("cpu", "cpu", CpuSettings(use_int8_gemm=True)),
                    get_backend("cpu", "cpu", CpuSettings(use_int8_gemm=False))):
        lstm, maps = _lstm_over(ring, backend)
        random_weights(maps + [lstm.recurrent], [-6] * len(maps) + [-8], 3)
        g = torch.Generator().manual_seed(4)
        x = QTensor.of(torch.randint(-128, 128, (40, 12, 16), generator=g).to(torch.int8), -7)
        lstm(x)
        dx = lstm.backward(QTensor.of(torch.randint(-128, 128, (40, 8), generator=g).to(torch.int8), -6), None)
        results.append([dx.v, dx.e, lstm.recurrent.weight_grad, lstm.recurrent.weight_grad_exp]
                       + [t for m in maps for t in (m.weight_grad, m.weight_grad_exp)])
    for other in results[1:]:
        assert all(torch.equal(a.to(torch.int64), b.to(torch.int64)) for a, b in zip(results[0], other))


def _step_both_ways(lstm, u, recurrent, c):
    from unittest import mock

    from intrain.numeric import native

    fused = lstm._step(u, recurrent, c)
    with mock.patch.object(native, "lstm_step_forward", lambda *args: None):
        reference = lstm._step(u, recurrent, c)
    return fused, reference


@pytest.mark.parametrize("rec_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("forget_offset", [0, 2048, -5120, 40000])
def test_the_lstm_step_kernel_has_the_reference_bits(rec_dtype, forget_offset):
    """``native.lstm_step_forward`` against the PyTorch step, bit for bit: input-map values of every
    size up to +-WIDE_LIMIT (unsaturated before the sum), cell states at +-32767, recurrent products
    at their type's extremes (int32 +-(2**31 - 1), int64 +-(2**62 - 1)), and the recurrent product's
    shift to Q11 from far right (-45) to far left (64), on a step whose rows are strided (one time
    step of [N, T, 4H])."""
    from intrain.numeric import native

    if not native.available():
        pytest.skip("numeric/native.c not built here")
    hidden, rows = 8, 37
    g = torch.Generator().manual_seed(forget_offset & 0xFFFF)
    lstm = IntLSTM(IntLinear(16, 4 * hidden, get_backend("reference", "cpu")), hidden, get_backend("reference", "cpu"))
    lstm.forget_offset = forget_offset
    top = 2**31 - 1 if rec_dtype == torch.int32 else 2**62 - 1
    clip = torch.tensor([-WIDE_LIMIT, WIDE_LIMIT, -32767, 32767, 0, 1, -1], dtype=torch.int64)
    for shift in (-45, -40, -33, -31, -20, -8, -3, -1, 0, 1, 3, 15, 16, 17, 40, 41, 64):
        lstm.recurrent.weight_exp.fill_(shift - 4)  # HIDDEN_EXPONENT + weight_exp - GATE_EXPONENT = shift
        frames = torch.randint(-32767, 32768, (rows, 3, 4 * hidden), generator=g, dtype=torch.int64)
        frames = (frames << torch.randint(0, 26, frames.shape, generator=g)).clamp(-WIDE_LIMIT, WIDE_LIMIT)
        frames[0, 1, :7] = clip  # the step taken below is frames[:, 1]
        scale = torch.randint(0, 63, (rows, 4 * hidden), generator=g)  # magnitudes of every size up to top
        recurrent = (torch.randint(-2**62, 2**62, (rows, 4 * hidden), generator=g, dtype=torch.int64) >> scale)
        recurrent = recurrent.clamp(-top, top).to(rec_dtype)
        recurrent.view(-1)[:4] = torch.tensor([top, -top, 1, -1], dtype=rec_dtype)
        c = torch.randint(-32767, 32768, (rows, hidden), generator=g, dtype=torch.int64)
        c.view(-1)[:2] = torch.tensor([32767, -32767])
        fused, reference = _step_both_ways(lstm, frames[:, 1], recurrent, c)
        assert fused[0].dtype == torch.int16 and fused[-1].dtype == reference[-1].dtype == torch.int8
        for got, expected in zip(fused, reference):
            assert torch.equal(got.to(torch.int64), expected.to(torch.int64)), shift
        assert int(fused[-1].abs().max()) == 127 or shift < 0  # saturated gates reach the clip


def _step_back_both_ways(dh, dc, step):
    from unittest import mock

    from intrain.numeric import native

    fused = IntLSTM._step_back(dh, dc, step)
    with mock.patch.object(native, "lstm_step_backward", lambda *args: None):
        reference = IntLSTM._step_back(dh, dc, step)
    return fused, reference


@pytest.mark.parametrize("case", ["random", "full-scale", "zero dc", "zero dh", "zero dc above", "zero dh above",
                                  "far apart", "strided gates"])
def test_the_lstm_step_back_kernel_has_the_reference_bits(case):
    """``native.lstm_step_backward`` against the PyTorch step back, bit for bit: errors at +-32767,
    gate values at 0 and 2**14, tanh(c) at +-2**14, cell states at +-32767, an all-zero dc or dh
    (add_aligned's zero operand, whose exponent is ignored even far above the other's), exponents more than 45 bits apart (ADD_MAX_GAP) and gate values
    read as views of one [N, 4H] tensor, as the forward kernel stores them."""
    from intrain.numeric import native

    if not native.available():
        pytest.skip("numeric/native.c not built here")
    rows, hidden = 33, 8
    g = torch.Generator().manual_seed(len(case))
    for trial in range(20):
        def draw(low, high, shape=(rows, hidden)):
            return torch.randint(low, high + 1, shape, generator=g, dtype=torch.int16)

        gates = draw(0, 2**14, (rows, 4 * hidden))
        gates[:, 2 * hidden:3 * hidden] = draw(-2**14, 2**14)  # g = tanh
        tanh_c, c_prev = draw(-2**14, 2**14), draw(-32767, 32767)
        dh, dc = draw(-32767, 32767), draw(-32767, 32767)
        dh_e, dc_e = int(torch.randint(-40, 10, (), generator=g)), int(torch.randint(-40, 10, (), generator=g))
        if case == "full-scale":
            dh.fill_(32767 if trial % 2 else -32767)
            dc.fill_(-32767)
            gates.view(-1)[::3] = 2**14
            gates.view(-1)[1::3] = 0
            tanh_c.fill_(0)
        elif case == "zero dc":
            dc.zero_()
        elif case == "zero dh":
            dh.zero_()
        elif case == "zero dc above":  # a zero operand's exponent, far above the other's, means nothing
            dc.zero_()
            dc_e = dh_e + 100
        elif case == "zero dh above":
            dh.zero_()
            dh_e = dc_e + 100
        elif case == "far apart":
            dc_e = dh_e - 60 + trial * 6
        elif case == "random":  # magnitudes of every size
            dh >>= int(torch.randint(0, 15, (), generator=g))
            dc >>= int(torch.randint(0, 15, (), generator=g))
        if case == "strided gates":
            step = (*gates.split(hidden, dim=1), tanh_c, c_prev, None)
        else:
            step = (*(part.contiguous() for part in gates.split(hidden, dim=1)), tanh_c, c_prev, None)
        fused, reference = _step_back_both_ways(QTensor.of(dh, dh_e), QTensor.of(dc, dc_e), step)
        for got, expected in zip(fused, reference):
            assert got.v.dtype == expected.v.dtype and torch.equal(got.v, expected.v), (case, trial)
            assert int(got.e) == int(expected.e), (case, trial)


@pytest.mark.parametrize("ring", [False, True])
def test_lstm_training_step_same_bits_with_and_without_the_c_kernels(ring):
    """A whole forward and backward through 12 steps (forget offset on): gradients, input errors
    and outputs the same with the step kernels as with the PyTorch code."""
    from unittest import mock

    from intrain.numeric import native

    if not native.available():
        pytest.skip("numeric/native.c not built here")
    results = []
    for kernels in (True, False):
        backend = get_backend("cpu", "cpu")
        lstm, maps = _lstm_over(ring, backend, forget_bias=1.0)
        random_weights(maps + [lstm.recurrent], [-4] * len(maps) + [-6], 3)
        gen = torch.Generator().manual_seed(4)
        x = QTensor.of(torch.randint(-128, 128, (40, 12, 16), generator=gen).to(torch.int8), -5)
        d = QTensor.of(torch.randint(-128, 128, (40, 8), generator=gen).to(torch.int8), -6)
        off = lambda *args: None  # noqa: E731
        with mock.patch.object(native, "lstm_step_forward", native.lstm_step_forward if kernels else off), \
                mock.patch.object(native, "lstm_step_backward", native.lstm_step_backward if kernels else off):
            h = lstm(x)
            dx = lstm.backward(d, None)
        results.append([h.v, h.e, dx.v, dx.e, lstm.recurrent.weight_grad, lstm.recurrent.weight_grad_exp]
                       + [t for m in maps for t in (m.weight_grad, m.weight_grad_exp)])
    assert int(results[0][0].abs().max()) > 0 and int(results[0][2].abs().max()) > 0
    for a, b in zip(*results):
        assert a.dtype == b.dtype and torch.equal(a, b)
