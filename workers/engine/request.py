"""The state of one request inside the engine."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from workers.engine.sampling_params import SamplingParams


def check_prompt_ids(token_ids: Sequence, vocab_size: int) -> list[int]:
    """The prompt's ids as a list, or a ValueError naming the ones outside the vocabulary."""
    token_ids = list(token_ids)
    bad = [
        t
        for t in token_ids
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size
    ]
    if bad:
        raise ValueError(f"prompt: token ids must be integers in [0, {vocab_size}), got {bad[:5]}")
    return token_ids


def check_prompt_fits(num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """A prompt must have a token, and it and max_tokens must fit in the model's context."""
    if not num_prompt_tokens:
        raise ValueError("prompt: must not be empty")
    if num_prompt_tokens + max_tokens > max_model_len:
        raise ValueError(
            f"prompt: {num_prompt_tokens} prompt tokens + max_tokens={max_tokens} exceed "
            f"the model's context of {max_model_len} tokens"
        )


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


@dataclass(eq=False)
class Request:
    request_id: str
    """Unique inside the engine; a child of an n > 1 request is '<parent id>#<index>'."""
    prompt_token_ids: list[int]
    """The prompt, tokenized."""
    params: SamplingParams
    """How to sample and when to stop."""
    seed: int
    """The seed every random draw of this request is derived from (given or assigned)."""
    arrival_index: int
    """Order of arrival: the scheduler preempts the newest first."""
    parent_id: str | None = None
    """For n > 1: the id the user gave; children share its prompt."""
    index: int = 0
    """For n > 1: which of the n completions this is."""
    leader: Request | None = None
    """For n > 1: the sibling whose prompt blocks the others reuse; they wait for its prefill."""
    output_token_ids: list[int] = field(default_factory=list)
    """Tokens sampled so far."""
    num_computed_tokens: int = 0
    """Tokens whose K/V are in the slab; catches up to num_tokens."""
    num_cached_tokens: int = 0
    """Prompt tokens found in the prefix cache when the request was (last) admitted."""
    num_preemptions: int = 0
    """Times its blocks were taken back and its tokens recomputed."""
    status: RequestStatus = RequestStatus.WAITING
    """Where the request is in its life."""
    error: str | None = None
    """Why it finished with an error, if it did."""
    block_hashes: list[bytes] = field(default_factory=list)
    """Chained hashes of its full blocks, extended as tokens arrive (they never change)."""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without building the whole list."""
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len : end - prompt_len]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - prompt_len]
