"""Asynchronous scheduling: the next decode step is queued before this step's ids reach the host.

Whatever happens meanwhile (stops on the in-flight token, max_tokens, aborts, arrivals, a slab too
small for everyone), the engine must hand out the tokens, finish reasons and logprobs of the
synchronous engine, must really have run steps ahead (counted), and must leave every block free.
A request that arrives while a step is queued ahead joins one step later, so the batches (and the
last bits of fp32 matmuls over them) differ a little: logprobs are compared within 1e-4.
"""

from __future__ import annotations

import pytest

from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams

pytest.importorskip("transformers")


def _engine(model_dir, async_scheduling: bool, **overrides) -> LLMEngine:
    config = dict(model=str(model_dir), device="cpu", num_kv_blocks=256, detokenize=False)
    return LLMEngine(**{**config, **overrides}, async_scheduling=async_scheduling)


def _count_ahead(engine: LLMEngine) -> list[int]:
    counts, schedule_ahead = [], engine.scheduler.schedule_ahead

    def counting(previous):
        ahead = schedule_ahead(previous)
        if ahead is not None:
            counts.append(len(ahead.requests))
        return ahead

    engine.scheduler.schedule_ahead = counting
    return counts


def _run(engine: LLMEngine, arrivals: dict[int, list], aborts: dict[int, str]) -> dict:
    """Steps the engine to the end; requests arrive and are aborted at given step numbers."""
    finished, tokens, logprobs = {}, {}, {}
    step = 0
    while step in arrivals or engine.has_unfinished_requests() or step < max(arrivals):
        for request_id, prompt, params in arrivals.get(step, []):
            engine.add_request(prompt, params, request_id=request_id)
        if step in aborts:
            engine.abort(aborts[step])
        for output in engine.step():
            key = (output.request_id, output.index)
            tokens.setdefault(key, []).extend(output.new_token_ids)
            if output.logprobs:
                logprobs.setdefault(key, []).extend(
                    (lp.token_id, lp.logprob) for lp in output.logprobs
                )
            if output.finished:
                finished[key] = output.finish_reason
        step += 1
    return {"tokens": tokens, "finished": finished, "logprobs": logprobs}


def _prompt(seed: int, length: int) -> list[int]:
    return [(seed * 31 + 7 * j) % 500 + 3 for j in range(length)]


def _workload(stop_token: int) -> tuple[dict[int, list], dict[int, str]]:
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    arrivals = {
        0: [
            ("a", _prompt(1, 5), greedy),
            ("b", _prompt(2, 17), SamplingParams(temperature=0.0, max_tokens=3)),
            ("c", _prompt(3, 9), SamplingParams(temperature=0.0, max_tokens=30,
                                                 stop_token_ids=[stop_token])),
            ("d", _prompt(4, 12), SamplingParams(temperature=0.9, top_p=0.9, seed=5, n=2,
                                                 max_tokens=20, presence_penalty=0.5,
                                                 logprobs=2)),
            ("e", _prompt(5, 8), greedy),
        ],
        9: [("f", _prompt(6, 40), greedy)],  # arrives while the others decode
        14: [("g", _prompt(7, 3), SamplingParams(temperature=0.0, max_tokens=1))],
    }  # fmt: skip
    return arrivals, {6: "e"}


def test_async_engine_gives_the_synchronous_outputs(tiny_llama_dir):
    # a stop token that greedy decoding of request c actually reaches
    probe = _engine(tiny_llama_dir, False)
    [result] = probe.generate([_prompt(3, 9)], SamplingParams(temperature=0.0, max_tokens=30))
    stop_token = result.completions[0].token_ids[11]

    arrivals, aborts = _workload(stop_token)
    expected = _run(_engine(tiny_llama_dir, False), arrivals, aborts)
    engine = _engine(tiny_llama_dir, True)
    ahead = _count_ahead(engine)
    got = _run(engine, arrivals, aborts)

    assert got["tokens"] == expected["tokens"]
    assert got["finished"] == expected["finished"]
    assert got["logprobs"].keys() == expected["logprobs"].keys()
    for key, want in expected["logprobs"].items():
        assert [t for t, _ in got["logprobs"][key]] == [t for t, _ in want]
        assert [lp for _, lp in got["logprobs"][key]] == pytest.approx(
            [lp for _, lp in want], abs=1e-4
        )
    assert expected["finished"][("c", 0)] == "stop"  # stopped on a token that was in flight
    assert expected["finished"][("e", 0)] == "abort"
    assert expected["finished"][("b", 0)] == "length"
    assert len(ahead) > 20  # most decode steps were queued ahead
    assert engine.kv.pool.num_free_blocks == engine.kv.pool.num_blocks
    assert engine._in_flight is None


def test_async_engine_under_preemption(tiny_llama_dir):
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    arrivals = {0: [(f"r{i}", _prompt(i, 20 + 7 * i), params) for i in range(6)]}
    tight = dict(num_kv_blocks=14, max_num_batched_tokens=64)
    expected = _run(_engine(tiny_llama_dir, False, **tight), arrivals, {})
    engine = _engine(tiny_llama_dir, True, **tight)
    ahead = _count_ahead(engine)
    got = _run(engine, arrivals, {})
    assert got == expected
    assert engine.scheduler.num_preemptions > 0 and ahead
    assert engine.kv.pool.num_free_blocks == engine.kv.pool.num_blocks


def test_async_engine_at_tp_2_gives_the_synchronous_outputs(tiny_llama_dir):
    # the other rank runs each step built ahead with rank 0's draw broadcast to it
    probe = _engine(tiny_llama_dir, False)
    [result] = probe.generate([_prompt(3, 9)], SamplingParams(temperature=0.0, max_tokens=30))
    arrivals, aborts = _workload(result.completions[0].token_ids[11])
    runs, ahead = {}, []
    for async_scheduling in (False, True):
        engine = _engine(tiny_llama_dir, async_scheduling, tp=2)
        try:
            if async_scheduling:
                ahead = _count_ahead(engine)
            runs[async_scheduling] = _run(engine, arrivals, aborts)
            assert engine.kv.pool.num_free_blocks == engine.kv.pool.num_blocks
        finally:
            engine.shutdown()
    got, expected = runs[True], runs[False]
    assert got["tokens"] == expected["tokens"]
    assert got["finished"] == expected["finished"]
    for key, want in expected["logprobs"].items():
        assert [t for t, _ in got["logprobs"][key]] == [t for t, _ in want]
    assert len(ahead) > 20


def test_async_engine_with_stop_strings_on_the_embedded_model():
    # text and stop strings are matched as tokens arrive: a stop found on the in-flight token
    # must end the request exactly where the synchronous engine ends it
    prompts = ["The capital of France is", "Count: one, two,", "Water boils at"]
    params = [
        SamplingParams(temperature=0.0, max_tokens=40, stop=["."]),
        SamplingParams(
            temperature=0.0, max_tokens=40, stop=[" five"], include_stop_str_in_output=True
        ),
        SamplingParams(temperature=0.0, max_tokens=12),
    ]
    results = {}
    for async_scheduling in (False, True):
        engine = LLMEngine(device="cpu", async_scheduling=async_scheduling, num_kv_blocks=128)
        results[async_scheduling] = [
            (r.completions[0].text, r.completions[0].token_ids, r.completions[0].finish_reason)
            for r in engine.generate(prompts, params)
        ]
    assert results[True] == results[False]
    assert {reason for _, _, reason in results[False]} == {"stop", "length"}
