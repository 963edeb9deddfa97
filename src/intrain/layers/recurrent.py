"""Integer LSTM (and its float32 twin) over clips ``[N, T, ...]``; returns the last hidden state.

Per step ``t`` (gates in the order i, f, g, o; no learnt biases, as in NITI's layers):

    z_t = U x_t + W h_{t-1} + b_f    i, f, o = sigmoid(z_i, z_f, z_o)   g = tanh(z_g)
    c_t = f c_{t-1} + i g            h_t = o tanh(c_t)

``b_f`` (``forget_bias``) is added to the forget gate's pre-activation only: in the integer LSTM a
fixed offset (Q11, ``round(b_f 2**11)``, exact for multiples of 2**-11), in the float twin the
initial value of that gate's learnt bias (its other biases start at PyTorch's default). The
backward pass takes the gate derivatives from stored outputs, so the offset needs nothing there.

``U x_t`` (the input-to-hidden map: dense ``IntLinear`` or ``IntTensorRing``, 4H outputs with the
gates as one output factor) runs once for all ``N T`` frames; ``W h`` is an ``IntLinear`` weight
used step by step.

Formats and ranges (the integer version):

- ``x_t``: int8 with any exponent; ``h_t``: int8 with the fixed exponent ``-7`` (``|h| < 1``, so
  the fixed exponent loses no range), ``h = round(o tanh(c) / 2**21)`` clipped to [-127, 127].
- gate pre-activations ``z``: int16 fixed point ``Q11`` (exponent ``-11``, range +-16). ``U x`` and
  ``W h`` are each rounded to Q11 (nearest) and added in int64; the sum's values past +-16 saturate
  at +-32767: there sigmoid and tanh are within 2**-14 of their limits, which is what the tables
  give anyway. ``U x`` is not saturated before the sum (only at +-2**40, ``WIDE_LIMIT``): clipped
  there to +-16 while ``W h`` pulled the sum back into the gates' range, the forward used 16 but
  the backward sent the gate's error on to ``U x`` as if unclipped, a gradient for a value that no
  longer moved the output; the input map's outputs then ran away, and the int8 rank-16 TR-LSTM
  collapsed (BENCHMARKS.md, 2026-12-05: the collapse came and went with that clip in the float
  twin). ``W h`` (``|h| < 1``) is still saturated at +-16 before the sum (``native.lstm_step_forward``
  does the same), a bound its weights have not reached in the runs measured.
- gate values: sigmoid and tanh in Q14 (int16, ``[0, 2**14]`` and ``[-2**14, 2**14]``), read from
  65,535-entry integer tables indexed by the Q11 value (``gate_tables``: built with Python
  integers only, exp by a Taylor series in 2**-62 fixed point; every entry is within one unit of
  the float function, ``tests/test_recurrent.py``).
- cell state ``c``: int16 Q11 (exponent ``-11``, range +-16): ``f c`` (Q25, < 2**29) plus ``i g``
  (Q28 rounded to Q25), rounded to Q11. Since ``|c_t| <= |c_{t-1}| + 1``, ``|c_t| <= t``: no clip
  for sequences of up to 15 steps; past that ``c`` saturates at +-16, where ``tanh(c)`` is 1 in
  Q14, so ``h`` is unchanged and only the (then negligible) memory beyond +-16 is lost.

Backward through time (integer): errors are QTensors with floating exponents, so a shrinking
error keeps its 15 or 7 significant bits with a falling exponent instead of underflowing to zero,
and a growing one raises its exponent instead of overflowing. Per step, from the stored
``i, f, g, o, tanh(c_t), c_{t-1}, h_{t-1}``: ``dc = dh o (1 - tanh^2 c) + dc_{next}``,
``di = dc g``, ``df = dc c_{t-1}``, ``dg = dc i``, ``do = dh tanh c``, ``dc_prev = dc f``;
``dz = d. s (1 - s)`` or ``d. (1 - g^2)``, the derivatives from the stored outputs as exact int64
products (every product below 2**60); the recurrent errors ``dh`` and ``dc`` are rounded to int16,
the four gate errors to int8 at one shared exponent (``dz_t``) for the products
``dh_{t-1} = dz_t W``. For the weight gradients ``dW = sum_t dz_t^T h_{t-1}`` and the input map's,
one exact product over batch x time each, the gate errors of all steps are brought to one
exponent ``WIDE_GATE_ERROR_BITS - 8`` bits below the largest step's, as int16 (``align_steps``):
a step whose errors are up to 2**8 smaller than the largest step's keeps all 7 significant bits,
up to 2**15 smaller some of them (nearest rounding), and only smaller ones round to zero. Errors
shrink along the sequence (by the forget gate at every step back), and at int8 (one exponent for
all steps, as before) every step more than 2**8 below the last was lost: the int8 TR-LSTM then
never learnt the direction of rotations and zooms, which needs the earlier frames (BENCHMARKS.md,
2026-12-03). The products take int16 errors with int8 (``h``) or int8-core operands; their
int32/int64 results are exact on every backend.

Speed: a step of the LSTM is many small elementwise operations on ``[N, H]`` tensors, forward and
more back, each costing more in fixed overhead than in arithmetic; on CPU tensors each step's elementwise work (after the recurrent
product) is one C call instead (``numeric.native.lstm_step_forward`` and ``lstm_step_backward``,
the same bits as the PyTorch code here, which stays the reference and the path on other devices;
``python benchmarks/native_speed.py --model tr-lstm``).
"""

