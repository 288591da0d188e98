"""SamplingParams validation: every bad field is a ValueError that names the field."""

from __future__ import annotations

import dataclasses
import math

import pytest

from workers.engine.sampling_params import SamplingParams

BAD_VALUES = [
    ("n", 0),
    ("n", 129),
    ("n", 2.0),
    ("n", True),
    ("temperature", -0.1),
    ("temperature", 100.5),
    ("temperature", math.nan),
    ("temperature", "hot"),
    ("temperature", None),
    ("top_k", -2),
    ("top_k", 1.5),
    ("top_k", False),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", -0.5),
    ("top_p", math.nan),
    ("min_p", -0.01),
    ("min_p", 1.01),
    ("min_p", "0.1"),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", 10.5),
    ("repetition_penalty", math.inf),
    ("presence_penalty", -2.5),
    ("presence_penalty", 2.01),
    ("frequency_penalty", -3.0),
    ("frequency_penalty", 2.5),
    ("frequency_penalty", True),
    ("logit_bias", {-1: 1.0}),
    ("logit_bias", {5: 100.5}),
    ("logit_bias", {5: -101.0}),
    ("logit_bias", {"5": 1.0}),
    ("logit_bias", {5: "big"}),
    ("logit_bias", {True: 1.0}),
    ("logit_bias", [(5, 1.0)]),
    ("seed", -1),
    ("seed", 2**63),
    ("seed", 1.0),
    ("seed", "42"),
    ("max_tokens", 0),
    ("max_tokens", -5),
    ("max_tokens", 16.0),
    ("min_tokens", -1),
    ("min_tokens", 17),
    ("min_tokens", True),
    ("stop", ""),
    ("stop", ["ok", ""]),
    ("stop", ["ok", 3]),
    ("stop", 3),
    ("stop", None),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [1, 2.0]),
    ("stop_token_ids", 7),
    ("stop_token_ids", [True]),
    ("ignore_eos", 1),
    ("ignore_eos", "yes"),
    ("logprobs", -1),
    ("logprobs", 21),
    ("logprobs", 1.0),
    ("prompt_logprobs", -1),
    ("prompt_logprobs", 21),
    ("prompt_logprobs", True),
    ("skip_special_tokens", None),
    ("include_stop_str_in_output", 0),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_bad_value_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: ") as excinfo:
        SamplingParams(**{field: value})
    message = str(excinfo.value)
    # The message states what is allowed, not only that something is wrong.
    assert "must" in message


def test_message_names_the_range() -> None:
    with pytest.raises(ValueError, match=r"^top_p: must be in \(0, 1\], got 1.5$"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match=r"^temperature: must be in \[0, 100\], got -1"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match=r"^min_tokens: must be in \[0, 4\], got 5$"):
        SamplingParams(max_tokens=4, min_tokens=5)
    with pytest.raises(ValueError, match=r"^temperature: must be a number, got str 'hot'$"):
        SamplingParams(temperature="hot")


def test_defaults() -> None:
    params = SamplingParams()
    assert (params.n, params.temperature, params.top_k, params.top_p, params.min_p) == (
        1,
        1.0,
        0,
        1.0,
        0.0,
    )
    assert params.repetition_penalty == 1.0
    assert params.presence_penalty == params.frequency_penalty == 0.0
    assert params.logit_bias is None and params.seed is None
    assert (params.max_tokens, params.min_tokens) == (16, 0)
    assert params.stop == () and params.stop_token_ids == ()
    assert params.logprobs is None and params.prompt_logprobs is None
    assert params.skip_special_tokens is True
    assert params.ignore_eos is False and params.include_stop_str_in_output is False
    assert not params.is_greedy


def test_good_edge_values() -> None:
    params = SamplingParams(
        n=128,
        temperature=100,
        top_k=-1,
        top_p=1,
        min_p=1.0,
        repetition_penalty=10,
        presence_penalty=-2,
        frequency_penalty=2,
        logit_bias={0: -100, 7: 100.0},
        seed=2**63 - 1,
        max_tokens=1,
        min_tokens=1,
        logprobs=20,
        prompt_logprobs=0,
    )
    # Ints are accepted for float fields and stored as floats.
    assert isinstance(params.temperature, float) and params.temperature == 100.0
    assert isinstance(params.top_p, float)
    assert params.logit_bias == {0: -100.0, 7: 100.0}
    assert all(isinstance(v, float) for v in params.logit_bias.values())


@pytest.mark.parametrize(
    ("kwargs", "greedy"),
    [
        ({"temperature": 0.0}, True),
        ({"temperature": 0}, True),
        ({"top_k": 1}, True),
        ({"temperature": 0.01}, False),
        ({"top_k": 2}, False),
        ({"top_k": -1}, False),
    ],
)
def test_is_greedy(kwargs: dict, greedy: bool) -> None:
    assert SamplingParams(**kwargs).is_greedy is greedy


def test_stop_is_normalised_to_a_tuple() -> None:
    assert SamplingParams(stop="\n\n").stop == ("\n\n",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop=("x",)).stop == ("x",)
    assert SamplingParams(stop=[]).stop == ()
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)


def test_logit_bias_is_copied() -> None:
    bias = {3: 1.0}
    params = SamplingParams(logit_bias=bias)
    bias[4] = 2.0
    assert params.logit_bias == {3: 1.0}


def test_frozen() -> None:
    params = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 0.5  # type: ignore[misc]
    assert dataclasses.replace(params, temperature=0.0).is_greedy


def test_replace_validates_again() -> None:
    with pytest.raises(ValueError, match=r"^n: "):
        dataclasses.replace(SamplingParams(), n=0)


def test_validate_for_vocab() -> None:
    SamplingParams(logit_bias={99: 1.0}, stop_token_ids=[0, 99]).validate_for_vocab(100)
    with pytest.raises(ValueError, match=r"^logit_bias: token id must be in \[0, 100\), got 100$"):
        SamplingParams(logit_bias={100: 1.0}).validate_for_vocab(100)
    with pytest.raises(ValueError, match=r"^stop_token_ids: .*got 250$"):
        SamplingParams(stop_token_ids=[5, 250]).validate_for_vocab(100)
    SamplingParams().validate_for_vocab(1)
