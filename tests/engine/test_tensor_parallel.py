"""Tensor parallelism over gloo on CPU: tp = 2 and 4 give what tp = 1 gives; shutdown order."""

from __future__ import annotations

import pytest
from checkpoints import make_checkpoint

from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams

pytest.importorskip("transformers")

CASES = {
    "olmo2-mha": ("Olmo2", dict(num_attention_heads=4, num_key_value_heads=4)),
    # 2 KV heads over 4 ranks: each KV head and its slice of k_norm lives on two ranks
    "olmo2-gqa": ("Olmo2", dict(num_attention_heads=8, num_key_value_heads=2, vocab_size=322)),
    "llama-tied-gqa": (
        "Llama",
        dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    ),
}
PROMPTS = [list(range(5, 5 + n)) for n in (3, 17, 40)]


def run(path, tp: int, max_tokens: int = 32):
    engine = LLMEngine(model=str(path), device="cpu", tp=tp, num_kv_blocks=64)
    try:
        greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        tokens = [r.completions[0].token_ids for r in engine.generate(PROMPTS, greedy)]
        scored = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=5)
        prompt_logprobs = [r.prompt_logprobs[1:] for r in engine.generate(PROMPTS, scored)]
        return tokens, prompt_logprobs
    finally:
        engine.shutdown()


