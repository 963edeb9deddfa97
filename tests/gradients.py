"""Test helper: the exact mean weight gradients an update receives, as float64 tensors."""

import torch


def record_mean_gradients(update, layers, seen: dict) -> None:
    """Wrap ``update.step`` so that, when it runs, each of ``layers`` holding a weight gradient
    (an exact integer sum of ``batch`` samples) puts its real-valued mean into ``seen[index]``,
    once per entry (the caller clears ``seen`` between training steps)."""
    original = update.step

    def recording(step, batch, within=None):
        for i, layer in enumerate(layers):
            if layer.weight_grad is not None and i not in seen:
                seen[i] = torch.ldexp(layer.weight_grad.double(), layer.weight_grad_exp.double()) / batch
        return original(step, batch, within)

    update.step = recording
