# Copyright hfprune contributors. Apache-2.0.
"""The few collective operations hfprune needs so that every rank of a torch.distributed run (DDP, FSDP, accelerate
launch) takes the same decisions: no-ops in a single process."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def world_size() -> int:
    """Processes in the default group, 1 without torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def mean_across_ranks(flat: torch.Tensor) -> torch.Tensor:
    """Average over ranks, as DDP averages parameter gradients (gloo has no AVG: sum, then divide)."""
    world = world_size()
    if world > 1:
        flat = flat.contiguous()
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat = flat / world
    return flat


def broadcast_from_first(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite each tensor (in place) with rank 0's values."""
    if world_size() > 1:
        with torch.no_grad():
            for t in tensors:
                torch.distributed.broadcast(t.data, src=0)
