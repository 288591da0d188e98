"""The embedded SmolLM2-135M-Instruct GGUF against transformers' own GGUF loader."""

from __future__ import annotations

import pytest
import torch
from paged import PagedSequences

from workers.weights.gguf import embedded_gguf_path
from workers.weights.loader import DEFAULT_MODEL, load_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ours():
    return load_model(DEFAULT_MODEL, dtype="float32")


@pytest.fixture(scope="module")
def reference():
    path = embedded_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


def test_config_from_metadata(ours):
    config = ours.config
    assert config.architecture == "LlamaForCausalLM"
    assert (config.hidden_size, config.num_hidden_layers) == (576, 30)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings
    assert config.extra["tensor_types"]  # Q4_1 linears and a Q8_0 embedding, as the file says


def test_logits_match_transformers(ours, reference):
    prompt = ours.tokenizer.encode("The quick brown fox jumps over the lazy dog. 1234567 ü 日本")
    prompt_logits, _ = PagedSequences(ours.model).greedy([prompt], 1)
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(prompt_logits, expected, atol=2e-4, rtol=1e-4)


def test_greedy_chat_answer_names_paris(ours, reference):
    tokenizer = ours.tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
    )
    prompt = tokenizer.encode(text)
    _, [output] = PagedSequences(ours.model).greedy([prompt], 24)
    answer = tokenizer.decode(output, skip_special_tokens=True)
    assert "Paris" in answer
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None
        )[0, len(prompt) :].tolist()
    assert output == expected
