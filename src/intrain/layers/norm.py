"""Integer batch normalisation: what replaces BatchNorm in the integer models (spec ``bn``).

The choice, and why. A per-tensor exponent already keeps every tensor at full int8 resolution,
so what BatchNorm adds in an integer network is the *relative* scale: every channel centred and
brought to the same spread, and a residual branch's output at a known size next to its shortcut
(without it the int8 ResNet-18's logits start with a standard deviation of 6.95 and its float
twin without BatchNorm does not train, BENCHMARKS.md). So this layer normalises each channel by
its batch mean and standard deviation, computed exactly in integers, with no learnable scale or
bias (the next convolution's weights and the ReLU threshold at zero stand in for them; the float
twin keeps torch's BatchNorm2d with its affine, the standard recipe).

Forward, training, for an int8 input ``x`` (``[N, C, ...]``, exponent ``e``) and each channel:

- ``S1 = sum x``, ``S2 = sum x**2`` and the count ``M`` (positions per channel) in int64, summed
  over the processes by ``ctx.collective.sum`` (one call), so a data-parallel run sees the
  statistics of the whole global batch;
- ``V = M*S2 - S1**2 + M**2`` is ``M**2 * (variance + 1)`` in units of ``x``'s last bit, exact
  (``M*S2 - S1**2 >= 0`` by Cauchy-Schwarz); the ``+ M**2`` is BatchNorm's epsilon, one unit of
  the input squared, which bounds the output of a nearly constant channel; ``r = isqrt(V)``
  (integer Newton iteration, exact floor) is ``M * sigma``;
- in the frame of ``G = GUARD_BITS`` bits below ``x``'s unit: ``mean_G = round(S1 * 2**G / M)``,
  ``std_G = round(r * 2**G / M) >= 2**G``;
- ``y = (x * A + B) >> S`` in int32, clipped to ``[-limit, limit]``, with the per-channel
  ``A = round(2**(S + F + G) / std_G)`` and ``B = round(-mean_G * 2**(S + F) / std_G) + 2**(S-1)``
  (``S = SCALE_BITS``): ``(x - mean) / sigma`` rounded to nearest (ties upward) at the fixed
  exponent ``-F``. The output is in units of standard deviations, ``F = bits - 1 - RANGE_BITS``
  fraction bits (int8: ``F = 4``, range +-7.94 sigma, resolution sigma/16). A fixed exponent
  needs no batch maximum, and keeps one outlier from coarsening every other channel. Ranges
  (``sigma >= 1`` unit, ``|mean| <= 127`` units): ``|x * A| <= 127 * 2**22``,
  ``|B| <= 127 * 2**22 + 2**17``, so the sum stays below 2**30. ``A`` and ``B`` are within half a
  unit of their exact values, so ``y`` is within ``0.5 + 128 * 2**-18`` output units of the exact
  normalised value (before the clip). At evaluation ``|B|`` is clipped to 2**30, which changes
  nothing: beyond it the output saturates either way.

Backward goes *through* the batch statistics (the exact derivative of the normalisation, as
float BatchNorm's autograd does): ``dx = (1/sigma) * (dz - mean(dz) - y * mean(dz * y))`` for the
error ``dz`` at the output. The clip at +-8 sigma is passed straight through (its derivative
taken as one): by Chebyshev's inequality it touches at most 1/64 of a channel's values, and
masking them would cost a pass over the tensor for nothing measurable. Treating
the statistics as constants would drop the two mean terms; then a gradient step could move a
channel's mean or spread, which the next forward normalises away (the loss is invariant to
both), so the update would be spent on directions that do nothing. In integers, with ``h`` the
int8 output (``y ~ h * 2**-F``), ``D1 = sum dz`` and ``P = sum dz*x`` per channel (int64, through
``ctx.collective.sum``), the statistics' term is exact: ``sum(dz * y) * 2**F = W / r`` with
``W = (M*P - S1*D1) * 2**F``, ``|M*P - S1*D1| <= M**2 * 127 * 254 < 2**59`` (so ``W < 2**63``),
and ``D2 = round(W / r)``, ``|D2| <= 127 * M * 2**F < 2**33`` (``sum |y| <= M`` by Cauchy-Schwarz).
Then

``T = (M*dz - D1) * 2**(2F) - h*D2``, ``dx = T * 2**(e_d - 2F - e) / r``.

With ``R' = round(2**q / r)``, ``q = RECIPROCAL_BITS + bit_length(M)`` (``2**13 <= R' <= 2**21``
since ``M <= r <= 128 M``), ``T * R' = dz * a + h * b + c`` with the per-channel int64
coefficients ``a = M * 2**(2F) * R' < 2**51``, ``b = -D2 * R' < 2**54`` and
``c = -D1 * 2**(2F) * R' < 2**58``. They are the same on every process (made from global sums),
rounded (nearest) by one shift so that the largest has 22 bits; then
``127 |a| + 127 |b| + |c| < 2**30`` and the per-element sum is made in int32 and requantised to the
format (its error rounding; the shift from the maximum over all processes,
``ctx.collective.max``). ``a`` keeps at least 15 bits (``|b| / a <= 64``, ``|c| / a <= 127``).
The one approximation is ``h`` for ``y`` per element (half a unit, and at clipped positions);
using ``h`` in ``D2`` too (``sum dz*h``) is less exact: where the error has a large channel mean,
``y``'s rounding errors, the same for every equal input, add up (5 % of the gradient in a test),
while ``W`` is exact (in training the two did not differ beyond the spread between seeds).

Evaluation uses running statistics when the layer has seen a training batch (else the batch's
own): integer exponential moving averages of ``mean_G`` and ``std_G``,
``run <- run + round((batch - run) / 2**MOMENTUM_SHIFT)`` (momentum 1/8, BatchNorm's default
is 0.1), kept in the frame (exponent ``stats_exp``) of the latest training batch: the old
averages are shifted into the new frame first (exact left shift, or nearest right shift). They
are buffers, so checkpoints and ``model.pt`` keep them. Gathered in training they follow the
latest weights, not mean weights over many steps (``methods.averaging``), which is why ResNet-18's
recipe turned weight averaging off (``run.recipes``) before evaluation rebuilt them (below) from
the weights it evaluates; averaging has not been measured since. Batch statistics at evaluation would make each
prediction depend on the other images of its batch and on the batch size (BENCHMARKS.md). Longer
averages (momentum 1/32 to 1/128) measured no better than 1/8: the same mean accuracy and the same
spread between random batch orders (``python benchmarks/bn_statistics.py``).

Averages gathered while training lag behind the weights, and the int8 networks are sensitive to
that: a ResNet-18 checkpoint from the middle of a Fashion-MNIST run (epoch 9 of 15, rate still
high) classified 70.8 % of 5,000 of its training images right with the running statistics it had
gathered, 92.4 % with each batch's own, and 92.3 % with statistics rebuilt from its latest weights
over 32 batches. So the training loop evaluates and saves with rebuilt statistics
(``rebuild_running_statistics``: forward passes of ``REBUILD_BATCHES`` training batches with the
latest weights, the averages started afresh) and then puts the gathered ones back, so that
training, checkpoints and resuming never see the rebuilt ones. At
evaluation the averages are shifted into the frame of the batch's input and used as
above, with ``std_G`` floored at one unit of the input. The counts must satisfy
``M <= MAX_COUNT = 2**22`` (all int64 bounds above assume it; ImageNet's stem at batch 256 has
``256 * 112**2 < 2**22``).
"""

