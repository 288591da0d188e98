"""The attention layer models call: it reshapes heads and hands off to the current backend."""

from __future__ import annotations

import torch
from torch import nn

from workers.forward_context import get_forward_context


class Attention(nn.Module):
    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, layer_index: int
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.layer_index = layer_index

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, KVH, D] -> [T, H * D]
        context = get_forward_context()
        out = context.backend.forward(
            q, k, v, context.kv_caches[self.layer_index], context.attn_metadata, self.scale
        )
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
