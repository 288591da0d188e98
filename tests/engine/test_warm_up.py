"""The engine's warm-up: which steps it makes up, and that it leaves nothing behind."""

from __future__ import annotations

import pytest
from checkpoints import make_checkpoint

import workers.distributed as distributed
from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams
from workers.engine.warm_up import ALONE_LENGTHS, plan

pytest.importorskip("transformers")

PROMPTS = [list(range(5, 5 + n)) for n in (3, 17, 40)]


def lengths(waves) -> list[list[int]]:
    return [[len(a.prompt) for a in wave] for wave in waves]


def test_the_plan_covers_each_class_of_step_that_fits():
    waves = plan(1000, 4096, 8192, 16, 128, prefix_caching=True, kv_tokens=1 << 20)
    alone = [wave[0] for wave in waves if len(wave) == 1 and wave[0].after_steps == 0]
    assert {len(a.prompt) for a in alone} >= set(ALONE_LENGTHS)
    assert any(len(wave) > 1 and any(a.after_steps for a in wave) for wave in waves)  # mixed
    sampled = [a.params for wave in waves for a in wave]
    assert any(p.temperature == 0 for p in sampled) and any(p.top_k for p in sampled)
    assert any(p.n > 1 for p in sampled) and any(p.prompt_logprobs is not None for p in sampled)
    # a cached prefix of three blocks, then prompts that go past it by 1, 17 and 32 tokens
    prefix = next(w[0].prompt for w in waves if len(w) == 1 and len(w[0].prompt) == 48)
    longer = [a.prompt for wave in waves for a in wave if a.prompt[:48] == prefix]
    assert sorted(len(p) for p in longer) == [48, 48, 49, 65, 80]
    assert all(len(a.prompt) < 8192 for wave in waves for a in wave)  # no chunk: 4096 context
    assert all(0 < len(a.prompt) < 4096 for wave in waves for a in wave)
    assert all(a.prompt and max(a.prompt) < 1000 for wave in waves for a in wave)


def test_the_plan_keeps_to_the_context_the_slab_the_budget_and_the_batch():
    waves = plan(50, 100, 32, 16, 4, prefix_caching=False, kv_tokens=1000)
    assert all(len(a.prompt) + a.params.max_tokens <= 100 for wave in waves for a in wave)
    small_slab = plan(50, 100, 32, 16, 4, prefix_caching=False, kv_tokens=60)
    assert max(len(a.prompt) + a.params.max_tokens for w in small_slab for a in w) <= 60
    assert [32 + 17] in lengths(waves)  # a prompt chunked: past the budget, inside the context
    assert all(len(wave) <= 4 for wave in waves)
    assert 48 not in [n for wave in lengths(waves) for n in wave]  # no prefix waves


def generate(engine: LLMEngine):
    sampled = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)  # engine's seeds
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    results = engine.generate(PROMPTS, sampled) + engine.generate(PROMPTS, greedy)
    return [(r.request_id, r.completions[0].token_ids) for r in results]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("olmo2")
    make_checkpoint(path, "Olmo2", dict(num_attention_heads=4, num_key_value_heads=4))
    return path


def build(path, tp: int = 1, warm_up: bool = True) -> LLMEngine:
    return LLMEngine(
        model=str(path), device="cpu", tp=tp, num_kv_blocks=64, max_num_batched_tokens=64,
        max_num_seqs=8, warm_up=warm_up,
    )  # fmt: skip


def test_a_warmed_up_engine_serves_as_a_cold_one_and_keeps_nothing(checkpoint):
    cold = build(checkpoint, warm_up=False)
    assert cold.warm_up_report is None
    want = generate(cold)
    warm = build(checkpoint)
    report = warm.warm_up_report
    assert report["waves"] >= len(ALONE_LENGTHS) and report["steps"] > report["waves"]
    stats = warm.stats()
    assert stats["free_kv_blocks"] == stats["num_kv_blocks"] == 64
    assert (stats["running"], stats["waiting"], stats["preemptions"]) == (0, 0, 0)
    assert (stats["chunked_prefills"], stats["prefix_hit_rate"]) == (0, 0.0)
    assert warm.runner.states == {}  # the ranks' runners forgot every warm-up request
    # the same ids, and the same draws from the seeds the engine hands out
    assert generate(warm) == want


def test_a_warm_up_at_tp_2_ends_the_lockstep_on_every_rank(checkpoint):
    want = generate(build(checkpoint, warm_up=False))
    engine = build(checkpoint, tp=2)
    try:
        assert not distributed._LOCKSTEP["on"]
        assert generate(engine) == want  # the follower took rank 0's word and went on
    finally:
        engine.shutdown()


def test_the_lockstep_limit_keeps_the_served_limit_class(monkeypatch):
    """In lockstep the peer calls wait longer, with a limit Triton specialises as it does the
    default one (1, a multiple of 16, or neither), so nothing compiles twice."""
    import kernels.peer_collectives as peer

    monkeypatch.setitem(distributed._LOCKSTEP, "on", True)
    for served, lockstep in [
        (1 << 26, distributed.LOCKSTEP_SPINS),
        (1000, distributed.LOCKSTEP_SPINS + 1),
        (1, 1),
        ((1 << 31) - 1, (1 << 31) - 1),
    ]:
        monkeypatch.setattr(peer, "MAX_SPINS", served)
        assert distributed._spins() == lockstep
    monkeypatch.setitem(distributed._LOCKSTEP, "on", False)
    assert distributed._spins() == (1 << 31) - 1