from __future__ import annotations

import torch

from intrain.layers.base import IntModule, StepContext
from intrain.layers.linear import IntLinear
from intrain.numeric import native
from intrain.numeric.formats import NITI_INT8, NumberFormat
from intrain.numeric.qtensor import QTensor
from intrain.numeric.requant import add_aligned, requantize
from intrain.numeric.rounding import shift_round

GATE_EXPONENT = -11          # pre-activations and cell state: Q11 in int16
CELL_EXPONENT = -11
ONE_BITS = 14                # gate values: Q14
HIDDEN_EXPONENT = -7         # int8 hidden state
INT16_LIMIT = 2**15 - 1
_EXP_BITS = 62               # fixed point of the table builder


def _exp_table(count: int) -> list[int]:
    """``round(2**62 * exp(-k / 2**11))`` for ``k < count`` (Python ints): ``exp(-2**-11)`` by its
    Taylor series (terms below 2**-62 dropped), then powers by repeated rounded multiplication
    (error below ``count`` units of 2**-62)."""
    one = 1 << _EXP_BITS
    base, term, n = 0, one, 0
    while term:
        base += term if n % 2 == 0 else -term
        n += 1
        term = term // (n << -GATE_EXPONENT)
    table = [one]
    for _ in range(count - 1):
        table.append((table[-1] * base + (one >> 1)) >> _EXP_BITS)
    return table


def _round_div(a: int, b: int) -> int:
    return (2 * a + b) // (2 * b)


def gate_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """sigmoid and tanh of every Q11 value ``v`` in [-32767, 32767], in Q14 (int16 tables of
    65,535 entries, entry ``v + 32767``), built with integer arithmetic only:
    ``sigmoid(x) = 1 / (1 + e^-x)``, ``tanh(x) = (1 - e^-2x) / (1 + e^-2x)`` for ``x >= 0``, rounded
    to nearest, and by symmetry (``1 - sigmoid(-x)``, ``-tanh(-x)``) below 0."""
    exp = _exp_table(2 * INT16_LIMIT + 1)
    one, out = 1 << _EXP_BITS, 1 << ONE_BITS
    sig = [_round_div(out * one, one + exp[v]) for v in range(INT16_LIMIT + 1)]
    tanh = [_round_div(out * (one - exp[2 * v]), one + exp[2 * v]) for v in range(INT16_LIMIT + 1)]
    sigmoid = torch.tensor([out - s for s in reversed(sig[1:])] + sig, dtype=torch.int16)
    tanh_t = torch.tensor([-t for t in reversed(tanh[1:])] + tanh, dtype=torch.int16)
    return sigmoid, tanh_t


#: Saturation of the input map's pre-activations before the recurrent term is added (far past
#: the tables' +-16, so the sum saturates there: module docstring).
WIDE_LIMIT = 1 << 40


