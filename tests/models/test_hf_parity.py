"""Olmo 2 and Llama against transformers on tiny random checkpoints the tests create."""

from __future__ import annotations

import pytest
import torch
from checkpoints import COMMON, make_checkpoint
from paged import PagedSequences

from workers.weights.loader import load_model

transformers = pytest.importorskip("transformers")

PROMPT_LENGTHS = (5, 16, 17, 40)  # around and across 16-token block boundaries
NEW_TOKENS = 32

CASES = {
    "olmo2-mha": (
        "Olmo2",
        dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=500000.0),
        None,
    ),
    "olmo2-gqa": (
        "Olmo2",
        dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0),
        None,
    ),
    "olmo2-sharded": (
        "Olmo2",
        dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0),
        "60KB",
    ),
    "llama-tied-gqa": (
        "Llama",
        dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
        None,
    ),
    "llama3-rope-scaling": (
        "Llama",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
        None,
    ),
    "llama-untied-mha": (
        "Llama",
        dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
        "60KB",
    ),
}


def hf_greedy(hf_model, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(hf_model(ids).logits[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_greedy_match_transformers(tmp_path, case):
    family, overrides, shard_size = CASES[case]
    hf_model = make_checkpoint(tmp_path, family, overrides, shard_size)
    if shard_size:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("*.safetensors"))) > 1

    ours = load_model(str(tmp_path), dtype="float32")
    assert ours.config.architecture == f"{family}ForCausalLM"
    generator = torch.Generator().manual_seed(7)
    prompts = [
        torch.randint(0, COMMON["vocab_size"], (n,), generator=generator).tolist()
        for n in PROMPT_LENGTHS
    ]

    prompt_logits, outputs = PagedSequences(ours.model).greedy(prompts, NEW_TOKENS)

    start = 0
    for prompt, output in zip(prompts, outputs, strict=True):
        with torch.no_grad():
            expected = hf_model(torch.tensor([prompt])).logits[0]
        got = prompt_logits[start : start + len(prompt)]
        start += len(prompt)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        assert output == hf_greedy(hf_model, prompt, NEW_TOKENS)
