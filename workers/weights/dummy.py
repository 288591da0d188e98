"""Random weights at a real model's shapes, for benchmarks where the real checkpoint is absent.

Linear weights are N(0, 1/fan_in) so each projection keeps unit scale, norms are 1 and embeddings
N(0, 1): activations stay O(1) through every layer in bf16, and logits are O(1) too. Tensors are
drawn whole, by HF name, and go through the model's own weight loaders like a checkpoint's.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

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


def dummy_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF-named weight of the architecture at the config's full (unsharded) shape."""
    hidden, q, kv = config.hidden_size, config.q_size, config.kv_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    olmo2 = config.architecture == "Olmo2ForCausalLM"
    norms = (
        ("post_attention_layernorm", "post_feedforward_layernorm")
        if olmo2
        else ("input_layernorm", "post_attention_layernorm")
    )
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        attn = {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden)}
        attn["o_proj"] = (hidden, q)
        if olmo2:
            attn.update(q_norm=(q,), k_norm=(kv,))
        shapes.update({f"{prefix}self_attn.{n}.weight": shape for n, shape in attn.items()})
        mlp = {"gate_proj": (config.intermediate_size, hidden)}
        mlp.update(up_proj=mlp["gate_proj"], down_proj=(hidden, config.intermediate_size))
        shapes.update({f"{prefix}mlp.{n}.weight": shape for n, shape in mlp.items()})
        shapes.update({f"{prefix}{n}.weight": (hidden,) for n in norms})
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def iter_dummy_weights(
    config: ModelConfig, seed: int = 0, device: torch.device | str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Seeded full tensors by HF name: every tensor-parallel rank draws the same model and the
    model's weight loaders keep each rank's slice."""
    dtype = config.torch_dtype
    for index, (name, shape) in enumerate(dummy_weight_shapes(config).items()):
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
        if len(shape) == 1:
            yield name, torch.ones(shape, dtype=dtype, device=device)
        else:
            std = 1.0 if "embed_tokens" in name else shape[1] ** -0.5
            weight = torch.empty(shape, dtype=dtype, device=device)
            yield name, weight.normal_(0.0, std, generator=generator)
