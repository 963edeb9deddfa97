"""DFP16's ``--dfp16-master fp32`` update, as in Das et al.: float32 master weights and optimiser state.

Each weighted layer keeps a float32 master copy of its weight; the update is the float twin's
optimiser itself (``optimizer="sgd"``: ``torch.optim.SGD``, Nesterov momentum ``MOMENTUM``;
``"adamw"``: ``torch.optim.AdamW`` with ``ADAMW_BETAS`` and ``ADAMW_EPS``; weight decay
``--weight-decay``, the float twin's ``WEIGHT_DECAY`` unless given, on weight matrices and
kernels, none on biases, as in the float twin; learning rate ``float_twin.lr_at`` with
``warmup_length``) fed with the mean
gradient ``G * 2**eG / N`` of the layer's exact integer weight gradient ``G`` (converted to float64
and then float32, so rounded once to float32). After the step the layer's DFP16 weight is the
master converted back: exponent ``e = k - (bits - 1)`` where ``max |W| < 2**k`` (``frexp``), values
``round(W / 2**e)`` (to nearest even, exact scaling by a power of two) clipped to the format's
limit. The forward and backward products stay integer; only this elementwise update is float,
which is why ``fp32`` is not the integer-only mode.
"""

from __future__ import annotations

import torch

from intrain.layers import weighted_layers
from intrain.methods.sgd_fixed import decays
from intrain.methods.float_twin import ADAMW_BETAS, ADAMW_EPS, MOMENTUM, OPTIMIZERS, WEIGHT_DECAY, lr_at, warmup_length
from intrain.numeric.formats import NumberFormat


def to_format(master: torch.Tensor, fmt: NumberFormat) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(values, exponent)`` of float ``master`` in ``fmt``'s integers (None for an all-zero
    tensor, whose exponent is meaningless)."""
    largest = master.abs().amax()
    if not bool(largest > 0):
        return None
    exponent = torch.frexp(largest).exponent.to(torch.int64) - (fmt.bits - 1)
    values = torch.round(torch.ldexp(master, -exponent.to(master.dtype))).clamp_(-fmt.limit, fmt.limit)
    return values.to(fmt.dtype), exponent


class FloatMaster:
    """The fp32-master update of every weighted layer of ``model`` with the float twin's
    ``optimizer`` (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, fmt: NumberFormat, lr: float, total_steps: int,
                 optimizer: str = "sgd", weight_decay: float = WEIGHT_DECAY) -> None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        self.layers = weighted_layers(model)
        self.fmt = fmt
        self.base_lr = lr
        self.total_steps = total_steps
        self.warmup = warmup_length(total_steps)
        self.master = [torch.ldexp(layer.weight.to(torch.float32), layer.weight_exp.to(torch.float32))
                       for layer in self.layers]  # exact: 16-bit integers times a power of two
        pairs = list(zip(self.master, self.layers))
        groups = [{"params": [m for m, layer in pairs if decays(layer)]},
                  {"params": [m for m, layer in pairs if not decays(layer)], "weight_decay": 0.0}]
        groups = [group for group in groups if group["params"]]
        if optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=self.lr_at(0), betas=ADAMW_BETAS, eps=ADAMW_EPS,
                                               weight_decay=weight_decay)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=self.lr_at(0), momentum=MOMENTUM, nesterov=True,
                                             weight_decay=weight_decay)

    def lr_at(self, step: int) -> float:
        return lr_at(step, base_lr=self.base_lr, total_steps=self.total_steps, warmup_steps=self.warmup)

    @torch.no_grad()
    def step(self, step: int, batch: int, within=None) -> None:
        """Update every layer that holds a ``weight_grad`` of a batch of ``batch`` samples, or only
        the layers in ``within`` (called as backward finishes each layer; the optimiser updates the
        masters that have a gradient, each with its own arithmetic and state, so the order changes
        no bit); each gradient is freed once used."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        inside = set() if within is None else {id(layer) for layer in weighted_layers(within)}
        chosen = [(master, layer) for master, layer in zip(self.master, self.layers)
                  if layer.weight_grad is not None and (within is None or id(layer) in inside)]
        if not chosen:
            return
        for master, layer in chosen:
            exact = torch.ldexp(layer.weight_grad.to(torch.float64), layer.weight_grad_exp.to(torch.float64))
            master.grad = (exact / batch).to(torch.float32)
        self.optimizer.step()
        for master, layer in chosen:
            converted = to_format(master, self.fmt)
            if converted is not None:
                layer.weight.copy_(converted[0])
                layer.weight_exp.copy_(converted[1])
            else:
                layer.weight.zero_()
            master.grad = None
            layer.weight_grad = layer.weight_grad_exp = None

    def state_dict(self) -> dict:
        return {"master": [m.clone() for m in self.master], "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if len(state["master"]) != len(self.master):
            raise ValueError(f"master state for {len(state['master'])} layers, the model has {len(self.master)}")
        for i, (saved, master) in enumerate(zip(state["master"], self.master)):
            if saved.dtype != torch.float32 or saved.shape != master.shape:
                raise ValueError(f"master of layer {i + 1} does not fit: {saved.dtype} {tuple(saved.shape)}")
            master.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
