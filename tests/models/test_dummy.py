"""Dummy models: Olmo 2's real shapes, and random weights that stay finite in bf16."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from paged import PagedSequences

from workers.models.olmo2 import stream_after
from workers.weights.dummy import dummy_config, dummy_weight_shapes, iter_dummy_weights
from workers.weights.loader import build_model

# Olmo 2's published parameter counts
PUBLISHED = {"olmo2-1b": 1.48e9, "olmo2-7b": 7.30e9, "olmo2-13b": 13.7e9, "olmo2-32b": 32.2e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_dummy_configs_have_the_published_size(name):
    config = dummy_config(f"dummy:{name}")
    model = build_model(config, "meta")
    parameters = sum(p.numel() for p in model.parameters())
    # the dummy weights name exactly the checkpoint tensors the model loads
    assert sum(torch.Size(s).numel() for s in dummy_weight_shapes(config).values()) == parameters
    assert abs(parameters / PUBLISHED[name] - 1) < 0.01
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_dummy_weights_are_seeded():
    config = dataclasses.replace(
        dummy_config("dummy:olmo2-1b"),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        vocab_size=100,
    )
    first, second, other = (build_model(config, "cpu") for _ in range(3))
    first.load_weights(iter_dummy_weights(config, seed=3))
    second.load_weights(iter_dummy_weights(config, seed=3))
    other.load_weights(iter_dummy_weights(config, seed=4))
    for a, b, c in zip(first.parameters(), second.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
        assert a.dim() == 1 or not torch.equal(a, c)


def test_activations_stay_finite_through_64_bf16_layers():
    config = dataclasses.replace(
        dummy_config("dummy:olmo2-32b"),
        hidden_size=256,
        intermediate_size=1024,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=1000,
    )
    assert config.num_hidden_layers == 64 and config.torch_dtype == torch.bfloat16
    model = build_model(config, "cpu")
    model.load_weights(iter_dummy_weights(config, seed=0))
    rms = []

    for layer in model.model.layers:
        layer.register_forward_hook(
            lambda m, args, out: rms.append(stream_after(out).float().pow(2).mean().sqrt())
        )
    prompts = [torch.randint(0, 1000, (n,)).tolist() for n in (3, 40)]
    prompt_logits, outputs = PagedSequences(model).greedy(prompts, 4)
    rms = torch.stack(rms)
    assert torch.isfinite(rms).all() and torch.isfinite(prompt_logits).all()
    assert rms.max() < 64  # the residual stream grows like sqrt(layers), not exponentially
    assert 0.1 < prompt_logits.std() < 10
