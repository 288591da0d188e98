"""What the decoder-only models share: embedding, blocks, final norm, LM head, weight loading.

Forward contract: `forward(input_ids [T], positions [T]) -> hidden [T, H]` over the flattened new
tokens of every scheduled sequence (no padding, no batch dimension); `compute_logits(hidden[rows])`
for the rows that are sampled only. A decoder layer maps (hidden, residual, rope) to (hidden,
residual); see `DecoderStack.forward`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch
from torch import nn

from workers.config import ModelConfig
from workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from workers.layers.linear import default_weight_loader, form_stream
from workers.layers.norm import RMSNorm
from workers.layers.rotary import RotaryEmbedding

# checkpoint projection name -> (our fused parameter, shard id within it)
FUSED_PROJECTIONS = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
IGNORED_CHECKPOINT_SUFFIXES = ("rotary_emb.inv_freq",)
REPLICATED_EMBEDDING = os.environ.get("AFS_TP_REPLICATED_EMBEDDING", "1") != "0"
"""At tp > 1 every rank holds the whole token embedding (no all-reduce after the lookup), unless
the LM head shares its weight; AFS_TP_REPLICATED_EMBEDDING=0 splits it over the ranks."""


class DecoderStack(nn.Module):
    def __init__(
        self, config: ModelConfig, make_layer: Callable[[ModelConfig, int], nn.Module]
    ) -> None:
        super().__init__()
        # at tp > 1 each rank holds the whole table unless the LM head shares it
        replicated = REPLICATED_EMBEDDING and not config.tie_word_embeddings
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, replicated=replicated
        )
        self.layers = nn.ModuleList(make_layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, hidden]
        rope = self.rotary_emb(positions, hidden.dtype)
        # layers pass the residual stream beside hidden when the add belongs to the next norm
        # (Llama), or the (norm, stream) of a post-norm add left to the next layer (Olmo 2)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, rope)
        if residual is None:
            return self.norm(hidden)
        if isinstance(residual, tuple):
            return self.norm(form_stream(hidden, residual))
        return self.norm.add_and_norm(hidden, residual)[0]


class CausalLM(nn.Module):
    """A decoder stack and its LM head; subclasses name their decoder layer class."""

    decoder_layer: Callable[[ModelConfig, int], nn.Module]

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderStack(config, type(self).decoder_layer)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def reducing_post_norm(self) -> nn.Module | None:
        """A norm whose post-norm form takes a row-parallel layer's all-reduce (Olmo 2's), so
        that a worker can compile that peer kernel before serving; None for models without."""
        return None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [R, hidden] -> [R, vocab] in the model's dtype; the sampler widens to fp32
        # where it computes (a plain greedy row's argmax needs no copy: widening is exact)
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named checkpoint tensors into this rank's parameters; all must be covered."""
        params = dict(self.named_parameters())
        expected = set()
        for name in params:
            owner = name.rsplit(".", 2)[-2]
            shards = [s for fused, s in FUSED_PROJECTIONS.values() if fused == owner] or [None]
            expected.update((name, s) for s in shards)
        loaded = set()
        for checkpoint_name, tensor in weights:
            if checkpoint_name.endswith(IGNORED_CHECKPOINT_SUFFIXES):
                continue
            if checkpoint_name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            name, shard = _to_parameter_name(checkpoint_name)
            if name not in params:
                raise ValueError(
                    f"checkpoint weight {checkpoint_name!r} has no place in "
                    f"{self.config.architecture}"
                )
            param = params[name]
            param.checkpoint_name = checkpoint_name
            loader = getattr(param, "weight_loader", default_weight_loader)
            with torch.no_grad():
                loader(param, tensor, shard)
            loaded.add((name, shard))
        missing = sorted(n if s is None else f"{n}[{s}]" for n, s in expected - loaded)
        if missing:
            shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
            raise ValueError(f"checkpoint is missing {len(missing)} weights: {shown}")


def _to_parameter_name(checkpoint_name: str) -> tuple[str, str | int | None]:
    prefix, _, tail = checkpoint_name.rpartition(".")  # tail: weight or bias
    module_path, _, projection = prefix.rpartition(".")
    if projection in FUSED_PROJECTIONS:
        fused, shard = FUSED_PROJECTIONS[projection]
        return f"{module_path}.{fused}.{tail}", shard
    return checkpoint_name, None
