"""The attention layer models call: it reshapes heads and hands off to the current backend.

`forward_qkv` is the fused path (Triton): QK-norm, RoPE and the K/V store of the new tokens in one
kernel (`kernels/rope.py`) straight from the fused projection, then the backend only attends; a
decode step, where the backend can, runs all of it inside its decode kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.distributed import tp_qk_sum_squares
from workers.forward_context import get_forward_context
from workers.layers.norm import ShardedRMSNorm
from workers.layers.rotary import RotaryStep


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

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_stored: bool = False
    ) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, KVH, D] -> [T, H * D]; kv_stored: k and v are in the slab already
        context = get_forward_context()
        out = context.backend.forward(
            q,
            k,
            v,
            context.kv_caches[self.layer_index],
            context.attn_metadata,
            self.scale,
            kv_stored=kv_stored,
        )
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def forward_qkv(
        self,
        qkv: torch.Tensor,
        rope: RotaryStep,
        qk_norms: tuple[ShardedRMSNorm, ShardedRMSNorm] | None,
    ) -> torch.Tensor:
        """qkv [T, (H + 2 * KVH) * D] -> [T, H * D], through the fused Triton prologue.

        Sharded qk_norms (their width split over the ranks) take one all-reduce of each token's
        two sums of squares, the k sums divided by the ranks that hold the same k heads.
        """
        from kernels.rope import rotary_qkv

        context = get_forward_context()
        norm = {}
        if qk_norms is not None:
            q_norm, k_norm = qk_norms
            norm = dict(q_norm_weight=q_norm.weight, k_norm_weight=k_norm.weight, eps=q_norm.eps)
            if not (q_norm.unsharded and k_norm.unsharded):
                norm["qk_squares"] = tp_qk_sum_squares(
                    qkv, self.num_heads, self.num_kv_heads, self.head_dim, 1.0 / k_norm.replicas
                )
                norm["norm_widths"] = (q_norm.full_width, k_norm.full_width)
        kv_cache = context.kv_caches[self.layer_index]
        rope_args = (rope.positions, rope.cos_cache, rope.sin_cache)
        out = context.backend.decode_qkv(
            qkv, self.num_heads, self.num_kv_heads, rope_args, norm, kv_cache,
            context.attn_metadata, self.scale,
        )  # fmt: skip
        if out is not None:  # [T, H, D]
            return out.reshape(qkv.shape[0], self.num_heads * self.head_dim)
        q, k, v = rotary_qkv(
            qkv,
            self.num_heads,
            self.num_kv_heads,
            *rope_args,
            **norm,
            kv_cache=kv_cache,
            slot_mapping=context.attn_metadata.slot_mapping,
        )  # q: [T, H, D]; k, v: [T, KVH, D]
        return self(q, k, v, kv_stored=True)
