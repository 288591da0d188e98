"""One request's way through the gateway: proto sampling fields to `SamplingParams`, chat
messages, and the completions' text (a `TextStream` each) turned into response messages.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from cluster.backend import Backend, NoReplicaError, QueueFullError
from cluster.metrics import Metrics
from protos.afs.v1 import inference_pb2 as pb
from workers.engine.outputs import TextStream
from workers.engine.sampling_params import SamplingParams
from workers.layers.sampler import TokenLogprobs

_CHAT_ROLES = ("system", "user", "assistant", "tool")
_OPTIONAL_SAMPLING_FIELDS = (
    "n", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "seed", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs",
    "skip_special_tokens",
)  # fmt: skip


def sampling_params(proto: pb.SamplingParameters) -> SamplingParams:
    """Unset optional fields keep SamplingParams' defaults; bad values raise ValueError."""
    fields = {
        name: getattr(proto, name) for name in _OPTIONAL_SAMPLING_FIELDS if proto.HasField(name)
    }
    return SamplingParams(
        **fields,
        logit_bias=dict(proto.logit_bias) or None,
        stop=tuple(proto.stop),
        stop_token_ids=tuple(proto.stop_token_ids),
        ignore_eos=proto.ignore_eos,
        include_stop_str_in_output=proto.include_stop_str_in_output,
    )


def chat_messages(messages: Iterable[pb.ChatMessage]) -> list[dict]:
    checked = []
    for position, message in enumerate(messages):
        if message.role not in _CHAT_ROLES:
            raise ValueError(
                f"messages[{position}].role: must be one of {', '.join(_CHAT_ROLES)}, "
                f"got {message.role!r}"
            )
        checked.append({"role": message.role, "content": message.content})
    if not checked:
        raise ValueError("messages: must not be empty")
    return checked


def _logprob(entry: TokenLogprobs) -> pb.Logprob:
    top = [pb.TopLogprob(token_id=token_id, logprob=value) for token_id, value in entry.top]
    return pb.Logprob(token_id=entry.token_id, logprob=entry.logprob, rank=entry.rank, top=top)


