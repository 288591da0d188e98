"""The engine's config: the step's token budget and the largest step the memory profile runs."""

import pytest
import torch

from workers.config import EngineConfig
from workers.engine.memory import largest_step


def test_the_token_budget_defaults_by_device_and_a_given_one_wins():
    assert EngineConfig().token_budget(torch.device("cuda")) == 8192
    assert EngineConfig().token_budget(torch.device("cpu")) == 2048
    given = EngineConfig(max_num_batched_tokens=512)
    for device in ("cuda", "cpu"):
        assert given.token_budget(torch.device(device)) == 512


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_a_bad_token_budget_is_refused(bad):
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(max_num_batched_tokens=bad)


def test_the_largest_step_spans_the_budget_in_prompts_the_model_can_hold():
    assert largest_step(8192, 4096, 128) == [4096, 4096]
    assert largest_step(8192, 3000, 128) == [3000, 3000, 2192]
    assert largest_step(2048, 4096, 128) == [2048]
    assert largest_step(8192, 100, 4) == [100, 100, 100, 100]  # no more prompts than max_num_seqs
