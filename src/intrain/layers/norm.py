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

Wider formats (DFP16's 16 bits; any width from 9 to 16). The same layer, with three changes, and
int8's arithmetic untouched (its tests and golden runs keep their bits):

- The statistics come from copies narrowed to ``w = min(bits, 30 - ceil(log2 M))`` bits:
  ``x' = round(x / 2**k)`` (nearest) clipped to ``+-(2**(w-1) - 1)``, ``k = bits - w``, and the
  errors ``dz'`` likewise; ``M`` is the global count, known before the sums by one more sum over
  the processes, so every process narrows alike. With ``M <= 2**(30 - w)`` every int64 bound
  above holds for w-bit values: ``M*S2 < M**2 * 2**(2w-2) <= 2**58`` and
  ``|M*P - S1*D1| * 2**Fs < M**2 * 2**(2w-1) * 2**4 <= 2**63`` (``Fs = 4``, the 8-bit output's
  fraction bits, is the precision of ``D2`` here); per-sample sums are made in int64 (products of
  up to 2**30). The copies' frame is k bits above x's: mean and standard deviation are shifted
  left by k (exact) before use, and the running averages are kept in the copies' frame. At
  ``M <= 2**14`` (a batch of 16 at 32 x 32) a 16-bit layer narrows nothing; at ImageNet's largest
  counts it keeps 8 bits, as int8 does. Each copy is within one unit of ``2**k`` input units, so
  mean and standard deviation are within about ``2**k`` units, and BatchNorm's epsilon is one
  unit of the copy squared (``tests/test_norm.py`` bounds both): a channel whose standard
  deviation is below a unit of the copy is not normalised (BENCHMARKS.md), as with int8.
- Forward in int64, with ``S = 31 - F`` (19 for 16 bits: ``|mean_G| * 2**(S + F) < 2**31 *
  2**31``): ``|x * A| <= 2**15 * 2**(S+F) = 2**46``, ``|B|`` clipped at ``2**(bits + S + F)``,
  the sum below ``2**48``. ``A``'s rounding moves ``y`` by at most ``2**15 * 2**-20 = 2**-5``
  output units (int8's ``127 * 2**-19``).
- Backward: ``sum(dz)`` itself (exact in int64, ``|sum dz| < 2**37``) for ``c``;
  ``T = (M*dz - D1) * 2**(F + Fs) - h * D2 * 2**k``; ``R' = round(2**q / r)`` with
  ``q = RECIPROCAL_BITS + bit_length(M) + w - 8`` (``2**13 <= R' <= 2**(13 + w)``, as ``M <= r <=
  M * 2**(w-1)``). Each coefficient is a product that fits int64 (``M*R' <= 2**44``,
  ``|D2*R'| <= M * 2**19 * 2**(13 + w) <= 2**62``, ``|D1*R'| <= 2**58``) times a power of two
  (``2**(F + Fs)``, ``2**k``, ``2**(F + Fs)``), applied together with the shift that leaves the
  largest coefficient ``WIDE_ERROR_SUM_BITS - bits`` bits, so that the per-element sums
  ``|dz*a| + |h*b| + |c| < 2**62`` are made in int64. The floor of ``r = isqrt(...)`` is a
  relative error below ``1/r``: invisible at 8 bits, it shows at 16 bits in channels whose
  standard deviation is a few units (up to ``2/r`` of the channel's largest gradient).
"""

from __future__ import annotations

import torch

from intrain.layers.base import IntModule, StepContext
from intrain.numeric import rng
from intrain.numeric.collective import LOCAL, Collective
from intrain.numeric.formats import NITI_INT8, NumberFormat
from intrain.numeric.qtensor import QTensor
from intrain.numeric.requant import cpu_slices
from intrain.numeric.rounding import bit_length, divide_round, isqrt, shift_round

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
#: The same for values wider than 8 bits, whose per-element sums are made in int64.
WIDE_ERROR_SUM_BITS = 62
#: Values of this many bits keep the int32 arithmetic of the module docstring; wider ones (up to
#: 16, DFP16's) take int64 and statistics from narrowed copies ("Wider formats" there).
STAT_BITS = 8
#: Wider formats: statistics from copies of at most 30 - ceil(log2 M) bits, for which every int64
#: bound of the 8-bit case holds ("Wider formats" in the module docstring).
WIDE_STAT_LIMIT = 30
#: Largest shift applied to running statistics when the input's exponent moves (beyond it a
#: left shift could overflow; a right shift by more leaves zero anyway).
MAX_FRAME_SHIFT = 24


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


def _channel_sums(t: torch.Tensor, wide: bool = False) -> torch.Tensor:
    """Per-channel sums of an int32 ``[N, C, ...]`` tensor whose values have at most 14 bits (30
    with ``wide``), as int64: over each sample's positions in int32 (``< 2**14 *
    MAX_SAMPLE_POSITIONS = 2**31``; int64 with ``wide``), then over the samples in int64 (no int64
    copy of the whole tensor)."""
    per_sample = t.flatten(2).sum(2, dtype=torch.int64 if wide else torch.int32) if t.dim() > 2 else t
    return per_sample.sum(0, dtype=torch.int64)


def _slices(t: torch.Tensor) -> list:
    """Row slices for element-wise passes: a few hundred thousand elements at a time on CPU, so
    that the int32 temporaries of this layer stay small (they set the peak memory of a ResNet-18
    step: ``python benchmarks/speed.py --model resnet18``); the whole tensor on other devices."""
    return cpu_slices(t) if t.device.type == "cpu" else [...]


def _wide_channel_sums(v: torch.Tensor) -> torch.Tensor:
    """Per-channel int64 sums of an int16 ``[N, C, ...]`` tensor, slice by slice (a whole-tensor
    ``sum(dtype=torch.int64)`` would make an int64 copy of it first)."""
    total = torch.zeros(v.shape[1], dtype=torch.int64, device=v.device)
    for rows in _slices(v):
        total += _channel_sums(v[rows].to(torch.int32), wide=True)
    return total


def _channel_sums_and_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[_channel_sums(a), _channel_sums(a * b)]`` (int64, ``[2C]``) for int8 or int16 tensors of
    one shape, in one pass made slice by slice (no int32 copy or product of the whole tensors)."""
    channels = a.shape[1]
    wide = a.dtype != torch.int8 or b.dtype != torch.int8
    total = torch.zeros(2 * channels, dtype=torch.int64, device=a.device)
    for rows in _slices(a):
        part = a[rows].to(torch.int32)
        total[:channels] += _channel_sums(part, wide)
        total[channels:] += _channel_sums(part.mul_(b[rows]), wide)
    return total


class IntBatchNorm(IntModule):
    """Per-channel integer normalisation of ``[N, C, ...]`` inputs (see the module docstring)."""

    def __init__(self, channels: int, fmt: NumberFormat = NITI_INT8, momentum_shift: int = MOMENTUM_SHIFT) -> None:
        super().__init__()
        if not STAT_BITS <= fmt.bits <= 16:
            raise ValueError(f"IntBatchNorm's integer ranges are proven for 8- to 16-bit values, not {fmt.bits}-bit ones")
        self.channels = channels
        self.fmt = fmt
        self.momentum_shift = momentum_shift
        self.fraction_bits = fmt.bits - 1 - RANGE_BITS
        #: Fraction bits of the forward's multiplier and offset: SCALE_BITS for 8-bit values; for
        #: wider ones as many as ``mean_G * 2**(S + F) < 2**31 * 2**(S + F)`` allows in int64 (19
        #: for 16 bits: A's rounding then moves y by at most 2**15 / 2 * 2**-19 = 2**-5 units).
        self.scale_bits = SCALE_BITS if fmt.bits == STAT_BITS else 31 - self.fraction_bits
        #: Fraction bits of the backward's sum(dz * y) (that of an 8-bit output).
        self.stat_fraction_bits = STAT_BITS - 1 - RANGE_BITS
        #: The int32 arithmetic of 8-bit values, int64 for wider ones.
        self._work_dtype = torch.int32 if fmt.bits == STAT_BITS else torch.int64
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

    def _narrowing(self, count: torch.Tensor) -> int:
        """Bits the statistics' copies drop for ``count`` positions per channel: 0 for 8-bit values;
        for wider ones enough to leave ``min(bits, WIDE_STAT_LIMIT - ceil(log2 count))`` bits."""
        if self.fmt.bits == STAT_BITS:
            return 0
        ceil_log2 = (int(count) - 1).bit_length()
        return self.fmt.bits - min(self.fmt.bits, WIDE_STAT_LIMIT - ceil_log2)

    def _narrowed(self, v: torch.Tensor, k: int) -> torch.Tensor:
        """``v`` itself for ``k = 0``; else ``v / 2**k`` rounded to nearest and clipped to the
        ``bits - k``-bit range: the copy the statistics are made from."""
        if not k:
            return v
        top = (1 << (self.fmt.bits - 1 - k)) - 1
        return shift_round(v.to(torch.int32), k, "nearest").clamp_(-top, top).to(v.dtype)

    def _normalise(self, x: QTensor, mean_g: torch.Tensor, std_g: torch.Tensor) -> QTensor:
        """``(x - mean) / std`` at the fixed output exponent, as ``(x * A + B) >> SCALE_BITS`` in
        int32 (int64 for values wider than 8 bits; see the module docstring), the mean and
        standard deviation in x's frame."""
        scale = self.scale_bits + self.fraction_bits
        multiplier = divide_round(torch.full_like(std_g, 1 << (scale + GUARD_BITS)), std_g)
        bound = 1 << (self.fmt.bits + scale)  # 2**30 for int8
        offset = divide_round(-(mean_g << scale), std_g).clamp(-bound, bound) + (1 << (self.scale_bits - 1))
        dims = x.v.dim()
        multiplier = self._per_channel(multiplier.to(self._work_dtype), dims)
        offset = self._per_channel(offset.to(self._work_dtype), dims)
        limit = self.fmt.limit
        out = torch.empty(x.v.shape, dtype=self.fmt.dtype, device=x.v.device)
        for rows in _slices(x.v):
            values = x.v[rows].to(self._work_dtype) * multiplier
            values += offset
            values >>= self.scale_bits
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
        local_count = torch.full((1,), x.v.numel() // self.channels, dtype=torch.int64, device=x.v.device)
        # Wider values: the global count sets the narrowing (an extra sum over the processes).
        k = self._narrowing(collective.sum(local_count)) if self.fmt.bits > STAT_BITS else 0
        narrow = self._narrowed(x.v, k)
        total = collective.sum(torch.cat([_channel_sums_and_products(narrow, narrow), local_count]))
        c = self.channels
        s1, s2, count = total[:c], total[c:2 * c], total[2 * c]
        root = isqrt(count * s2 - s1 * s1 + count * count)
        mean_g = divide_round(s1 << GUARD_BITS, count)  # in the frame of the copy: k bits above x's
        std_g = divide_round(root << GUARD_BITS, count)
        out = self._normalise(x, mean_g << k, std_g << k)
        if self.training:
            self._track(mean_g, std_g, frame + k)
            self._saved = (narrow, out.v, x.e, count, s1, root, k)
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
        (x, h, x_exp, count, s1, root, k), self._saved = self._saved, None
        if not need_input_grad:
            return None
        collective = LOCAL if ctx is None else ctx.collective
        self._check_shape(d.v)
        limit = self.fmt.limit
        c = self.channels
        bits, fs = self.fmt.bits, self.stat_fraction_bits
        local = _channel_sums_and_products(self._narrowed(d.v, k), x)
        if k:  # sum(dz) itself, exact in int64 (|dz| < 2**15, M <= 2**22)
            local = torch.cat([local, _wide_channel_sums(d.v)])
        sums = collective.sum(local)
        error_sum = sums[2 * c:] if k else sums[:c]
        # sum(dz' * y) * 2**Fs from the statistics' copies: (M * sum(dz' * x') - S1 * sum(dz')) * 2**Fs / r
        weighted = divide_round((count * sums[c:2 * c] - s1 * sums[:c]) << fs, root)
        q = RECIPROCAL_BITS + bit_length(count) + (bits - k - STAT_BITS)  # 2**13 <= R' <= 2**(13 + w)
        reciprocal = divide_round(torch.ones_like(root) << q, root)
        # dx = (dz * a + h * b + c) * 2**(e_d - F - Fs - k - e_x - q), per channel, the same on every
        # process: a = M R' 2**(F + Fs), b = -D2 R' 2**k, c = -D1 R' 2**(F + Fs), each a product
        # that fits int64 times a power of two, so that the shift below is applied without forming
        # the wider coefficients (for int8, k = 0 and Fs = F).
        products = torch.stack([count * reciprocal, -weighted * reciprocal, -error_sum * reciprocal])
        powers = torch.tensor([self.fraction_bits + fs, k, self.fraction_bits + fs],
                              dtype=torch.int64, device=products.device).view(3, 1)
        lengths = torch.where(products == 0, 0, bit_length(products.abs()) + powers)
        widest = lengths.max() + bits  # (2**(bits-1) - 1) (|a| + |b|) + |c| < 2**bits max
        first_shift = (widest - (ERROR_SUM_BITS if bits == STAT_BITS else WIDE_ERROR_SUM_BITS)).clamp(min=0)
        coefficients = torch.where(powers >= first_shift, products << (powers - first_shift).clamp(min=0),
                                   shift_round(products, (first_shift - powers).clamp(min=0), "nearest"))
        a, b, offset = (self._per_channel(k_, d.v.dim()).to(self._work_dtype) for k_ in coefficients)
        # The per-element sums in int32 (int64 for wider values), made and then rounded slice by
        # slice: one tensor of the whole size (the sums, which the shift's maximum needs) and small
        # temporaries.
        total = torch.empty(d.v.shape, dtype=self._work_dtype, device=d.v.device)
        slices = _slices(total)
        for rows in slices:
            part = torch.mul(d.v[rows], a, out=total[rows])
            part += h[rows].to(self._work_dtype) * b
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
        return QTensor(values, d.e - self.fraction_bits - fs - k - x_exp - q + first_shift + second_shift)

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
