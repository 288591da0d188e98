"""Tensor-parallel state of this process: its rank, the group size, and the collectives layers use.

Until a group is initialised every process is rank 0 of a group of one, so the parallel layers
reduce to plain dense layers and the collectives to no-ops.
"""

from __future__ import annotations

import os
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
    """The torch.distributed group for tensors (NCCL on GPU, gloo on CPU), or None for one rank."""
    cpu_group: dist.ProcessGroup | None = None
    """A gloo group over the same ranks for Python objects (each step's SchedulerOutput)."""


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


def tp_broadcast_tensor(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's `x` into every rank's `x` (same shape and dtype), in place; returns it. On GPUs
    it is queued on the stream like a kernel: no rank waits for it on the host."""
    if _TP.size > 1:
        dist.broadcast(x, src=0, group=_TP.group)
    return x


def tp_all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's `x` along the last dimension, in rank order."""
    if _TP.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP.size)]
    dist.all_gather(parts, x.contiguous(), group=_TP.group)
    return torch.cat(parts, dim=-1)


def init_tensor_parallel(rank: int, size: int, init_method: str, device: torch.device) -> None:
    """Join the replica's group: rank 0's address in `init_method` (tcp://host:port) is the
    rendezvous. NCCL carries tensors between GPUs, gloo between CPU processes; objects always go
    over gloo."""
    if size == 1:
        set_tp_group(TensorParallelGroup(rank=0, size=1, group=None))
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast on shared hosts
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size)
    group = dist.group.WORLD
    cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else group
    set_tp_group(TensorParallelGroup(rank=rank, size=size, group=group, cpu_group=cpu_group))


def destroy_tensor_parallel() -> None:
    if _TP.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    set_tp_group(TensorParallelGroup(rank=0, size=1, group=None))


def tp_broadcast_object(obj: object = None) -> object:
    """Rank 0's `obj` on every rank (what rank 0 passes is returned to it unchanged)."""
    if _TP.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_TP.cpu_group)
    return box[0]


def tp_min(value: int) -> int:
    """The smallest of the ranks' values (every rank gets it)."""
    if _TP.size == 1:
        return value
    values: list = [None] * _TP.size
    dist.all_gather_object(values, value, group=_TP.cpu_group)
    return min(values)


def divide(numerator: int, denominator: int, what: str) -> int:
    """Exact division, or a ValueError naming what could not be split."""
    if numerator % denominator:
        raise ValueError(
            f"{what}: {numerator} is not divisible by tensor-parallel size {denominator}"
        )
    return numerator // denominator
