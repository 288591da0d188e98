"""Per-request sampling parameters, validated when built.

Every bad field raises `ValueError` naming the field and its allowed range (DESIGN.md, Errors):
the gateway turns it into `INVALID_ARGUMENT`, the CLI into exit code 2. Nothing is clamped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAX_N = 128
MAX_LOGPROBS = 20
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 10.0
MAX_ABS_PENALTY = 2.0
MAX_ABS_LOGIT_BIAS = 100.0
SEED_LIMIT = 2**63


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but True is never a meaningful count or id.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float)


def _check_int(name: str, value: Any, low: int, high: int | None = None, *, what: str = "") -> None:
    """`what` names the part of a container field being checked ("token id ")."""
    if not _is_int(value):
        raise ValueError(f"{name}: {what}must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}: {what}must be {allowed}, got {value}")


def _check_float(
    name: str, value: Any, low: float, high: float, *, low_open: bool = False, what: str = ""
) -> float:
    """Check a float field and return it as a float (ints are accepted: 1 means 1.0)."""
    if not _is_number(value):
        kind = type(value).__name__
        raise ValueError(f"{name}: {what}must be a number, got {kind} {value!r}")
    above_low = value > low if low_open else value >= low
    # Written so that NaN fails too: every comparison with NaN is False.
    if not (above_low and value <= high):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name}: {what}must be in {bracket}{low:g}, {high:g}], got {value}")
    return float(value)


def _as_tuple(name: str, value: Any) -> tuple[Any, ...]:
    """A str becomes a 1-tuple; lists, tuples and other sequences become tuples."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and not isinstance(value, bytes):
        return tuple(value)
    raise ValueError(f"{name}: must be a list or tuple, got {type(value).__name__} {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How one request draws its tokens and when it stops."""

    n: int = 1
    """Number of independent completions for the prompt, 1..128."""
    temperature: float = 1.0
    """Divides the logits before sampling, 0..100; 0 means greedy (argmax)."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 or -1 turns it off."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability is >= top_p, (0, 1]."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's, [0, 1]."""
    repetition_penalty: float = 1.0
    """For tokens in prompt or output (HF rule): logit > 0 → logit / p, else logit * p; (0, 10]."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already in the output, [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it occurs in the output, [-2, 2]."""
    logit_bias: dict[int, float] | None = None
    """Added to the logits of the given token ids before anything else, values in [-100, 100]."""
    seed: int | None = None
    """Makes the draws reproducible, 0 <= seed < 2**63; None lets the engine pick one."""
    max_tokens: int = 16
    """Most tokens to generate, >= 1."""
    min_tokens: int = 0
    """EOS and stop_token_ids cannot be drawn before this many tokens, 0..max_tokens."""
    stop: tuple[str, ...] = ()
    """Strings that end generation, matched on the text by the gateway; a str or list is fine."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation, besides the model's EOS."""
    ignore_eos: bool = False
    """Keep generating past EOS (until max_tokens or a stop condition); for benchmarks."""
    logprobs: int | None = None
    """Return each sampled token's logprob and its top-N alternatives, 0..20 (0: sampled only)."""
    prompt_logprobs: int | None = None
    """Return the logprob and top-N alternatives of every prompt token, 0..20."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the detokenized text."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1, MAX_N)
        for name, low, high, low_open in (
            ("temperature", 0.0, MAX_TEMPERATURE, False),
            ("top_p", 0.0, 1.0, True),
            ("min_p", 0.0, 1.0, False),
            ("repetition_penalty", 0.0, MAX_REPETITION_PENALTY, True),
            ("presence_penalty", -MAX_ABS_PENALTY, MAX_ABS_PENALTY, False),
            ("frequency_penalty", -MAX_ABS_PENALTY, MAX_ABS_PENALTY, False),
        ):
            value = _check_float(name, getattr(self, name), low, high, low_open=low_open)
            object.__setattr__(self, name, value)
        if not _is_int(self.top_k):
            raise ValueError(
                f"top_k: must be an int, got {type(self.top_k).__name__} {self.top_k!r}"
            )
        if self.top_k < -1:
            raise ValueError(f"top_k: must be 0 or -1 (off) or >= 1, got {self.top_k}")
        self._check_logit_bias()
        if self.seed is not None:
            _check_int("seed", self.seed, 0, SEED_LIMIT - 1)
        _check_int("max_tokens", self.max_tokens, 1)
        _check_int("min_tokens", self.min_tokens, 0, self.max_tokens)
        stop = _as_tuple("stop", self.stop)
        for text in stop:
            if not isinstance(text, str) or not text:
                raise ValueError(f"stop: every stop string must be a non-empty str, got {text!r}")
        object.__setattr__(self, "stop", stop)
        stop_token_ids = _as_tuple("stop_token_ids", self.stop_token_ids)
        for token_id in stop_token_ids:
            _check_int("stop_token_ids", token_id, 0, what="token id ")
        object.__setattr__(self, "stop_token_ids", stop_token_ids)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0, MAX_LOGPROBS)
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                value = getattr(self, name)
                raise ValueError(f"{name}: must be a bool, got {type(value).__name__} {value!r}")

    def _check_logit_bias(self) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            kind = type(self.logit_bias).__name__
            raise ValueError(f"logit_bias: must be a dict of token id to bias, got {kind}")
        for token_id, bias in self.logit_bias.items():
            _check_int("logit_bias", token_id, 0, what="token id ")
            _check_float("logit_bias", bias, -MAX_ABS_LOGIT_BIAS, MAX_ABS_LOGIT_BIAS, what="bias ")
        # A private copy with float values: the caller's dict may change after validation.
        bias_copy = {token_id: float(bias) for token_id, bias in self.logit_bias.items()}
        object.__setattr__(self, "logit_bias", bias_copy)

    def validate_for_vocab(self, vocab_size: int) -> None:
        """Check the token ids in logit_bias and stop_token_ids against the model's vocabulary."""
        for name, ids in (
            ("logit_bias", self.logit_bias or ()),
            ("stop_token_ids", self.stop_token_ids),
        ):
            for token_id in ids:
                if token_id >= vocab_size:
                    raise ValueError(
                        f"{name}: token id must be in [0, {vocab_size}), got {token_id}"
                    )

    @property
    def is_greedy(self) -> bool:
        """Argmax decoding: no randomness, so the seed does not matter."""
        return self.temperature == 0.0 or self.top_k == 1