def to_fixed(v: torch.Tensor, e: torch.Tensor, target: int, limit: int = INT16_LIMIT) -> torch.Tensor:
    """``v * 2**e`` in units of ``2**target`` (int64), nearest rounding, saturated to ``+-limit``
    (int16's symmetric range unless told otherwise; at most ``WIDE_LIMIT``). A left shift is
    applied to values already clipped to 2**16, which it can only push further out: the
    saturation is exact for values of 16 bits (int8 and int16 operands); a shift past 40 is 40,
    which already pushes every non-zero value past any limit, where 2**16 shifted by 47 or more
    would leave int64."""
    shift = e - target
    wide = v.to(torch.int64)
    if int(shift) >= 0:
        out = wide.clamp(-(1 << 16), 1 << 16) << shift.clamp(max=40)
    else:
        out = shift_round(wide, -shift, "nearest")
    return out.clamp(-limit, limit)


#: Bits of the gate errors of all steps at one exponent, for the weight gradients.
WIDE_GATE_ERROR_BITS = 16


def align_steps(parts: list[QTensor], bits: int = WIDE_GATE_ERROR_BITS) -> list[QTensor]:
    """int8 QTensors ``parts`` (the gate errors of each step) at one exponent ``bits - 8`` below
    the largest of theirs, as int16: a part at the largest exponent is shifted left by that
    (exact, ``|v| <= 127 * 2**(bits - 8) < 2**(bits - 1)``), finer ones less or, when more than
    that below, right with nearest rounding (``|v| <= 127`` stays in range)."""
    top = torch.stack([p.e for p in parts]).max()
    base = top - (bits - 8)
    out = []
    for p in parts:
        shift = p.e - base
        wide = p.v.to(torch.int64)
        if int(shift) >= 0:
            v = wide << shift
        else:  # a gap of 40 bits already rounds any int8 value to zero; the cap keeps 2**shift in int64
            v = shift_round(wide, (-shift).clamp(max=40), "nearest")
        out.append(QTensor(v.to(torch.int16), base))
    return out


def _align(parts: list[QTensor], bits: int = 8) -> list[QTensor]:
    """The QTensors ``parts`` at the largest of their exponents (nearest rounding) and rounded to
    ``bits`` bits together: one exponent for all."""
    top = torch.stack([p.e for p in parts]).max()
    # a gap of 40 bits already rounds any int16 value to zero; the cap keeps 2**shift in int64
    shifted = [shift_round(p.v.to(torch.int64), (top - p.e).clamp(max=40), "nearest") for p in parts]
    sizes = [s.shape for s in shifted]
    joined = requantize(torch.cat([s.reshape(-1) for s in shifted]), top, bits=bits)
    out, start = [], 0
    for size in sizes:
        n = size.numel()
        out.append(QTensor(joined.v[start:start + n].reshape(size), joined.e))
        start += n
    return out


