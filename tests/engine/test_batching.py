"""Continuous batching end to end: preemption, chunked prefill and prefix caching change nothing."""

from __future__ import annotations

import random

import pytest

from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams


def tiny_engine(path, **overrides) -> LLMEngine:
    return LLMEngine(model=str(path), device="cpu", **overrides)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def test_64_mixed_prompts_under_a_tiny_kv_budget_match_running_alone(tiny_llama_dir):
    rng = random.Random(5)
    lengths = [1, 600] + [rng.randint(1, 600) for _ in range(62)]
    prompts = [[rng.randrange(512) for _ in range(n)] for n in lengths]
    params = [greedy(rng.randint(4, 24)) for _ in prompts]

    engine = tiny_engine(
        tiny_llama_dir, num_kv_blocks=80, max_num_batched_tokens=256, max_num_seqs=32
    )
    batched = engine.generate(prompts, params)
    stats = engine.stats()
    assert stats["preemptions"] > 0
    assert stats["chunked_prefills"] > 0
    assert stats["free_kv_blocks"] == 80

    alone = tiny_engine(tiny_llama_dir, num_kv_blocks=80, enable_prefix_caching=False)
    for prompt, request_params, result in zip(prompts, params, batched, strict=True):
        [expected] = alone.generate([prompt], request_params)
        assert result.completions[0].token_ids == expected.completions[0].token_ids
        assert len(expected.completions[0].token_ids) == request_params.max_tokens


def test_shared_prefix_hits_the_cache_and_changes_nothing(tiny_llama_dir):
    rng = random.Random(6)
    prefix = [rng.randrange(512) for _ in range(200)]
    prompts = [prefix + [rng.randrange(512) for _ in range(rng.randint(1, 30))] for _ in range(16)]
    params = greedy(12)

    cached = tiny_engine(tiny_llama_dir, num_kv_blocks=400, max_num_batched_tokens=512)
    with_cache = [r.completions[0].token_ids for r in cached.generate(prompts[:1], params)]
    later = cached.generate(prompts[1:], params)
    with_cache += [r.completions[0].token_ids for r in later]
    # 200 shared tokens are 12 full blocks of 16: every later prompt finds them
    assert [r.usage.cached_tokens for r in later] == [192] * 15
    assert cached.stats()["prefix_hit_rate"] > 0.8

    uncached = tiny_engine(tiny_llama_dir, num_kv_blocks=400, enable_prefix_caching=False)
    without = [r.completions[0].token_ids for r in uncached.generate(prompts, params)]
    assert uncached.stats()["prefix_hit_rate"] == 0
    assert with_cache == without


def test_n_completions_share_the_prompt_blocks(tiny_llama_dir):
    engine = tiny_engine(tiny_llama_dir, num_kv_blocks=64)
    prompt = list(range(100, 170))  # 70 tokens: 4 full blocks
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)
    [result] = engine.generate([prompt], params)
    assert len(result.completions) == 4
    assert len({tuple(c.token_ids) for c in result.completions}) > 1
    assert engine.kv.prefix_hit_tokens == 3 * 64
    assert engine.stats()["free_kv_blocks"] == 64


def test_seeded_sampling_is_the_same_alone_and_in_a_batch_of_32(tiny_llama_dir):
    rng = random.Random(7)
    prompts = [[rng.randrange(512) for _ in range(rng.randint(5, 60))] for _ in range(32)]
    params = [
        SamplingParams(temperature=0.9, top_p=0.95, seed=1000 + i, max_tokens=10, ignore_eos=True)
        for i in range(32)
    ]
    engine = tiny_engine(tiny_llama_dir, num_kv_blocks=200)
    batched = engine.generate(prompts, params)
    for index in (0, 13, 31):
        [alone] = tiny_engine(tiny_llama_dir, num_kv_blocks=200).generate(
            [prompts[index]], params[index]
        )
        assert alone.completions[0].token_ids == batched[index].completions[0].token_ids


def test_abort_mid_generation_frees_every_block(tiny_llama_dir):
    engine = tiny_engine(tiny_llama_dir, num_kv_blocks=50)
    ids = [engine.add_request(list(range(1, 40 + i)), greedy(50)) for i in range(3)]
    for _ in range(5):
        engine.step()
    assert engine.stats()["free_kv_blocks"] < 50
    engine.abort(ids[1])
    outputs = engine.step()
    aborted = [o for o in outputs if o.request_id == ids[1]]
    assert aborted and aborted[0].finished and aborted[0].finish_reason == "abort"
    engine.abort(ids[0])
    engine.abort(ids[2])
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats()["free_kv_blocks"] == 50
    assert not engine.runner.states


def test_a_resumed_request_continues_where_it_stopped(tiny_llama_dir):
    prompt = list(range(7, 40))
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=20, ignore_eos=True)
    engine = tiny_engine(tiny_llama_dir, num_kv_blocks=32)
    [whole] = engine.generate([prompt], params)
    tokens = whole.completions[0].token_ids
    engine.add_request(prompt, params, request_id="again", resume_output_ids=tokens[:8])
    rest = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            rest += output.new_token_ids
    assert tokens[:8] + rest == tokens


def test_prompt_logprobs_survive_preemption_once(tiny_llama_dir):
    # the request asking for prompt logprobs is the newer one: it is the one preempted
    prompts = [list(range(200, 330)), list(range(1, 150))]
    params = [
        greedy(40),
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, prompt_logprobs=1),
    ]
    roomy = tiny_engine(tiny_llama_dir, num_kv_blocks=64)
    [_, expected] = roomy.generate(prompts, params)
    tight = tiny_engine(tiny_llama_dir, num_kv_blocks=20, max_num_batched_tokens=64)
    [_, got] = tight.generate(prompts, params)
    assert tight.stats()["preemptions"] > 0
    assert len(got.prompt_logprobs) == len(prompts[1])
    assert [e.token_id for e in got.prompt_logprobs[1:]] == prompts[1][1:]
    assert [e.logprob for e in got.prompt_logprobs[1:]] == pytest.approx(
        [e.logprob for e in expected.prompt_logprobs[1:]], abs=1e-4
    )
