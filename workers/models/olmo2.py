"""Olmo 2: no input norm; each sublayer's output is normalised before it joins the residual.

    h = h + post_attention_layernorm(attn(h))
    h = h + post_feedforward_layernorm(mlp(h))

q_norm and k_norm are RMSNorms over the full q and k projections (all heads at once, before the
head split and RoPE); under tensor parallelism that norm spans every rank's shard.

A layer hands its last `h + norm(sublayer(h))` on unformed, as (norm, stream) in the residual
slot, and the projection that reads h next forms it with the fused norm-and-add kernel before
its matmul; under tensor parallelism that kernel takes the sublayer's all-reduce too where the
peer kernels can.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from workers.config import ModelConfig
from workers.layers.linear import form_stream
from workers.layers.mlp import GatedMLP
from workers.layers.norm import RMSNorm, ShardedRMSNorm
from workers.layers.rotary import RotaryStep
from workers.models.base import CausalLM
from workers.models.llama import LlamaAttention

if TYPE_CHECKING:
    from workers.layers.linear import PendingNorm


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
        self, hidden: torch.Tensor, pending: PendingNorm | None, rope: RotaryStep
    ) -> tuple[torch.Tensor, PendingNorm]:
        """hidden is the stream (the embedding: `pending` None) or the last layer's MLP partial
        sum, whose norm and add `pending` holds; each norm and add is formed by the projection
        after it (with the norm's kernel, which takes the sublayer's all-reduce too); returns the
        MLP's partial sum and its pending norm."""
        attn = self.self_attn
        stream, qkv = attn.qkv_proj.forward_stream(hidden, pending)
        o = attn.o_proj(attn.attend(qkv, rope), reduce=False)
        stream, gate_up = self.mlp.gate_up_proj.forward_stream(
            o, (self.post_attention_layernorm, stream)
        )
        return self.mlp.down(gate_up, reduce=False), (self.post_feedforward_layernorm, stream)


def stream_after(layer_output: tuple[torch.Tensor, PendingNorm]) -> torch.Tensor:
    """The residual stream after a layer, formed from what its forward returned (hooks that
    watch the stream)."""
    return form_stream(*layer_output)


class Olmo2ForCausalLM(CausalLM):
    decoder_layer = Olmo2DecoderLayer

    def reducing_post_norm(self) -> RMSNorm:
        return self.model.layers[0].post_attention_layernorm
