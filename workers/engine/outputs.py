"""What the engine returns per step, and the text side of a request: detokenization and stops.

Stop strings are matched on the incrementally detokenized text. While a request runs, the last
(longest stop string - 1) characters are held back, so a streamed delta never contains the start
of a stop string that the next token completes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from workers.engine.sampling_params import SamplingParams
from workers.layers.sampler import TokenLogprobs
from workers.weights.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class Usage:
    prompt_tokens: int
    """Tokens in the prompt."""
    completion_tokens: int
    """Tokens generated so far."""
    cached_tokens: int
    """Prompt tokens whose K/V came from the prefix cache."""


@dataclass
class RequestOutput:
    request_id: str
    """The id given to `add_request`."""
    index: int
    """Which of the request's n completions this is."""
    new_token_ids: list[int]
    """Tokens generated this step."""
    text_delta: str
    """Text those tokens completed (held back near possible stop strings)."""
    finished: bool
    """No more outputs will come for this completion."""
    finish_reason: str | None
    """stop, length, abort or error, once finished."""
    usage: Usage
    """Token counts so far."""
    logprobs: list[TokenLogprobs] | None = None
    """Per new token, when asked for."""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """With the first output, when asked for: None for the first prompt token, then one each."""
    stop_reason: str | int | None = None
    """The stop string or stop token that ended it, if one did."""
    error: str | None = None
    """Why it failed, when finish_reason is error."""


@dataclass
class Completion:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprobs] | None = None
    error: str | None = None


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    completions: list[Completion]
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    usage: Usage | None = None


@dataclass
class TextStream:
    """Detokenizes one completion and finds its stop strings."""

    tokenizer: Tokenizer | None
    params: SamplingParams
    prompt_token_ids: list[int]
    text: str = ""
    emitted: int = 0
    stop_reason: str | None = None
    detokenizer: IncrementalDetokenizer | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.tokenizer is not None:
            self.detokenizer = IncrementalDetokenizer(
                self.tokenizer, self.prompt_token_ids, self.params.skip_special_tokens
            )
        self.hold_back = max((len(s) for s in self.params.stop), default=1) - 1

    def add(self, token_ids: list[int], can_stop: bool = True) -> bool:
        """Append tokens' text; True when a stop string appeared (text is cut there)."""
        if self.detokenizer is None or not token_ids:
            return False
        searched_from = max(0, len(self.text) - self.hold_back)
        self.text += self.detokenizer.add(token_ids)
        if not self.params.stop or not can_stop:
            return False
        found = [(self.text.find(s, searched_from), s) for s in self.params.stop]
        found = [(at, s) for at, s in found if at >= 0]
        if not found:
            return False
        at, stop = min(found)
        self.text = self.text[: at + (len(stop) if self.params.include_stop_str_in_output else 0)]
        self.stop_reason = stop
        return True

    def finish(self) -> None:
        """At the end of a completion not cut by a stop string, the incomplete tail shows too."""
        if self.detokenizer is not None and self.stop_reason is None:
            self.text += self.detokenizer.flush()

    def delta(self, finished: bool) -> str:
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.hold_back)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
