"""Request-level behaviour on the embedded SmolLM2: stops, limits, logprobs, bad input."""

from __future__ import annotations

import pytest
import torch
from paged import PagedSequences

from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams
from workers.weights.tokenizer import IncrementalDetokenizer

PROMPT = "Once upon a time, in a small village by the sea,"


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(device="cpu", kv_cache_gib=0.1)


def stream(engine: LLMEngine, prompt, params: SamplingParams):
    engine.add_request(prompt, params)
    deltas, outputs = [], []
    while engine.has_unfinished_requests():
        for output in engine.step():
            deltas.append(output.text_delta)
            outputs.append(output)
    return deltas, outputs


def greedy(**overrides) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 24, **overrides})


def test_stop_string_spanning_a_token_boundary(engine):
    [base] = engine.generate(PROMPT, greedy(ignore_eos=True))
    tokens, text = base.completions[0].token_ids, base.completions[0].text
    detokenizer = IncrementalDetokenizer(engine.tokenizer, base.prompt_token_ids, True)
    pieces = [detokenizer.add([t]) for t in tokens]
    for i in range(3, len(pieces) - 1):
        stop = pieces[i][-2:] + pieces[i + 1][:2]
        cut = sum(len(p) for p in pieces[: i + 1]) - 2
        if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2 and text.find(stop) == cut:
            break
    else:
        pytest.fail("no token boundary with two characters on each side")

    deltas, outputs = stream(engine, PROMPT, greedy(ignore_eos=True, stop=[stop]))
    assert "".join(deltas) == text[:cut]
    assert outputs[-1].finish_reason == "stop" and outputs[-1].stop_reason == stop

    [kept] = engine.generate(
        PROMPT, greedy(ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    )
    assert kept.completions[0].text == text[:cut] + stop


def test_max_tokens_and_streamed_text(engine):
    deltas, outputs = stream(engine, PROMPT, greedy(max_tokens=7, ignore_eos=True))
    assert outputs[-1].finish_reason == "length"
    assert sum(len(o.new_token_ids) for o in outputs) == 7
    [whole] = engine.generate(PROMPT, greedy(max_tokens=7, ignore_eos=True))
    assert "".join(deltas) == whole.completions[0].text
    assert "\ufffd" not in whole.completions[0].text


def test_eos_min_tokens_and_ignore_eos(engine):
    chat = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    [plain] = engine.generate(chat, greedy(max_tokens=40))
    answer = plain.completions[0]
    assert answer.finish_reason == "stop" and "Paris" in answer.text
    assert answer.token_ids[-1] in engine.eos_token_ids
    length = len(answer.token_ids)

    [longer] = engine.generate(chat, greedy(max_tokens=40, min_tokens=length + 2))
    assert len(longer.completions[0].token_ids) > length + 2
    assert not set(longer.completions[0].token_ids[: length + 2]) & engine.eos_token_ids

    [ignoring] = engine.generate(chat, greedy(max_tokens=40, ignore_eos=True))
    assert len(ignoring.completions[0].token_ids) == 40
    assert ignoring.completions[0].finish_reason == "length"


def test_stop_token_ids(engine):
    [base] = engine.generate(PROMPT, greedy(ignore_eos=True))
    third = base.completions[0].token_ids[2]
    first_at = base.completions[0].token_ids.index(third)
    [stopped] = engine.generate(PROMPT, greedy(ignore_eos=True, stop_token_ids=[third]))
    assert stopped.completions[0].token_ids == base.completions[0].token_ids[: first_at + 1]
    assert stopped.completions[0].stop_reason == third


def test_logprobs_and_prompt_logprobs_are_log_softmax_of_the_logits(engine):
    params = greedy(max_tokens=4, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    [result] = engine.generate(PROMPT, params)
    prompt, output = result.prompt_token_ids, result.completions[0].token_ids
    logits, _ = PagedSequences(engine.model).greedy([prompt + output[:-1]], 1)
    expected = torch.log_softmax(logits, dim=-1)  # row p predicts token p + 1

    assert len(result.prompt_logprobs) == len(prompt) and result.prompt_logprobs[0] is None
    for p, entry in enumerate(result.prompt_logprobs[1:]):
        assert entry.token_id == prompt[p + 1]
        assert entry.logprob == pytest.approx(float(expected[p, prompt[p + 1]]), abs=1e-4)
        assert len(entry.top) == 2
    for j, entry in enumerate(result.completions[0].logprobs):
        row = expected[len(prompt) - 1 + j]
        assert entry.token_id == output[j] and entry.rank == 1  # greedy picks the top token
        assert entry.logprob == pytest.approx(float(row.max()), abs=1e-4)
        assert [t for t, _ in entry.top] == row.topk(3).indices.tolist()


def test_bad_requests_fail_alone(engine):
    with pytest.raises(ValueError, match="prompt: must not be empty"):
        engine.add_request("", greedy())
    with pytest.raises(ValueError, match="context of 8192 tokens"):
        engine.add_request([1] * 8190, greedy(max_tokens=10))
    with pytest.raises(ValueError, match=r"token ids must be integers in \[0, 49152\)"):
        engine.add_request([1, 49152], greedy())
    with pytest.raises(ValueError, match="logit_bias"):
        engine.add_request("hi", greedy(logit_bias={60000: 1.0}))
    results = engine.generate(
        [PROMPT, "", [5] * 9000, PROMPT], greedy(max_tokens=5, ignore_eos=True)
    )
    assert [r.completions[0].finish_reason for r in results] == [
        "length",
        "error",
        "error",
        "length",
    ]
    assert "empty" in results[1].completions[0].error
    assert results[0].completions[0].token_ids == results[3].completions[0].token_ids
    assert engine.stats()["free_kv_blocks"] == engine.num_kv_blocks
