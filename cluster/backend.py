"""What the gateway needs from the cluster behind it, and the errors it maps to gRPC codes.

The gateway owns text: it tokenizes prompts, renders chat templates, detokenizes the token
streams and matches stop strings (aborting the request when one appears). The backend owns
tokens: admission, dispatch to replicas, failover, and token-level stops (EOS, stop token ids,
max_tokens).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from workers.engine.outputs import RequestOutput, Usage
from workers.engine.sampling_params import SamplingParams
from workers.layers.sampler import TokenLogprobs
from workers.weights.tokenizer import Tokenizer


class QueueFullError(Exception):
    """The global admission queue is at its bound (gRPC RESOURCE_EXHAUSTED)."""


class NoReplicaError(Exception):
    """No replica is healthy (gRPC UNAVAILABLE)."""


@dataclass
class TokenEvent:
    """New tokens of one completion, as a replica's step produced them."""

    index: int
    """Which of the request's n completions."""
    token_ids: list[int]
    """Tokens generated since the last event of this completion."""
    logprobs: list[TokenLogprobs] | None = None
    """Per new token, when asked for."""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """With the first event, when asked for (None for the first prompt token)."""
    finished: bool = False
    """No more events for this completion."""
    finish_reason: str | None = None
    """stop, length, abort or error."""
    stop_reason: int | None = None
    """The stop token that ended it (stop strings are the gateway's)."""
    error: str | None = None
    """Why it failed, when finish_reason is error."""
    usage: Usage | None = None
    """Token counts, on the finishing event."""

    @classmethod
    def from_output(
        cls,
        output: RequestOutput,
        index: int,
        prompt_logprobs: list[TokenLogprobs | None] | None,
    ) -> TokenEvent:
        """The event of one engine output; a stop string (the gateway's) leaves no stop_reason."""
        return cls(
            index=index,
            token_ids=output.new_token_ids,
            logprobs=output.logprobs,
            prompt_logprobs=prompt_logprobs,
            finished=output.finished,
            finish_reason=output.finish_reason,
            stop_reason=output.stop_reason if isinstance(output.stop_reason, int) else None,
            error=output.error,
            usage=output.usage if output.finished else None,
        )


@dataclass(frozen=True)
class ModelCard:
    name: str
    architecture: str
    max_model_len: int
    vocab_size: int
    dtype: str


class Backend(Protocol):
    model: ModelCard
    tokenizer: Tokenizer

    def stream(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
    ) -> AsyncIterator[TokenEvent]:
        """Admit a request and yield its events until every completion has finished.

        Raises QueueFullError, NoReplicaError or ValueError (bad input, naming the field) before
        the first event. Closing the iterator early (the client went away, a stop string matched,
        the deadline passed) aborts the request and frees its blocks.
        """
        ...

    def server_info(self) -> dict:
        """Replicas (id, node, state, tp, KV blocks free/total, running, waiting, restarts) and
        totals, as `ServerInfoResponse` carries them."""
        ...