class IntLSTM(IntModule):
    """Integer LSTM layer over ``[N, T, ...]`` inputs, returning ``h_T`` (see the module docstring)."""

    def __init__(self, input_map: IntModule, hidden_size: int, backend, fmt: NumberFormat = NITI_INT8,
                 forget_bias: float = 0) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.forget_bias = forget_bias
        self.forget_offset = round(forget_bias * 2**-GATE_EXPONENT)  # Q11, once at build time
        self.input_map = input_map
        self.recurrent = IntLinear(hidden_size, 4 * hidden_size, backend, fmt)
        self.backend = backend
        self.fmt = fmt
        sigmoid, tanh = gate_tables()
        self.register_buffer("sigmoid_table", sigmoid, persistent=False)
        self.register_buffer("tanh_table", tanh, persistent=False)
        self._saved: list | None = None
        self._input_shape: tuple = ()

    @property
    def has_weight(self) -> bool:
        return True

    def _lookup(self, table: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return table[(v + INT16_LIMIT).to(torch.int64)].to(torch.int64)

    def _step(self, u: torch.Tensor, recurrent: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One step after the recurrent product: the gate values i, f, g, o and tanh(c') (Q14), the
        cell state c' (Q11, int64) and h' (int8), from the step's input-map pre-activations ``u``
        (Q11), the recurrent product and the cell state ``c``. One C pass where
        ``native.lstm_step_forward`` applies (the same bits, ``tests/test_recurrent.py``), else the
        PyTorch code below."""
        rec_exp = HIDDEN_EXPONENT + self.recurrent.weight_exp
        fused = native.lstm_step_forward(u, recurrent, int(rec_exp) - GATE_EXPONENT, self.forget_offset, c,
                                         self.sigmoid_table, self.tanh_table)
        if fused is not None:
            gates, tanh_c, c_next, h_next = fused
            return (*gates.split(self.hidden_size, dim=1), tanh_c, c_next, h_next)
        hidden = self.hidden_size
        z = u + to_fixed(recurrent, rec_exp, GATE_EXPONENT)
        if self.forget_offset:
            z[:, hidden:2 * hidden] += self.forget_offset  # z is this step's own sum: in place is safe
        z = z.clamp(-INT16_LIMIT, INT16_LIMIT)
        zi, zf, zg, zo = z.split(hidden, dim=1)
        i, f, o = (self._lookup(self.sigmoid_table, part) for part in (zi, zf, zo))
        g = self._lookup(self.tanh_table, zg)
        # f c: Q14 x Q11 = Q25; i g: Q28 -> Q25; the sum -> Q11
        c_next = shift_round(f * c + shift_round(i * g, 3, "nearest"), ONE_BITS, "nearest")
        c_next = c_next.clamp(-INT16_LIMIT, INT16_LIMIT)
        tanh_c = self._lookup(self.tanh_table, c_next)
        h_next = shift_round(o * tanh_c, 2 * ONE_BITS + HIDDEN_EXPONENT, "nearest").clamp(-127, 127)
        return i, f, g, o, tanh_c, c_next, h_next.to(torch.int8)

    def forward(self, x: QTensor, ctx: StepContext | None = None) -> QTensor:
        n, steps = x.v.shape[:2]
        hidden = self.hidden_size
        u = self.input_map(QTensor(x.v.reshape(n * steps, -1), x.e), ctx)
        u_fixed = to_fixed(u.v, u.e, GATE_EXPONENT, WIDE_LIMIT).reshape(n, steps, 4 * hidden)
        w = self.recurrent.weight
        h = torch.zeros((n, hidden), dtype=torch.int8, device=x.v.device)
        c = torch.zeros((n, hidden), dtype=torch.int64, device=x.v.device)
        saved = []
        for t in range(steps):
            recurrent = self.backend.linear_forward(h, w)
            i, f, g, o, tanh_c, c_next, h_next = self._step(u_fixed[:, t], recurrent, c)
            if self.training:
                saved.append(tuple(s.to(torch.int16) for s in (i, f, g, o, tanh_c, c)) + (h,))
            h, c = h_next, c_next
        if self.training:
            self._saved = saved
            self._input_shape = tuple(x.v.shape[2:])
        return QTensor.of(h, HIDDEN_EXPONENT)

    @staticmethod
    def _step_back(dh: QTensor, dc: QTensor, step: tuple) -> tuple[QTensor, QTensor]:
        """One step back before the recurrent product: the gate errors ``dz`` (int8, i, f, g, o side
        by side) and ``dc_prev`` (int16) from the errors ``dh`` and ``dc`` and the step's stored
        values (module docstring). One C call where ``native.lstm_step_backward`` applies (the same
        bits, ``tests/test_recurrent.py``), else the PyTorch code below."""
        i, f, g, o, tanh_c, c_prev, _ = step
        fused = native.lstm_step_backward(dh.v, int(dh.e), dc.v, int(dc.e), (i, f, g, o), tanh_c, c_prev)
        if fused is not None:
            dz, dz_e, dc_prev, dc_prev_e = fused
            return QTensor.of(dz, dz_e), QTensor.of(dc_prev, dc_prev_e)
        one = 1 << ONE_BITS
        i, f, g, o, tanh_c, c_prev = (t.to(torch.int64) for t in (i, f, g, o, tanh_c, c_prev))
        dh_v = dh.v.to(torch.int64)
        # dc = dh o (1 - tanh^2 c) + dc_next: exponent dh.e - 14 - 28; |.| < 2**15 2**14 2**28
        from_h = requantize(dh_v * o * ((one * one) - tanh_c * tanh_c), dh.e - 3 * ONE_BITS, bits=16)
        dc = add_aligned(from_h, dc, bits=16)
        dc_v = dc.v.to(torch.int64)
        sig_slope = [s * (one - s) for s in (i, f, o)]  # s (1 - s) in Q28
        dz_i = QTensor(dc_v * g * sig_slope[0], dc.e - 3 * ONE_BITS)
        dz_f = QTensor(dc_v * c_prev * sig_slope[1], dc.e + CELL_EXPONENT - 2 * ONE_BITS)
        dz_g = QTensor(dc_v * i * (one * one - g * g), dc.e - 3 * ONE_BITS)
        dz_o = QTensor(dh_v * tanh_c * sig_slope[2], dh.e - 3 * ONE_BITS)
        parts = _align([requantize(p.v, p.e, bits=16) for p in (dz_i, dz_f, dz_g, dz_o)])
        dz = QTensor(torch.cat([p.v for p in parts], dim=1), parts[0].e)
        return dz, requantize(dc_v * f, dc.e - ONE_BITS, bits=16)

    def backward(self, d: QTensor, ctx: StepContext | None, need_input_grad: bool = True) -> QTensor | None:
        saved, self._saved = self._saved, None
        if saved is None:
            raise RuntimeError("IntLSTM.backward called without a training-mode forward")
        dh = QTensor(d.v.to(torch.int16), d.e)
        dc = QTensor(torch.zeros_like(dh.v), d.e)
        gate_errors = []
        w = self.recurrent.weight
        for step in reversed(saved):
            dz, dc = self._step_back(dh, dc, step)
            gate_errors.append(dz)
            dh = requantize(self.backend.linear_backward_input(dz.v, w), dz.e + self.recurrent.weight_exp, bits=16)
        gate_errors.reverse()
        aligned = align_steps(gate_errors)
        dz_all = QTensor(torch.stack([a.v for a in aligned], dim=1), aligned[0].e)  # [N, T, 4H]
        n, steps = dz_all.v.shape[:2]
        h_prev = torch.stack([s[-1] for s in saved], dim=1).reshape(n * steps, -1)
        flat = dz_all.v.reshape(n * steps, -1)
        self.recurrent.weight_grad = self.backend.linear_backward_weight(flat, h_prev)
        self.recurrent.weight_grad_exp = dz_all.e + HIDDEN_EXPONENT
        dx = self.input_map.backward(QTensor(flat, dz_all.e), ctx, need_input_grad=need_input_grad)
        if dx is None:
            return None
        return QTensor(dx.v.reshape(n, steps, *self._input_shape), dx.e)

    def clear_saved(self) -> None:
        self._saved = None
        self.input_map.clear_saved()
        self.recurrent.clear_saved()

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, forget_bias={self.forget_bias:g}"


class FloatLSTM(torch.nn.Module):
    """The float32 twin: the same LSTM over ``[N, T, ...]`` returning ``h_T``, with the input map
    given (``torch.nn.Linear`` without bias or ``FloatTensorRing``), a recurrent ``Linear`` and
    one bias per gate unit (float twins keep their biases, ``models.build``); the forget gate's
    biases start at ``forget_bias``."""

    def __init__(self, input_map: torch.nn.Module, hidden_size: int, forget_bias: float = 0.0) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.forget_bias = float(forget_bias)
        self.input_map = input_map
        self.recurrent = torch.nn.Linear(hidden_size, 4 * hidden_size)
        self.reset_forget_bias()

    def reset_forget_bias(self) -> None:
        """Set the forget gate's biases to ``forget_bias`` (after any re-initialisation of the biases)."""
        with torch.no_grad():
            self.recurrent.bias[self.hidden_size:2 * self.hidden_size].fill_(self.forget_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, steps = x.shape[:2]
        u = self.input_map(x.reshape(n * steps, -1)).reshape(n, steps, -1)
        h = x.new_zeros((n, self.hidden_size))
        c = torch.zeros_like(h)
        for t in range(steps):
            zi, zf, zg, zo = (u[:, t] + self.recurrent(h)).chunk(4, dim=1)
            c = torch.sigmoid(zf) * c + torch.sigmoid(zi) * torch.tanh(zg)
            h = torch.sigmoid(zo) * torch.tanh(c)
        return h
