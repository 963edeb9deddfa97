"""How much memory a run needs at least, checked before anything is allocated.

``check_memory(config, image_shape, num_classes)`` walks the model's layer list
(``intrain.models.model_spec``) and counts the weights and, per image, the activations every layer
keeps for the backward pass. From these it makes a lower bound of the memory training takes:

* per weight: the weight itself and its gradient, for int8 1 + 4 bytes (an int32 gradient, the
  narrowest the update uses), + 2 with int16 master weights, + 8 for the int64 sums of weight
  averaging, + 8 or 16 with the float twin's SGD or AdamW update (int32 master and moments, int64
  second moments); for the float twin 4 + 4 + 4 (weight, gradient, momentum), + 4 with AdamW (two
  moments); for DFP16 2 + 4 + 4 (int16 weight, int32 or float32 master and momentum; its gradient
  comes on top), with AdamW 2 + 4 + 4 + 8 (int64 second moments) or, on float32 masters, 2 + 4 +
  4 + 4;
* per activation element and image of a batch: 1 byte for int8, 2 for DFP16, 4 for float (the
  stored output alone; temporaries come on top).

When even this bound is more than the memory available (``MemAvailable`` of ``/proc/meminfo``,
or the device's free memory), the run is refused with one line giving both figures, instead of
failing in the middle of an allocation or driving the machine into swap. A run that passes may
still run out of memory; ``intrain.cli`` turns that into one line too.
"""

from __future__ import annotations

import os

import torch

from intrain.models import model_spec
from intrain.run.config import ConfigError


def model_counts(model: str, image_shape, num_classes: int, width: float,
                 hidden: list[int] | None = None, recurrent=None) -> tuple[int, int]:
    """(weights, activation elements per image) of ``model``; Python ints, so no overflow."""
    try:
        specs = model_spec(model, image_shape, num_classes, width, hidden, recurrent)
    except ValueError:
        return 0, 0  # the build reports it
    c, h, w = (int(v) for v in image_shape)
    size = c * h * w
    weights = acts = 0
    for spec in specs:
        if spec.kind == "conv":
            cin, cout, k, stride, pad = spec.args
            weights += cin * cout * k * k
            h, w = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
            c, size = cout, cout * max(h, 0) * max(w, 0)
        elif spec.kind == "linear":
            fan_in, fan_out = spec.args
            weights += fan_in * fan_out
            size = fan_out
        elif spec.kind == "lstm":  # c: the frames; kept per frame: the input, four gates, cell and state
            frame, hidden, shape, _ = spec.args
            weights += (frame * 4 * hidden if shape is None else shape.parameters) + 4 * hidden * hidden
            size = hidden
            acts += c * (frame + 7 * hidden)
        elif spec.kind == "maxpool":
            k = spec.args[0]
            h, w = h // k, w // k
            size = c * h * w
        acts += size
    return weights, acts


def bytes_per_weight(config) -> int:
    options = config.options or {}
    adamw = options.get("optimizer") == "adamw"
    if config.arith == "float":
        return 16 if adamw else 12
    if config.arith == "dfp16":
        if not adamw:
            return 10
        return 14 if options.get("dfp16_master") == "fp32" else 18
    extra = 2 if options.get("weight_bits") == 16 else 0
    extra += {"sgd": 8, "adamw": 16}.get(options.get("update"), 0)  # int32 master and moment(s), int64 second moment
    extra += 0 if options.get("weight_average") == "none" else 8
    return 5 + extra


def available_bytes(device: str) -> int | None:
    """Memory free for a new allocation on ``device``, or ``None`` when unknown."""
    if device == "cuda":
        try:
            return int(torch.cuda.mem_get_info()[0])
        except Exception:
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _size(n: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def check_memory(config, image_shape, num_classes: int, available: int | None = None) -> int:
    """Refuse (``ConfigError``) a run whose lower bound (see the module docstring) exceeds the
    available memory; returns the bound in bytes."""
    weights, acts = model_counts(config.model, image_shape, num_classes, config.width, config.hidden,
                                 config.recurrent)
    state = weights * bytes_per_weight(config)
    batch = config.batch_size * acts * {"float": 4, "dfp16": 2}.get(config.arith, 1)
    need = state + batch
    available = available_bytes(config.device) if available is None else available
    if available is not None and need > available:
        raise ConfigError(
            f"--model {config.model} --width {config.width:g} --batch-size {config.batch_size} needs at least "
            f"{_size(need)} of memory ({weights:,} weights: {_size(state)} with their training state; "
            f"activations of one batch: {_size(batch)}), but only {_size(available)} is available on "
            f"{config.device}: choose a smaller --width or --batch-size")
    return need
