"""The integer module interface: explicit forward and backward on QTensors.

Integer layers do not use autograd: ``forward(x, ctx)`` keeps what backward needs (int8 tensors and
boolean masks only) while the module is in training mode, and ``backward(d, ctx, need_input_grad)``
returns the int8 error for the layer below and, for layers with weights, stores the exact
weight gradient in ``weight_grad`` (with its exponent in ``weight_grad_exp``) for the update, as
the kernels return it: int32 when its static bound allows (int8 operands, ``|G| <= 2**14 * K <
2**31`` for a reduction over K terms, i.e. K < 2**17), else int64.

Data-parallel shards: in a training step (``ctx`` given) the tensors are one process's shard of
the global batch, samples ``ctx.sample_offset ..``; every requantisation takes its shift from the
maximum over all shards (``ctx.collective.max``, see ``numeric.requant``) and every random draw
its element's position in the global batch (``StepContext.element_offset``), so each shard's
values are exactly its rows of the one-process result and every exponent is the same in every
process. Evaluation (no ``ctx``) requantises the local batch.

Every product of a weighted layer goes through its format's accumulator (``accumulate``):
``exact`` is the backend's exact sum; ``int32-chunked`` first shifts both operands by the headroom
``numeric.accumulate`` proves enough for int32 chunk sums, and adds the shifts to the exponent.
Layers of formats wider than 8 bits count in ``int32_wraps`` the results of their exact products
that a plain int32 accumulator would have got wrong (0 under ``int32-chunked``, whose chunk sums
cannot wrap). The headroom comes from the local operands' maxima, so ``int32-chunked`` formats
do not train data-parallel (DFP16 refuses torchrun).

Stochastic activation rounding (``fmt.activation_rounding``, ``--activation-rounding``): in a
training step a convolution's or linear layer's output is the exact accumulator (plus bias)
rounded once, stochastically, on the plain path; its expectation is the exact output, so the
backward pass, which uses the rounded output as the next layer's input, is unchanged in form.

Biases (``--biases on``): a convolution or linear layer may hold an ``IntBias`` child, a
per-channel bias in the layer's format that is added to the layer's exact accumulator before its
one rounding (``numeric.requant.add_bias``), so the output is the sum rounded once, as without a
bias. Its gradient is the exact int64 sum of the layer's output error over the batch and the
output positions (|d| < 2**15, fewer than 2**40 terms), with the error's exponent.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Callable

import torch

from intrain.numeric import rng
from intrain.numeric.collective import LOCAL, Collective
from intrain.numeric.accumulate import absmax, headroom_shifts, plain_int32_wraps
from intrain.numeric.formats import NITI_INT8, NumberFormat
from intrain.numeric.qtensor import QTensor
from intrain.numeric.requant import add_bias, aligned_bias, cpu_slices, requantize_product
from intrain.numeric.rounding import shift_round


@dataclass(frozen=True)
class StepContext:
    """What a training step's random numbers are keyed by (the run's seed and the global step),
    and, for a data-parallel run, how this process's shard sits in the global batch:
    ``sample_offset`` is the global index of its first sample (random numbers are keyed by global
    element position, never by rank) and ``collective`` reduces over all processes (``LOCAL``: one
    process)."""

    seed: int
    step: int
    sample_offset: int = 0
    collective: Collective = LOCAL
    #: Called by a container (``IntSequential``) with each weighted child once the child's backward
    #: has returned: the weight gradients inside it are final. A method may update those layers
    #: there and free their gradients, so that a step never holds every layer's gradient at once
    #: (NITI's update does: ``methods.niti``). ``None``: gradients wait for the method's update.
    gradient_ready: Callable[["IntModule"], None] | None = None

    def element_offset(self, t: torch.Tensor) -> int:
        """Position in the global batch's tensor of the first element of ``t``, this process's
        shard of it (samples along the first dimension): the offset of its random numbers."""
        per_sample = 1
        for size in t.shape[1:]:
            per_sample *= size
        return self.sample_offset * per_sample


def reduce_max(ctx: StepContext | None):
    """The maximum over the processes of a step (``None``, local, without a step: evaluation)."""
    return None if ctx is None else ctx.collective.max


class IntModule(torch.nn.Module):
    """Base class of integer layers. ``layer_id`` keys the layer's random numbers; containers
    assign it (``number_layers``)."""

    has_weight = False
    #: Whether ``number_layers`` gives the module a layer id (keys of its random numbers); an
    #: ``IntBias`` has none of its own, so that its layer keeps the id (and the draws) it has
    #: without one.
    numbered = True

    #: What forward and backward set on every call (tensors kept for backward, gradients, the
    #: mode flag): plain attributes, never parameters, buffers or modules, so they skip
    #: ``nn.Module.__setattr__``'s registration checks, which cost more than the arithmetic of a
    #: small layer (31 assignments in a step of the MLP 784-100-50-10; ``python
    #: benchmarks/native_speed.py``).
    _STEP_STATE = frozenset({"training", "_saved_input", "_output", "_keep", "_argmax", "_hw",
                             "_shape", "_input_shape", "_input_hw", "weight_grad", "weight_grad_exp"})

    def __setattr__(self, name: str, value) -> None:
        if name in self._STEP_STATE:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def __init__(self) -> None:
        super().__init__()
        self.layer_id = 0

    def forward(self, x: QTensor, ctx: StepContext | None = None) -> QTensor:
        raise NotImplementedError

    def backward(self, d: QTensor, ctx: StepContext | None, need_input_grad: bool = True) -> QTensor | None:
        raise NotImplementedError

    def clear_saved(self) -> None:
        """Drop tensors kept for backward."""


class WeightedIntModule(IntModule):
    """An integer layer with a weight in the number format ``fmt`` and a fixed weight exponent, set
    up by ``layers.init.init_weight``.

    When ``fmt.master_bits`` is set the layer also keeps a master weight of that width (NITI's
    16-bit weight accumulation): ``weight_master`` in ``[-master_limit, master_limit]`` with
    exponent ``weight_exp - fmt.master_extra_bits`` takes the updates, and the ``weight`` used by
    every product is its nearest-rounded upper ``fmt.bits`` bits, clipped to ``[-limit, limit]``,
    so updates smaller than one step of ``weight`` accumulate instead of being lost.
    """

    has_weight = True

    def __init__(self, weight_shape: tuple[int, ...], fan_in: int, backend,
                 fmt: NumberFormat = NITI_INT8) -> None:
        super().__init__()
        self.backend = backend
        self.fan_in = fan_in
        self.fmt = fmt
        self.register_buffer("weight", torch.zeros(weight_shape, dtype=fmt.dtype))
        self.register_buffer("weight_exp", torch.zeros((), dtype=torch.int64))
        if fmt.master_bits is not None:
            self.register_buffer("weight_master", torch.zeros(weight_shape, dtype=fmt.master_dtype))
        self.weight_grad: torch.Tensor | None = None
        self.weight_grad_exp: torch.Tensor | None = None
        self._saved_input: QTensor | None = None
        self.int32_wraps = 0
        #: The layer's ``IntBias`` (``--biases on``), or None.
        self.bias: IntBias | None = None
        #: Set by a sequence (``layers.sequential``) when a ReLU directly follows this layer.
        self.relu_follows = False

    @property
    def rectifies_output(self) -> bool:
        """Whether forward rounds only its product's positive part, the ReLU after it taking its
        exponent from the largest positive value (``fmt.relu_scale == "positive"``)."""
        return self.relu_follows and self.fmt.relu_scale == "positive"

    def accumulate(self, product: str, args: tuple, e: torch.Tensor, terms: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The backend's ``product`` of ``args`` (its two operands first) with exponent ``e``,
        through the format's accumulator, as (exact integer sum, exponent). ``terms``: the
        reduction length, which the ``int32-chunked`` accumulator's bound needs."""
        if self.fmt.accumulator == "int32-chunked":
            shifts = self._headroom(args, terms)
            return self.backend.shifted_product(product, args, shifts), e + sum(shifts)
        exact = getattr(self.backend, product)(*args)
        if self.fmt.bits > 8:
            self.int32_wraps += plain_int32_wraps(exact)
        return exact, e

    def _headroom(self, args: tuple, terms: int | None) -> tuple[int, int]:
        """The right shifts of the two operands of ``args`` that the ``int32-chunked``
        accumulator needs for a reduction of ``terms`` (their sum goes into the product's
        exponent); the backend applies them (``Backend.shifted_product``)."""
        if terms is None:
            raise ValueError("the int32-chunked accumulator needs the reduction length")
        return headroom_shifts(absmax(args[0]), absmax(args[1]), terms, self.fmt.chunk_length, self.fmt.headroom)

    def requantize_output(self, product: str, args: tuple, e: torch.Tensor, ctx: StepContext | None = None,
                          terms: int | None = None, rectify: bool = False) -> QTensor:
        """The backend's ``product`` of ``args`` (exponent ``e``, reduction length ``terms``) plus
        the layer's bias, rounded to the format, nearest, with the shift of the whole batch over
        all processes of ``ctx``; ``rectify``: its positive part (``numeric.formats``,
        ``relu_scale``). With ``fmt.activation_rounding == "stochastic"`` a training step
        (``ctx`` given) rounds it stochastically instead, keyed by (seed, step, layer)."""
        key = None
        if self.fmt.activation_rounding == "stochastic" and ctx is not None:
            key = rng.derive_key(ctx.seed, ctx.step, self.layer_id, rng.STREAM_ACTIVATION_ROUNDING)
        return self._rounded(product, args, e, ctx, terms, rectify, self.bias, key)

    def _rounded(self, product: str, args: tuple, e: torch.Tensor, ctx: StepContext | None,
                 terms: int | None, rectify: bool, bias: "IntBias | None", key: tuple[int, int] | None = None
                 ) -> QTensor:
        """``requantize_output`` with the bias ``bias`` (None: none, as for an error), rounded to
        nearest, or stochastically with the generator's ``key`` (which needs ``ctx``: the draws are
        keyed by each element's position in the global batch). The bias goes in before the shift
        is chosen: on the fused paths (nearest only) it is aligned to the product's exponent first
        and added there (``requantize_product``), unless it is so coarse that the accumulator must
        be rounded first (``add_bias``), which the plain path does."""
        fused = key is None and ((self.fmt.accumulator == "exact" and self.fmt.bits == 8)
                                 or self.fmt.accumulator == "int32-chunked")
        if fused:
            shifts = self._headroom(args, terms) if self.fmt.accumulator == "int32-chunked" else (0, 0)
            aligned = None
            if bias is not None and e.device.type == "cpu":
                aligned = aligned_bias(bias.weight, bias.weight_exp, e + sum(shifts))
                if aligned is not None and not bool(aligned.any()):
                    bias = aligned = None  # a zero bias (or one below half the accumulator's unit) adds nothing
            if bias is None or aligned is not None:
                # (int32-chunked: no wrap count to take, the product may stay in chunks)
                return requantize_product(self.backend, product, args, e + sum(shifts), self.fmt.bits,
                                          reduce_max=reduce_max(ctx), shifts=shifts, rectify=rectify, bias=aligned)
        exact, e = self.accumulate(product, args, e, terms)  # the plain path: the whole exact accumulator
        if bias is not None:
            exact, e = add_bias(exact, e, bias.weight, bias.weight_exp)
        if rectify:
            exact = exact.clamp_(min=0)
        if key is None:
            return self.fmt.requantize(exact, e, reduce_max=reduce_max(ctx))
        return self.fmt.requantize(exact, e, mode="stochastic", key=key, offset=ctx.element_offset(exact),
                                   reduce_max=ctx.collective.max)

    def requantize_error(self, product: str, args: tuple, e: torch.Tensor,
                         ctx: StepContext | None, terms: int | None = None) -> QTensor:
        """The error for the layer below, from the backend's ``product`` of ``args``: nearest
        rounding (NITI), or stochastic rounding keyed by (seed, step, layer), which keeps the
        small errors of most samples alive on average."""
        if self.fmt.error_rounding == "nearest":
            return self._rounded(product, args, e, ctx, terms, rectify=False, bias=None)
        if ctx is None:
            raise ValueError("stochastic error rounding needs a StepContext")
        key = rng.derive_key(ctx.seed, ctx.step, self.layer_id, rng.STREAM_ROUNDING)
        return self._rounded(product, args, e, ctx, terms, rectify=False, bias=None, key=key)

    def store_bias_gradient(self, d: QTensor) -> None:
        """The bias's exact gradient from the layer's output error ``d`` (none without a bias)."""
        if self.bias is not None:
            self.bias.store_gradient(d)

    @property
    def has_master_weight(self) -> bool:
        return self.fmt.master_bits is not None

    @property
    def update_target(self) -> torch.Tensor:
        """The tensor the update changes: the master weight when there is one, else the weight."""
        return self.weight_master if self.has_master_weight else self.weight

    def start_master_from_weight(self) -> None:
        """Set the master weight to the current weight, exactly (``w * 2**master_extra_bits``)."""
        self.weight_master.copy_(self.weight.to(self.fmt.master_dtype) << self.fmt.master_extra_bits)

    def refresh_weight(self) -> None:
        """Recompute the weight from the master (nearest rounding, clip); a no-op without one."""
        if not self.has_master_weight:
            return
        wide = self.weight_master.to(torch.int32)  # master_limit + half a step would wrap in int16
        limit = self.fmt.limit
        view = shift_round(wide, self.fmt.master_extra_bits, "nearest").clamp(-limit, limit)
        self.weight.copy_(view.to(self.fmt.dtype))

    @property
    def weight_q(self) -> QTensor:
        return QTensor(self.weight, self.weight_exp)

    def clear_saved(self) -> None:
        self._saved_input = None


