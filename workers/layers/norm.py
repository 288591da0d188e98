"""RMSNorm, computed in fp32 whatever the activation dtype, and its fused residual adds.

On CUDA the three forms run as one Triton kernel each (`kernels/rmsnorm.py`); the PyTorch code
below is the path elsewhere and the kernels' reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.distributed import tp_all_reduce, tp_all_reduce_rms_norm_add
from workers.layers.fused import use_triton
from workers.layers.linear import copy_checked


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden]; normalised and scaled in fp32, returned in x's dtype
        if use_triton(x):
            from kernels.rmsnorm import rms_norm

            return rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm: s = x + residual (in x's dtype); returns (norm(s), s).

        The Triton path writes s into `residual`'s storage and returns it.
        """
        if use_triton(x):
            from kernels.rmsnorm import add_rms_norm

            return add_rms_norm(x, residual, self.weight, self.eps)
        residual = x + residual
        return self(residual), residual

    def norm_and_add(
        self, x: torch.Tensor, residual: torch.Tensor, reduce: bool = False
    ) -> torch.Tensor:
        """Post-norm: residual + norm(x), norm(x) rounded to x's dtype before the add.

        `reduce`: x is this rank's partial sum (a row-parallel layer that left its all-reduce
        here); it is summed over the ranks first, in the same kernel where the peer kernels
        can take it. The residual is the stream the block started from, written before the
        kernels that made x: the peer kernel may read it before it waits for the one before."""
        if reduce:
            if use_triton(x):
                fused = tp_all_reduce_rms_norm_add(
                    x, residual, self.weight, self.eps, residual_settled=True
                )
                if fused is not None:
                    return fused
            x = tp_all_reduce(x)
        if use_triton(x):
            from kernels.rmsnorm import rms_norm_add

            return rms_norm_add(x, residual, self.weight, self.eps)
        return residual + self(x)


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a vector split across the tensor-parallel ranks (Olmo 2's QK-norm).

    Each rank holds `width` consecutive features of a `full_width` vector and the matching slice
    of the weight; the mean square is taken over the whole vector: each rank's sum of squares,
    all-reduced. A slice held by `replicas` ranks (K/V heads replicated when there are fewer of
    them than ranks) counts once.
    """

    def __init__(self, full_width: int, width: int, shard_index: int, replicas: int, eps: float):
        super().__init__()
        self.full_width, self.width = full_width, width
        self.shard_index, self.replicas = shard_index, replicas
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))
        self.weight.weight_loader = self.weight_loader

    @property
    def unsharded(self) -> bool:
        """This rank holds the whole vector: the norm needs no other rank's squares."""
        return self.width == self.full_width

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        copy_checked(param, loaded.narrow(0, self.shard_index * self.width, self.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, width], this rank's part of [T, full_width]
        x32 = x.float()
        squares = x32.pow(2).sum(-1, keepdim=True)  # [T, 1]
        if not self.unsharded:
            squares = tp_all_reduce(squares / self.replicas)
        x32 = x32 * torch.rsqrt(squares / self.full_width + self.eps)
        return (self.weight.float() * x32).to(x.dtype)
