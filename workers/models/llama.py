"""Llama (Llama 2/3, SmolLM2): pre-norm blocks, grouped-query attention, tied embeddings.

The residual stream travels beside the blocks' outputs (as in vLLM) so that each add joins the
next norm: a layer gets (hidden, residual), the previous sublayer's output and the stream before
it, and each norm first adds them, s = hidden + residual, then normalises s:

    s = hidden + residual;  h = attn(input_layernorm(s))
    s = h + s;              h = mlp(post_attention_layernorm(s))    -> (h, s)

which is the textbook h = h + attn(norm(h)); h = h + mlp(norm(h)) with the adds moved, bit for
bit (the first layer has no residual yet; the stack's final norm does the last add).
"""

from __future__ import annotations

import torch
from torch import nn

from workers.config import ModelConfig
from workers.layers.attention import Attention
from workers.layers.fused import use_triton
from workers.layers.linear import QKVParallelLinear, RowParallelLinear
from workers.layers.mlp import GatedMLP
from workers.layers.norm import RMSNorm, ShardedRMSNorm
from workers.layers.rotary import RotaryStep, apply_rotary
from workers.models.base import CausalLM


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            config.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=config.attention_bias,
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * config.head_dim,
            config.hidden_size,
            bias=config.attention_bias,
        )
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, layer_index
        )

    def qk_norms(self) -> tuple[ShardedRMSNorm, ShardedRMSNorm] | None:
        """Hook for models that normalise q and k before RoPE; Llama does not."""
        return None

    def forward(self, hidden: torch.Tensor, rope: RotaryStep) -> torch.Tensor:
        return self.o_proj(self.attend(self.qkv_proj(hidden), rope))

    def attend(self, qkv: torch.Tensor, rope: RotaryStep) -> torch.Tensor:
        """The block from the QKV projection's output [T, (H + 2 * KVH) * D] to the attention
        output [T, H * D] that o_proj takes."""
        norms = self.qk_norms()
        if use_triton(qkv):
            return self.attn.forward_qkv(qkv, rope, norms)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if norms is not None:
            q, k = norms[0](q), norms[1](k)  # over the whole width: [T, H * D], [T, KVH * D]
        # q and k rotated together: [T, H + KVH, D]
        qk = apply_rotary(
            torch.cat((q, k), dim=-1).view(q.shape[0], -1, self.head_dim), rope.cos_sin
        )
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.view(-1, self.num_kv_heads, self.head_dim)  # [T, KVH, D]
        return self.attn(q, k, v)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, rope: RotaryStep
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # hidden: the last sublayer's output [T, hidden]; residual: the stream before it (None in
        # the first layer, whose hidden is the embedding) -> (this layer's MLP output, stream)
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.self_attn(hidden, rope)
        hidden, residual = self.post_attention_layernorm.add_and_norm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(CausalLM):
    decoder_layer = LlamaDecoderLayer