from __future__ import annotations

import torch

from intrain.layers.base import IntModule, StepContext
from intrain.numeric import rng
from intrain.numeric.collective import LOCAL, Collective
from intrain.numeric.formats import NITI_INT8, NumberFormat
from intrain.numeric.qtensor import QTensor
from intrain.numeric.requant import cpu_slices
from intrain.numeric.rounding import bit_length, divide_round, shift_round

#: Bits below the input's unit kept by the means and standard deviations.
GUARD_BITS = 16
#: Fraction bits of the forward's per-channel multiplier and offset below the output's unit.
SCALE_BITS = 18
#: The output covers +-2**RANGE_BITS standard deviations.
RANGE_BITS = 3
#: Running averages move by 2**-MOMENTUM_SHIFT of the difference each training batch; longer
#: averages measured no better: ``python benchmarks/bn_statistics.py --run DIR`` (BENCHMARKS.md).
MOMENTUM_SHIFT = 3
#: Training batches the running statistics are rebuilt from before an evaluation: four times the
#: averaging window (the first batch's weight is then below 2 %), as ``python
#: benchmarks/bn_statistics.py`` rebuilds them.
REBUILD_BATCHES = 4 << MOMENTUM_SHIFT
#: Largest count of positions per channel (batch x height x width, all processes) for which the
#: int64 bounds hold.
MAX_COUNT = 1 << 22
#: Largest count of positions per sample and channel (height x width): per-sample sums of
#: products of two int8 values (``<= 127**2 < 2**14`` each) are made in int32 first.
MAX_SAMPLE_POSITIONS = 1 << 17
#: Bits of the backward's reciprocal ``R' = round(2**(RECIPROCAL_BITS + bit_length(M)) / r)``.
RECIPROCAL_BITS = 20
#: Per-element sums of the backward stay below 2**ERROR_SUM_BITS (int32).
ERROR_SUM_BITS = 30
#: Largest shift applied to running statistics when the input's exponent moves (beyond it a
#: left shift could overflow; a right shift by more leaves zero anyway).
MAX_FRAME_SHIFT = 24


