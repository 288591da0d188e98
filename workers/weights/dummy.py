"""Random weights at a real model's shapes, for benchmarks where the real checkpoint is absent.

Linear weights are N(0, 1/fan_in) so each projection keeps unit scale, norms are 1 and embeddings
N(0, 1): activations stay O(1) through every layer in bf16, and logits are O(1) too.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.config import ModelConfig

_OLMO2_COMMON = dict(
    architecture="Olmo2ForCausalLM",
    vocab_size=100352,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_theta=500000.0,
    tie_word_embeddings=False,
    bos_token_id=100257,
    eos_token_ids=(100257,),
    pad_token_id=100277,
)

# hidden, intermediate, layers, query heads, KV heads: Olmo 2's published configs
_OLMO2_SHAPES = {
    "olmo2-1b": (2048, 8192, 16, 16, 16),
    "olmo2-7b": (4096, 11008, 32, 32, 32),
    "olmo2-13b": (5120, 13824, 40, 40, 40),
    "olmo2-32b": (5120, 27648, 64, 40, 8),
}
DUMMY_MODELS = tuple(f"dummy:{name}" for name in _OLMO2_SHAPES)


def dummy_config(name: str, dtype: str = "bfloat16") -> ModelConfig:
    key = name.removeprefix("dummy:")
    if key not in _OLMO2_SHAPES:
        raise ValueError(f"model {name!r}: unknown dummy model; choose one of {DUMMY_MODELS}")
    hidden, intermediate, layers, heads, kv_heads = _OLMO2_SHAPES[key]
    return ModelConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        dtype=dtype,
        extra={"format": "dummy"},
        **_OLMO2_COMMON,
    )


@torch.no_grad()
def initialize_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Fill every parameter in place, each from its own seeded generator."""
    for index, (name, param) in enumerate(model.named_parameters()):
        generator = torch.Generator(device=param.device).manual_seed(seed * 1_000_003 + index)
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif param.dim() == 1:
            param.zero_()
        elif "embed_tokens" in name:
            param.normal_(0.0, 1.0, generator=generator)
        else:
            param.normal_(0.0, param.shape[1] ** -0.5, generator=generator)
