"""Tiny random HF checkpoints the tests create with transformers and `save_pretrained`."""

from __future__ import annotations

import torch

COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    initializer_range=0.2,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def make_checkpoint(path, family: str, overrides: dict, shard_size: str | None = None):
    """Save a random `{family}ForCausalLM` to `path`; norms moved off 1 so a skipped one shows."""
    import transformers

    config = getattr(transformers, f"{family}Config")(**{**COMMON, **overrides})
    torch.manual_seed(1234)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(path, **({"max_shard_size": shard_size} if shard_size else {}))
    return model