@dataclass(frozen=True)
class Prepared:
    """A validated request: what the backend gets."""

    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class _Completion:
    text: TextStream
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[pb.Logprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str = ""
    last_token_at: float | None = None


class CompletionStreams:
    """One request's n completions: text, stop strings, responses and client-side timings."""

    def __init__(
        self,
        backend: Backend,
        metrics: Metrics,
        prepared: Prepared,
        request_id: str,
        arrival: float,
    ) -> None:
        self.backend, self.metrics = backend, metrics
        self.prompt_ids, self.params = prepared.prompt_ids, prepared.params
        self.request_id, self.arrival = request_id, arrival
        self.completions = [
            _Completion(TextStream(backend.tokenizer, self.params, self.prompt_ids))
            for _ in range(self.params.n)
        ]
        self.prompt_logprobs: list[pb.Logprob] | None = None
        self.cached_tokens = 0
        self.first_token_seen = False

    async def responses(self, priority: int) -> AsyncIterator[pb.GenerateResponse]:
        """Responses until every completion has finished; leaving early aborts the request."""
        events = self.backend.stream(self.request_id, self.prompt_ids, self.params, priority)
        rejected = False
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    response = self._on_event(event)
                    if response is not None:
                        yield response
                    if all(c.finish_reason is not None for c in self.completions):
                        return
            # The backend ended the stream early: every completion still gets its end.
            for index, completion in enumerate(self.completions):
                if completion.finish_reason is None:
                    completion.finish_reason = "abort"
                    yield self._response(index, [], [], True)
        except (QueueFullError, NoReplicaError, ValueError):
            rejected = True
            raise
        finally:
            if not rejected:
                self.metrics.observe_finished(
                    time.perf_counter() - self.arrival,
                    len(self.prompt_ids),
                    sum(len(c.token_ids) for c in self.completions),
                    [c.finish_reason or "abort" for c in self.completions],
                )

    def _on_event(self, event) -> pb.GenerateResponse | None:
        completion = self.completions[event.index]
        if completion.finish_reason is not None:
            return None  # cut by a stop string earlier; the backend has not seen it yet
        now = time.perf_counter()
        kept = self._add_tokens(completion, event.token_ids)
        logprobs = [_logprob(entry) for entry in (event.logprobs or ())[: len(kept)]]
        completion.logprobs += logprobs
        if event.usage is not None:
            self.cached_tokens = event.usage.cached_tokens
        self._observe_tokens(completion, len(kept), now)
        if completion.text.stop_reason is not None:
            completion.finish_reason, completion.stop_reason = "stop", completion.text.stop_reason
        elif event.finished:
            completion.finish_reason = event.finish_reason or "stop"
            if completion.finish_reason == "error":
                completion.stop_reason = event.error or "the engine failed this completion"
            elif event.stop_reason is not None:
                completion.stop_reason = str(event.stop_reason)
            # The engine flushes an incomplete tail only when no stop ended the completion.
            if completion.finish_reason != "stop":
                completion.text.finish()
        finished = completion.finish_reason is not None
        response = self._response(event.index, kept, logprobs, finished)
        if self.prompt_logprobs is None and event.prompt_logprobs:
            # The first prompt token has no logprob: nothing comes before it.
            self.prompt_logprobs = [_logprob(e) for e in event.prompt_logprobs if e is not None]
            response.prompt_logprobs.extend(self.prompt_logprobs)
        return response

    def _add_tokens(self, completion: _Completion, token_ids: list[int]) -> list[int]:
        """Detokenize token by token as the engine does; tokens after a stop string are dropped."""
        kept: list[int] = []
        for token_id in token_ids:
            kept.append(token_id)
            # stop strings count only once min_tokens tokens are out
            can_stop = len(completion.token_ids) + len(kept) > self.params.min_tokens
            if completion.text.add([token_id], can_stop):
                break
        completion.token_ids += kept
        return kept

    def _observe_tokens(self, completion: _Completion, count: int, now: float) -> None:
        if not count:
            return
        if not self.first_token_seen:
            self.first_token_seen = True
            self.metrics.observe_first_token(now - self.arrival)
        if completion.last_token_at is not None:
            self.metrics.observe_token_gap(now - completion.last_token_at)
        # Tokens that arrive together in one event reach the client with no gap between them.
        for _ in range(count - 1):
            self.metrics.observe_token_gap(0.0)
        completion.last_token_at = now

    def _response(
        self, index: int, token_ids: list[int], logprobs: list[pb.Logprob], finished: bool
    ) -> pb.GenerateResponse:
        completion = self.completions[index]
        response = pb.GenerateResponse(
            request_id=self.request_id,
            index=index,
            token_ids=token_ids,
            text=completion.text.delta(finished),
            logprobs=logprobs,
            finished=finished,
        )
        if finished:
            response.finish_reason = completion.finish_reason or ""
            response.stop_reason = completion.stop_reason
            response.usage.CopyFrom(self._usage(len(completion.token_ids)))
        return response

    def _usage(self, completion_tokens: int) -> pb.Usage:
        return pb.Usage(
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=completion_tokens,
            cached_tokens=self.cached_tokens,
        )

    def result(self) -> pb.GenerateResult:
        """The whole request, once `responses` has run to its end."""
        completions = [
            pb.Completion(
                index=index,
                text=c.text.text,
                token_ids=c.token_ids,
                logprobs=c.logprobs,
                finish_reason=c.finish_reason or "",
                stop_reason=c.stop_reason,
            )
            for index, c in enumerate(self.completions)
        ]
        return pb.GenerateResult(
            request_id=self.request_id,
            completions=completions,
            usage=self._usage(sum(len(c.token_ids) for c in self.completions)),
            prompt_logprobs=self.prompt_logprobs or [],
        )
