"""Data-parallel runs: the ``Collective`` of the processes torchrun starts, over torch.distributed.

``torchrun --nproc-per-node N -m intrain train ...`` starts N copies of ``intrain train`` and
tells each, in its environment, ``WORLD_SIZE`` (N times the nodes), ``RANK`` (0 .. WORLD_SIZE-1),
``LOCAL_RANK`` (its index on its node) and ``MASTER_ADDR``/``MASTER_PORT`` (where the processes
meet). ``environment()`` reads them (one process when ``WORLD_SIZE`` is unset or 1);
``from_environment(device)`` joins the process group (gloo for CPU training, NCCL for CUDA, one
GPU per process: ``cuda:LOCAL_RANK``) and returns a ``DistributedCollective``, or ``LOCAL`` for
one process. Several nodes need nothing more here: torchrun's rendezvous options
(``--nnodes``, ``--node-rank``, ``--rdzv-endpoint``, ...) set the same variables.

Exactness: ``sum`` and ``max`` all-reduce integer tensors (int64 where they matter: callers
widen before a sum), and integer sums and maxima are exact and do not depend on the order in
which the processes' values are combined, so every process receives the same integers, the ones
one process holding the whole batch would compute. Floating-point tensors are refused.

``gather_batch`` rebuilds a whole batch's rows from the processes' shards with ``sum`` alone:
each process contributes its rows at their place in a zero tensor, so every sum has one nonzero
term and is that term exactly.
"""

from __future__ import annotations

import os

import torch

from intrain.numeric.collective import LOCAL, Collective
from intrain.run.config import ConfigError

_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


class DistributedEnvironmentError(ConfigError):
    """torchrun's variables are missing or inconsistent; one line."""


def environment() -> tuple[int, int, int]:
    """``(rank, world, local_rank)`` from torchrun's environment variables; ``(0, 1, 0)`` when
    ``WORLD_SIZE`` is unset (a plain ``intrain train``)."""
    values = {}
    for name in _VARIABLES:
        text = os.environ.get(name)
        if text is None:
            continue
        try:
            values[name] = int(text)
        except ValueError:
            raise DistributedEnvironmentError(f"{name}={text!r} is not an integer: start data-parallel runs "
                                              "with torchrun, which sets it") from None
    world = values.get("WORLD_SIZE", 1)
    rank = values.get("RANK", 0)
    local_rank = values.get("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise DistributedEnvironmentError(f"WORLD_SIZE={world}, RANK={rank}, LOCAL_RANK={local_rank} do not fit "
                                          "together: start data-parallel runs with torchrun, which sets them")
    return rank, world, local_rank


class DistributedCollective:
    """Exact integer all-reduces over the default torch.distributed process group."""

    def __init__(self, rank: int, world: int, device: torch.device) -> None:
        self.rank = rank
        self.world = world
        self.device = device  # where the backend reduces: CPU for gloo, this process's GPU for NCCL

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, torch.distributed.ReduceOp.SUM)

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, torch.distributed.ReduceOp.MAX)

    def _all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"exact collectives take integer tensors, got {t.dtype}")
        reduced = t.to(self.device, copy=True)  # a copy: the caller's tensor stays its own value
        torch.distributed.all_reduce(reduced, op=op)
        return reduced.to(t.device)

    def __repr__(self) -> str:
        return f"DistributedCollective(rank={self.rank}, world={self.world}, device={self.device})"


def from_environment(device: str) -> Collective:
    """The collective of this process (see the module docstring), joining the process group on
    first use; ``LOCAL`` for one process."""
    rank, world, local_rank = environment()
    if world == 1:
        return LOCAL
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    if not torch.distributed.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise DistributedEnvironmentError(f"{name} is not set: start data-parallel runs with torchrun, "
                                                  "which sets it")
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank,
                                             world_size=world)
    return DistributedCollective(rank, world, dev)


def close() -> None:
    """Leave the process group, when this process joined one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def gather_batch(collective: Collective, t: torch.Tensor, rows: int, start: int) -> torch.Tensor:
    """The ``rows`` rows of a whole batch of an integer tensor, every process holding rows
    ``start .. start + len(t)`` of it as ``t`` (see the module docstring); ``t`` itself for one
    process."""
    if collective.world == 1:
        return t
    whole = torch.zeros((rows,) + tuple(t.shape[1:]), dtype=torch.int64, device=t.device)
    whole[start:start + t.shape[0]] = t
    return collective.sum(whole).to(t.dtype)
