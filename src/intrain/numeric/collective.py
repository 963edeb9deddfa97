"""Reductions across the processes of a data-parallel run, as one small interface.

Every reduction a training step makes over the batch (the maximum that picks a requantisation's
shift, the sums of weight gradients, batch statistics, metric totals) goes through a
``Collective`` taken from the step's context, so that a run split over N processes computes the
same integers as one process: sums of integers are exact and independent of order, and so is a
maximum. ``LOCAL`` is the one-process collective: every reduction is the identity. The
torch.distributed implementation lives with the run (``run.dist``); numeric code never imports it.

Contract: ``sum`` and ``max`` take an integer tensor of the same shape on every process and
return the elementwise sum / maximum over all processes (a new tensor or the argument itself);
they never change dtype, so callers pick a dtype wide enough for the total (int64 for sums).
Every process makes the same calls in the same order (an all-reduce waits for all of them).

Sharding rule (``shard_range``): a batch of ``B`` samples split over ``N`` processes gives
process ``r`` the contiguous samples ``[floor(r * B / N), floor((r + 1) * B / N))``: in order,
sizes differing by at most one, empty ones when ``B < N`` (they still take part in every
reduction, with nothing to contribute).
"""

from __future__ import annotations

from typing import Protocol

import torch


class Collective(Protocol):
    rank: int
    world: int

    def sum(self, t: torch.Tensor) -> torch.Tensor: ...

    def max(self, t: torch.Tensor) -> torch.Tensor: ...


class LocalCollective:
    """One process: rank 0 of 1, every reduction the identity."""

    rank = 0
    world = 1

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def __repr__(self) -> str:
        return "LOCAL"


LOCAL = LocalCollective()


def shard_range(rows: int, rank: int, world: int) -> tuple[int, int]:
    """``(start, stop)``: the samples of a batch of ``rows`` that process ``rank`` of ``world``
    takes (the sharding rule in the module docstring)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not one of the {world} processes")
    return rows * rank // world, rows * (rank + 1) // world
