"""Tensor-parallel state of this process: its rank, the group size, and the collectives layers use.

Until a group is initialised every process is rank 0 of a group of one, so the parallel layers
reduce to plain dense layers and the collectives to no-ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int
    """This process's rank inside its replica."""
    size: int
    """Number of ranks the model is sharded over."""
    group: dist.ProcessGroup | None
    """The torch.distributed group, or None for a group of one."""


_TP = TensorParallelGroup(rank=0, size=1, group=None)


def get_tp_group() -> TensorParallelGroup:
    return _TP


def get_tp_rank() -> int:
    return _TP.rank


def get_tp_size() -> int:
    return _TP.size


def set_tp_group(group: TensorParallelGroup) -> None:
    global _TP
    _TP = group


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks, in place; returns it."""
    if _TP.size > 1:
        dist.all_reduce(x, group=_TP.group)
    return x


def tp_all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's `x` along the last dimension, in rank order."""
    if _TP.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP.size)]
    dist.all_gather(parts, x.contiguous(), group=_TP.group)
    return torch.cat(parts, dim=-1)


def divide(numerator: int, denominator: int, what: str) -> int:
    """Exact division, or a ValueError naming what could not be split."""
    if numerator % denominator:
        raise ValueError(
            f"{what}: {numerator} is not divisible by tensor-parallel size {denominator}"
        )
    return numerator // denominator