def isqrt(n: torch.Tensor) -> torch.Tensor:
    """``floor(sqrt(n))`` of non-negative int64 integers, elementwise, by Newton's iteration from
    above: starting at ``2**ceil(b/2) >= sqrt(n)`` (``b`` its bit length), ``x <- (x + n // x) // 2``
    decreases strictly until it reaches ``floor(sqrt(n))``, where the next value is not smaller."""
    x = torch.ones_like(n) << ((bit_length(n) + 1) >> 1)
    while True:
        y = (x + n // x.clamp(min=1)) >> 1
        if not bool((y < x).any()):
            return x
        x = torch.minimum(x, y)


def _global_shift(a: torch.Tensor, bits: int, collective: Collective) -> torch.Tensor:
    """The right shift that brings ``max |a|`` over all processes to at most ``bits - 1`` bits."""
    if a.numel() == 0:
        local = torch.zeros((), dtype=torch.int64, device=a.device)
    else:
        low, high = torch.aminmax(a)
        local = torch.maximum(high.to(torch.int64), -low.to(torch.int64))
    return (bit_length(collective.max(local)) - (bits - 1)).clamp(min=0)


def _to_frame(values: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``values * 2**shift`` (``shift`` a 0-d tensor, clamped to +-MAX_FRAME_SHIFT): an exact left
    shift, or a right shift with nearest rounding."""
    shift = shift.clamp(-MAX_FRAME_SHIFT, MAX_FRAME_SHIFT)
    return torch.where(shift >= 0, values << shift.clamp(min=0), shift_round(values, (-shift).clamp(min=0), "nearest"))


def _channel_sums(t: torch.Tensor) -> torch.Tensor:
    """Per-channel sums of an int32 ``[N, C, ...]`` tensor whose values have at most 14 bits, as
    int64: over each sample's positions in int32 (``< 2**14 * MAX_SAMPLE_POSITIONS = 2**31``),
    then over the samples in int64 (no int64 copy of the whole tensor)."""
    per_sample = t.flatten(2).sum(2, dtype=torch.int32) if t.dim() > 2 else t
    return per_sample.sum(0, dtype=torch.int64)


def _slices(t: torch.Tensor) -> list:
    """Row slices for element-wise passes: a few hundred thousand elements at a time on CPU, so
    that the int32 temporaries of this layer stay small (they set the peak memory of a ResNet-18
    step: ``python benchmarks/speed.py --model resnet18``); the whole tensor on other devices."""
    return cpu_slices(t) if t.device.type == "cpu" else [...]


def _channel_sums_and_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[_channel_sums(a), _channel_sums(a * b)]`` (int64, ``[2C]``) for int8 tensors of one shape,
    in one pass made slice by slice (no int32 copy or product of the whole tensors)."""
    channels = a.shape[1]
    total = torch.zeros(2 * channels, dtype=torch.int64, device=a.device)
    for rows in _slices(a):
        part = a[rows].to(torch.int32)
        total[:channels] += _channel_sums(part)
        total[channels:] += _channel_sums(part.mul_(b[rows]))
    return total


class IntBatchNorm(IntModule):
    """Per-channel integer normalisation of ``[N, C, ...]`` inputs (see the module docstring)."""

    def __init__(self, channels: int, fmt: NumberFormat = NITI_INT8, momentum_shift: int = MOMENTUM_SHIFT) -> None:
        super().__init__()
        if fmt.bits != 8:
            # 16-bit values (DFP16) overflow the int32 products of the forward (x * A reaches 2**45)
            # and the per-sample int32 sums; the int64 bounds of the statistics fail too.
            raise ValueError(f"IntBatchNorm's integer ranges are proven for 8-bit values, not {fmt.bits}-bit ones")
        self.channels = channels
        self.fmt = fmt
        self.momentum_shift = momentum_shift
        self.fraction_bits = fmt.bits - 1 - RANGE_BITS
        self.register_buffer("running_mean", torch.zeros(channels, dtype=torch.int64))
        self.register_buffer("running_std", torch.zeros(channels, dtype=torch.int64))
        self.register_buffer("stats_exp", torch.zeros((), dtype=torch.int64))
        self.register_buffer("batches_tracked", torch.zeros((), dtype=torch.int64))
        self._saved: tuple | None = None

    def _per_channel(self, t: torch.Tensor, dims: int) -> torch.Tensor:
        return t.view((1, -1) + (1,) * (dims - 2))

    def _check_shape(self, x: torch.Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise ValueError(f"IntBatchNorm({self.channels}) needs [N, {self.channels}, ...] inputs, "
                             f"got shape {tuple(x.shape)}")
        positions = 1  # from the shape, not x[0]: a data-parallel shard may hold no samples
        for size in x.shape[2:]:
            positions *= size
        if positions > MAX_SAMPLE_POSITIONS:
            raise ValueError(f"IntBatchNorm: more than {MAX_SAMPLE_POSITIONS} positions per sample and channel")

    def _normalise(self, x: QTensor, mean_g: torch.Tensor, std_g: torch.Tensor) -> QTensor:
        """``(x - mean) / std`` at the fixed output exponent, as ``(x * A + B) >> SCALE_BITS`` in
        int32 (see the module docstring)."""
        scale = SCALE_BITS + self.fraction_bits
        multiplier = divide_round(torch.full_like(std_g, 1 << (scale + GUARD_BITS)), std_g)
        offset = divide_round(-(mean_g << scale), std_g).clamp(-(1 << 30), 1 << 30) + (1 << (SCALE_BITS - 1))
        dims = x.v.dim()
        multiplier = self._per_channel(multiplier.to(torch.int32), dims)
        offset = self._per_channel(offset.to(torch.int32), dims)
        limit = self.fmt.limit
        out = torch.empty(x.v.shape, dtype=self.fmt.dtype, device=x.v.device)
        for rows in _slices(x.v):
            values = x.v[rows].to(torch.int32) * multiplier
            values += offset
            values >>= SCALE_BITS
            out[rows] = values.clamp_(-limit, limit)
        return QTensor(out, torch.full_like(x.e, -self.fraction_bits))

    def forward(self, x: QTensor, ctx: StepContext | None = None) -> QTensor:
        self._check_shape(x.v)
        frame = x.e - GUARD_BITS
        if not self.training and int(self.batches_tracked) > 0:
            mean_g = _to_frame(self.running_mean, self.stats_exp - frame)
            std_g = _to_frame(self.running_std, self.stats_exp - frame).clamp(min=1 << GUARD_BITS)
            return self._normalise(x, mean_g, std_g)
        collective = LOCAL if ctx is None or not self.training else ctx.collective
        if x.v.numel() // self.channels * collective.world > MAX_COUNT:
            raise ValueError(f"IntBatchNorm: more than {MAX_COUNT} positions per channel in one batch")
        local = torch.cat([_channel_sums_and_products(x.v, x.v),
                           torch.full((1,), x.v.numel() // self.channels, dtype=torch.int64, device=x.v.device)])
        total = collective.sum(local)
        c = self.channels
        s1, s2, count = total[:c], total[c:2 * c], total[2 * c]
        root = isqrt(count * s2 - s1 * s1 + count * count)
        mean_g = divide_round(s1 << GUARD_BITS, count)
        std_g = divide_round(root << GUARD_BITS, count)
        out = self._normalise(x, mean_g, std_g)
        if self.training:
            self._track(mean_g, std_g, frame)
            self._saved = (x.v, out.v, x.e, count, s1, root)
        return out

    @torch.no_grad()
    def _track(self, mean_g: torch.Tensor, std_g: torch.Tensor, frame: torch.Tensor) -> None:
        """Move the running averages into this batch's frame and one step towards its statistics
        (the first batch sets them)."""
        first = self.batches_tracked == 0
        for running, batch in ((self.running_mean, mean_g), (self.running_std, std_g)):
            old = _to_frame(running, self.stats_exp - frame)
            moved = old + shift_round(batch - old, self.momentum_shift, "nearest")
            running.copy_(torch.where(first, batch, moved))
        self.stats_exp.copy_(frame)
        self.batches_tracked += 1

    def backward(self, d: QTensor, ctx: StepContext | None, need_input_grad: bool = True) -> QTensor | None:
        if self._saved is None:
            raise RuntimeError("IntBatchNorm.backward called without a training-mode forward")
        (x, h, x_exp, count, s1, root), self._saved = self._saved, None
        if not need_input_grad:
            return None
        collective = LOCAL if ctx is None else ctx.collective
        self._check_shape(d.v)
        limit = self.fmt.limit
        c = self.channels
        sums = collective.sum(_channel_sums_and_products(d.v, x))
        f2 = 2 * self.fraction_bits
        # sum(dz * y) * 2**F from the exact input: (M * sum(dz * x) - S1 * sum(dz)) * 2**F / r
        weighted = divide_round((count * sums[c:] - s1 * sums[:c]) << self.fraction_bits, root)
        q = RECIPROCAL_BITS + bit_length(count)
        reciprocal = divide_round(torch.ones_like(root) << q, root)
        # dx = (dz * a + h * b + c) * 2**(e_d - 2F - e_x - q), per channel; the same on every process.
        coefficients = torch.stack([(count << f2) * reciprocal, -weighted * reciprocal,
                                    -(sums[:c] << f2) * reciprocal])
        widest = bit_length(coefficients.abs().max()) + 8  # 127 |a| + 127 |b| + |c| < 2**8 max
        first_shift = (widest - ERROR_SUM_BITS).clamp(min=0)
        a, b, offset = (self._per_channel(k, d.v.dim()).to(torch.int32)
                        for k in shift_round(coefficients, first_shift, "nearest"))
        # The per-element sums in int32, made and then rounded slice by slice: one int32 tensor of
        # the whole size (the sums, which the shift's maximum needs) and small temporaries.
        total = torch.empty(d.v.shape, dtype=torch.int32, device=d.v.device)
        slices = _slices(total)
        for rows in slices:
            part = torch.mul(d.v[rows], a, out=total[rows])
            part += h[rows].to(torch.int32) * b
            part += offset
        second_shift = _global_shift(total, self.fmt.bits, collective)
        stochastic = self.fmt.error_rounding != "nearest"
        if stochastic:
            if ctx is None:
                raise ValueError("stochastic error rounding needs a StepContext")
            key = rng.derive_key(ctx.seed, ctx.step, self.layer_id, rng.STREAM_ROUNDING)
            base = ctx.element_offset(total)
        per_row = total[0].numel() if total.dim() > 0 and total.shape[0] else 0
        values = torch.empty(d.v.shape, dtype=self.fmt.dtype, device=d.v.device)
        for rows in slices:
            part = total[rows]
            if stochastic:
                start = rows.start if isinstance(rows, slice) else 0
                rounded = shift_round(part, second_shift, "stochastic", key, base + start * per_row)
            else:
                rounded = shift_round(part, second_shift, "nearest")
            values[rows] = rounded.clamp_(-limit, limit)
        return QTensor(values, d.e - f2 - x_exp - q + first_shift + second_shift)

    def clear_saved(self) -> None:
        self._saved = None

    def extra_repr(self) -> str:
        return f"{self.channels}"


def norm_layers(model: torch.nn.Module) -> list[IntBatchNorm]:
    return [m for m in model.modules() if isinstance(m, IntBatchNorm)]


@torch.no_grad()
def rebuild_running_statistics(model: torch.nn.Module, inputs, ctx: StepContext) -> None:
    """Every ``IntBatchNorm`` of ``model`` forgets its running statistics and gathers them afresh
    from the network inputs ``inputs`` (an iterable of batches) by forward passes with the current
    weights: the normalisation layers in training mode (batch statistics over all processes of
    ``ctx.collective``, as in a training step), every other layer in evaluation mode (no dropout,
    nothing kept for backward). The model is left in training mode."""
    layers = norm_layers(model)
    model.eval()
    for layer in layers:
        layer.train()
        layer.batches_tracked.zero_()
    try:
        for x in inputs:
            model(x, ctx)
            for layer in layers:
                layer.clear_saved()
    finally:
        model.train()
