"""RMSNorm, computed in fp32 whatever the activation dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.distributed import tp_all_reduce
from workers.layers.linear import copy_checked


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden]; normalised and scaled in fp32, returned in x's dtype
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


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

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        copy_checked(param, loaded.narrow(0, self.shard_index * self.width, self.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, width], this rank's part of [T, full_width]
        x32 = x.float()
        squares = x32.pow(2).sum(-1, keepdim=True)  # [T, 1]
        if self.width != self.full_width:
            squares = tp_all_reduce(squares / self.replicas)
        x32 = x32 * torch.rsqrt(squares / self.full_width + self.eps)
        return (self.weight.float() * x32).to(x.dtype)