def assert_same(want_run, got_run, what: str) -> None:
    tokens, logprobs = want_run
    tp_tokens, tp_logprobs = got_run
    assert tp_tokens == tokens, what
    for want, got in zip(
        (e for seq in logprobs for e in seq),
        (e for seq in tp_logprobs for e in seq),
        strict=True,
    ):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert [t for t, _ in got.top] == [t for t, _ in want.top]
        assert [v for _, v in got.top] == pytest.approx([v for _, v in want.top], abs=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_tp_2_and_4_match_tp_1(tmp_path, case):
    family, overrides = CASES[case]
    make_checkpoint(tmp_path, family, overrides)
    reference = run(tmp_path, 1)
    for tp in (2, 4):
        assert_same(reference, run(tmp_path, tp), f"tp={tp}")
    engine = LLMEngine(model=str(tmp_path), device="cpu", tp=2, num_kv_blocks=16)
    try:  # every rank holds the whole embedding, unless the LM head shares it
        tied = overrides.get("tie_word_embeddings", False)
        assert engine.model.model.embed_tokens.replicated is not tied
    finally:
        engine.shutdown()


def test_olmo2_fused_kernels_at_tp_2_match_the_pytorch_path_at_tp_1(tmp_path, monkeypatch):
    """The fused prologue with the QK-norm's sums of squares all-reduced over the ranks (the
    kernels through the interpreter, on every rank) gives what one rank's PyTorch layers give."""
    from workers.layers import fused

    make_checkpoint(tmp_path, "Olmo2", CASES["olmo2-gqa"][1])
    reference = run(tmp_path, 1, max_tokens=8)
    monkeypatch.setenv("AFS_FORCE_TRITON", "1")  # for the spawned rank
    monkeypatch.setattr(fused, "FORCE_TRITON", True)
    assert_same(reference, run(tmp_path, 2, max_tokens=8), "tp=2, fused kernels")


def test_a_tp_that_does_not_divide_the_heads_is_refused(tmp_path):
    make_checkpoint(tmp_path, "Olmo2", dict(num_attention_heads=4, num_key_value_heads=4))
    with pytest.raises(ValueError, match="num_attention_heads: 4 is not divisible by .* 3"):
        LLMEngine(model=str(tmp_path), device="cpu", tp=3)


def test_embedded_gguf_split_three_ways_matches_one_rank():
    # 9 query and 3 KV heads: three ranks each read their heads' rows of the quantized file
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    results = []
    for tp in (1, 3):
        engine = LLMEngine(device="cpu", tp=tp, kv_cache_gib=0.02)
        try:
            [result] = engine.generate("The capital of France is", params)
            results.append(result.completions[0].token_ids)
        finally:
            engine.shutdown()
    assert results[0] == results[1]


def test_a_captured_collective_needs_peer_buffers_only_across_ranks(monkeypatch):
    # a stand-in for a CUDA tensor inside a graph being captured; no GPU needed to ask
    import types

    import torch

    from workers import distributed

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    x = types.SimpleNamespace(is_cuda=True, shape=(8, 4096), dtype=torch.bfloat16)
    one = distributed.TensorParallelGroup(rank=0, size=1, group=None)
    monkeypatch.setattr(distributed, "_TP", one)
    assert not distributed._peer_fit(x)  # one rank: nothing to reduce, nothing to refuse
    two = distributed.TensorParallelGroup(rank=0, size=2, group=None)
    monkeypatch.setattr(distributed, "_TP", two)
    monkeypatch.setattr(distributed, "_PEERS", None)
    with pytest.raises(RuntimeError, match="peer buffers"):
        distributed._peer_fit(x)


def test_the_roofline_of_a_rank_counts_its_shard(tmp_path):
    from workers.bench.ceilings import Roofline

    # 8 query heads and 2 KV heads: at tp = 2 a rank holds 4 and 1, and half the layer weights
    make_checkpoint(tmp_path, "Olmo2", dict(num_attention_heads=8, num_key_value_heads=2))
    ceilings = {"copy_gbps": 1.0}
    floors = {}
    for tp in (1, 2):
        engine = LLMEngine(model=str(tmp_path), device="cpu", tp=tp, num_kv_blocks=16)
        try:
            floors[tp] = Roofline.for_model(engine.model, engine.model_config, ceilings)
            config = engine.model_config
        finally:
            engine.shutdown()
    assert floors[1].kv_bytes_per_token == config.kv_bytes_per_token()
    assert floors[2].kv_bytes_per_token * 2 == floors[1].kv_bytes_per_token
    assert floors[1].attention_width == config.num_hidden_layers * config.q_size
    assert floors[2].attention_width * 2 == floors[1].attention_width
    assert floors[2].linear_params * 2 == floors[1].linear_params
    # the weights read in full: everything but the embedding's table (a rank's whole table at
    # tp = 2, read only at its tokens' rows): tp = 2 reads half of tp = 1's, but for the norms
    # every rank holds whole (fp32 here)
    embedding = config.vocab_size * config.hidden_size * 4
    norms = config.hidden_size * (2 * config.num_hidden_layers + 1) * 4
    layers, lm_head = floors[1].linear_params * 4, floors[1].lm_head_params * 4
    assert layers + lm_head < floors[1].weight_bytes < layers + lm_head + 2 * norms
    assert 0 <= floors[2].weight_bytes * 2 - floors[1].weight_bytes <= norms < embedding


def test_olmo2_at_tp_2_with_the_embedding_split_matches_tp_1(tmp_path, monkeypatch):
    """The embedding split over the ranks (each looks up its own rows, the rest summed in as
    zeros), as a tied embedding always is, against tp = 1."""
    from workers.models import base

    monkeypatch.setattr(base, "REPLICATED_EMBEDDING", False)
    monkeypatch.setenv("AFS_TP_REPLICATED_EMBEDDING", "0")  # the spawned rank's choice
    make_checkpoint(tmp_path, "Olmo2", dict(num_attention_heads=4, num_key_value_heads=4))
    engine = LLMEngine(model=str(tmp_path), device="cpu", tp=2, num_kv_blocks=64)
    try:
        assert not engine.model.model.embed_tokens.replicated
    finally:
        engine.shutdown()
    assert_same(run(tmp_path, 1, max_tokens=8), run(tmp_path, 2, max_tokens=8), "split")


def test_shutdown_tears_down_rank_0s_group_before_it_waits_for_the_followers(monkeypatch):
    """NCCL's teardown is collective: a follower's waits for rank 0's, so rank 0 must not wait
    for the follower to exit before it tears its own group down."""
    import workers.engine.llm_engine as module
    from workers.config import EngineConfig

    events = []

    class Follower:
        def join(self, timeout=None):
            events.append("join")

        def is_alive(self):
            return False

    monkeypatch.setattr(module, "get_tp_size", lambda: 2)
    monkeypatch.setattr(module, "shutdown_followers", lambda: events.append("stop"))
    monkeypatch.setattr(module, "destroy_tensor_parallel", lambda: events.append("teardown"))
    engine = LLMEngine.__new__(LLMEngine)  # the shutdown alone, no model
    engine.config, engine._followers = EngineConfig(tp=2), [Follower()]
    engine.shutdown()
    assert events == ["stop", "teardown", "join"]
