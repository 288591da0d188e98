"""Olmo 2: no input norm; each sublayer's output is normalised before it joins the residual.

    h = h + post_attention_layernorm(attn(h))
    h = h + post_feedforward_layernorm(mlp(h))

q_norm and k_norm are RMSNorms over the full q and k projections (all heads at once, before the
head split and RoPE); under tensor parallelism that norm spans every rank's shard.

hidden is the whole residual stream here, so a layer passes no separate residual (it stays None);
each `h + norm(sublayer(h))` is one fused norm-and-add, and under tensor parallelism the
sublayer's all-reduce joins that kernel too where the peer kernels can take it.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.config import ModelConfig
from workers.layers.mlp import GatedMLP
from workers.layers.norm import RMSNorm, ShardedRMSNorm
from workers.layers.rotary import RotaryStep
from workers.models.base import CausalLM
from workers.models.llama import LlamaAttention


class Olmo2Attention(LlamaAttention):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__(config, layer_index)
        qkv, eps = self.qkv_proj, config.rms_norm_eps
        self.q_norm = ShardedRMSNorm(
            config.num_attention_heads * config.head_dim, self.q_size, qkv.tp_rank, 1, eps
        )
        self.k_norm = ShardedRMSNorm(
            config.num_key_value_heads * config.head_dim,
            self.kv_size,
            qkv.kv_shard_index,
            qkv.kv_replicas,
            eps,
        )

    def qk_norms(self) -> tuple[ShardedRMSNorm, ShardedRMSNorm]:
        return self.q_norm, self.k_norm


class Olmo2DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.self_attn = Olmo2Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, hidden: torch.Tensor, residual: None, rope: RotaryStep
    ) -> tuple[torch.Tensor, None]:
        # hidden: the residual stream [T, hidden]; each sublayer's all-reduce is left to the norm
        # after it, which fuses the two where it can
        attn = self.self_attn(hidden, rope, reduce=False)
        hidden = self.post_attention_layernorm.norm_and_add(attn, hidden, reduce=True)
        mlp = self.mlp(hidden, reduce=False)
        return self.post_feedforward_layernorm.norm_and_add(mlp, hidden, reduce=True), None


class Olmo2ForCausalLM(CausalLM):
    decoder_layer = Olmo2DecoderLayer