class IntBias(WeightedIntModule):
    """The per-channel bias of a convolution or linear layer: ``weight`` [C] in the layer's format
    with exponent ``weight_exp``, all zero at the start. The layer adds it (``requantize_output``)
    and stores its gradient (``store_bias_gradient``); it is a weighted module so that every update
    trains it as it trains weights, except that, like the float twin, none decays it (a 1-d
    tensor). It computes nothing by itself, draws no random numbers and takes no layer id."""

    numbered = False

    def __init__(self, channels: int, fmt: NumberFormat = NITI_INT8) -> None:
        super().__init__((channels,), 1, None, fmt)

    def store_gradient(self, d: QTensor) -> None:
        """``weight_grad``: the sum of ``d`` over every dimension but the channels' (1), in int64.
        Over the positions of one sample it sums in int32 where ``positions * 2**(w-1) < 2**31``
        for ``d`` of ``w`` bits (so that no sum can wrap), then over the samples in int64, a slice
        of samples at a time (``cpu_slices``): the same values as one int64 sum, without an int64
        (or int32) copy of the whole ``d`` (7x faster for LeNet-5's first error; a 32 MiB copy at
        VGG-small-7's DFP16 errors; ``python benchmarks/speed.py --update sgd --biases on``)."""
        v = d.v
        if v.dim() <= 2:
            self.weight_grad = v.sum(0, dtype=torch.int64)
        else:
            per_sample = v.flatten(2)
            fits = per_sample.shape[2] * 2 ** (torch.iinfo(v.dtype).bits - 1) < 2**31
            dtype = torch.int32 if fits else torch.int64
            total = torch.zeros(v.shape[1], dtype=torch.int64, device=v.device)
            for rows in cpu_slices(per_sample):
                total += per_sample[rows].sum(2, dtype=dtype).sum(0, dtype=torch.int64)
            self.weight_grad = total
        self.weight_grad_exp = torch.as_tensor(d.e, dtype=torch.int64).clone()


def weighted_layers(module: torch.nn.Module) -> list[WeightedIntModule]:
    """Every weighted integer layer in the module tree under ``module``, depth first in the order
    the children were registered (for a sequence: its order)."""
    return [m for m in module.modules() if isinstance(m, WeightedIntModule)]


def number_layers(root: torch.nn.Module) -> None:
    """Give every integer layer under ``root`` its ``layer_id``: the leaves (layers without integer
    layers inside) first, 1, 2, ... depth first in registration order, then the containers in the
    same order. For a plain sequence a layer's id is its index + 1; in a tree every layer gets a
    distinct, stable id. Containers call this on themselves when built, so the outermost
    container, built last, numbers the whole tree."""
    modules = [m for m in root.modules() if isinstance(m, IntModule) and m.numbered]
    containers = [m for m in modules if any(inner in modules for inner in list(m.modules())[1:])]
    leaves = [m for m in modules if m not in containers]
    for index, layer in enumerate(leaves + containers):
        layer.layer_id = index + 1
