"""The batched sampler: one row of logits per request sampled this step.

Processing order, each step applied to the rows whose parameters ask for it:

    logit bias → repetition penalty → presence penalty → frequency penalty
    → min_tokens mask (EOS and stop_token_ids) → vocabulary mask (ids >= sampleable_vocab_size)
    → greedy rows: argmax
    → other rows: temperature → top-k → top-p → min-p → the draw

The draw is an exponential race: token = argmax(probs / E) with E = -log U ~ Exp(1) i.i.d. per
token picks token i with probability probs[i]; it is computed in log space (Gumbel-max). U comes
from a `torch.Generator` seeded from a hash of (request seed, output position), one row at a time,
so a token is a pure function of the request's logits, parameters, seed and position: the same
alone or in any batch, and after preemption or failover. CPU and CUDA generators give different
numbers, so a replay must stay on one device type. The per-row generator costs one kernel launch
a row (about 13 us on an H200); a counter-based RNG in a Triton kernel would remove it.

Logprobs are `log_softmax` of the RAW logits given to the sampler (before penalties, bias,
temperature and filtering) over the sampleable vocabulary: the model's own belief, as OpenAI and
vLLM report it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from workers.engine.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


@dataclass
class SamplingBatch:
    """What the model runner hands the sampler each step: one entry per sampled row."""

    params: list[SamplingParams]
    """Each row's request parameters."""
    seeds: list[int]
    """Each row's seed: the user's, or one the engine drew (n > 1 siblings get distinct seeds)."""
    output_positions: list[int]
    """Index in the request's output of the token being drawn (= output tokens before it)."""
    prompt_token_ids: list[list[int]]
    """Each row's prompt, for the repetition penalty."""
    output_token_ids: list[list[int]]
    """Tokens generated so far, for the penalties."""

    def __post_init__(self) -> None:
        rows = len(self.params)
        for name in ("seeds", "output_positions", "prompt_token_ids", "output_token_ids"):
            if len(getattr(self, name)) != rows:
                raise ValueError(
                    f"{name}: must have one entry per row ({rows}), got {len(getattr(self, name))}"
                )


@dataclass
class TokenLogprobs:
    """The logprob of one chosen token, its rank and the top-N alternatives."""

    token_id: int
    logprob: float
    rank: int
    """1 = the most likely token; 1 + the number of tokens strictly more likely."""
    top: list[tuple[int, float]]
    """(token id, logprob) of the N most likely tokens, most likely first."""


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor
    """[R] int64 on the logits' device."""
    logprobs: list[TokenLogprobs | None]
    """Per row; None where the request did not ask for logprobs."""


def _to_device(values: list | np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values on the device without making the host wait for the GPU stream."""
    tensor = torch.as_tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _splitmix64(x: int) -> int:
    """Steele et al.'s SplitMix64 finaliser: a bijective 64-bit mix."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def draw_seed(seed: int, position: int) -> int:
    """The generator seed for one draw: a hash of (request seed, output position)."""
    return _splitmix64((_splitmix64(seed) + position) & _MASK64)


def _token_index(
    row_lists: list[list[int]], rows: list[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors (row, token id) for every token of row_lists[k], placed on row rows[k]."""
    lengths = [len(tokens) for tokens in row_lists]
    # numpy reads long Python lists about ten times faster than torch.tensor does.
    row_index = np.repeat(np.asarray(rows, dtype=np.int64), lengths)
    token_ids = np.fromiter(chain.from_iterable(row_lists), dtype=np.int64, count=sum(lengths))
    return _to_device(row_index, torch.long, device), _to_device(token_ids, torch.long, device)


def apply_penalties_and_bias(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Logit bias, then repetition, presence and frequency penalties; returns a new tensor."""
    out = logits.clone()  # [R, V]
    device = out.device
    biased = [i for i, p in enumerate(batch.params) if p.logit_bias]
    if biased:
        index = _token_index([list(batch.params[i].logit_bias) for i in biased], biased, device)
        biases = [b for i in biased for b in batch.params[i].logit_bias.values()]
        out.index_put_(index, _to_device(biases, out.dtype, device), accumulate=True)

    penalised = [
        i
        for i, p in enumerate(batch.params)
        if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
    ]
    if not penalised:
        return out
    params = [batch.params[i] for i in penalised]
    num_rows, vocab = len(penalised), out.shape[1]
    # Output counts for every penalised row; prompts only matter for the repetition penalty.
    outputs = [batch.output_token_ids[i] for i in penalised]
    counts = torch.zeros(num_rows, vocab, dtype=out.dtype, device=device)  # [P, V]
    one = torch.ones((), dtype=out.dtype, device=device)
    counts.index_put_(_token_index(outputs, list(range(num_rows)), device), one, accumulate=True)
    in_output = counts > 0  # [P, V]
    repeating = [j for j, p in enumerate(params) if p.repetition_penalty != 1.0]
    prompts = [batch.prompt_token_ids[penalised[j]] for j in repeating]
    seen = in_output.clone()  # [P, V]
    seen[_token_index(prompts, repeating, device)] = True

    def column(values: list[float]) -> torch.Tensor:
        return _to_device(values, out.dtype, device).unsqueeze(1)  # [P, 1]

    repetition = column([p.repetition_penalty for p in params])
    presence = column([p.presence_penalty for p in params])
    frequency = column([p.frequency_penalty for p in params])
    row_index = _to_device(penalised, torch.long, device)
    x = out.index_select(0, row_index)  # [P, V]
    # HF repetition penalty, for tokens in prompt or output: logit > 0 → logit / p, else logit * p.
    x = torch.where(seen, torch.where(x > 0, x / repetition, x * repetition), x)
    # OpenAI penalties over the output: presence once per seen token, frequency once per occurrence.
    x = x - presence * in_output - frequency * counts
    return out.index_copy_(0, row_index, x)


def mask_tokens_(
    logits: torch.Tensor,
    batch: SamplingBatch,
    eos_token_ids: tuple[int, ...],
    sampleable_vocab_size: int,
) -> torch.Tensor:
    """In place: forbid EOS and stop_token_ids before min_tokens, and ids past the real vocab."""
    # The position of the token being drawn is the number of output tokens before it.
    early = [i for i, p in enumerate(batch.params) if batch.output_positions[i] < p.min_tokens]
    if early:
        banned = [[*eos_token_ids, *batch.params[i].stop_token_ids] for i in early]
        logits[_token_index(banned, early, logits.device)] = -math.inf
    logits[:, sampleable_vocab_size:] = -math.inf  # [R, V - sampleable]: padding ids
    return logits


def _filter_top_k_top_p(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """x: [F, V] scaled logits; top_k: [F] (V when off); top_p: [F]. Returns x with -inf holes."""
    sorted_x, order = x.sort(dim=-1, descending=True)  # [F, V]
    rank = torch.arange(x.shape[1], device=x.device)  # [V]
    # top-k: keep the k most likely tokens.
    remove = rank.unsqueeze(0) >= top_k.unsqueeze(1)  # [F, V]
    sorted_x = sorted_x.masked_fill(remove, -math.inf)
    # top-p: keep the smallest prefix whose probability is >= p, i.e. drop a token once the mass
    # before it already reaches p. The first token has mass 0 before it, so at least one is kept;
    # rows with p == 1 are left alone so float rounding in the cumsum never drops a token.
    probs = sorted_x.softmax(dim=-1)  # [F, V]
    mass_before = probs.cumsum(dim=-1) - probs  # [F, V]
    remove = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    sorted_x = sorted_x.masked_fill(remove, -math.inf)
    return torch.empty_like(x).scatter_(1, order, sorted_x)  # back to vocabulary order


def _gather_logprobs(
    raw_logits: torch.Tensor, token_ids: torch.Tensor, top_ns: list[int]
) -> list[TokenLogprobs]:
    """Logprobs of token_ids [N] under raw_logits [N, V], their ranks and the top-N, on the host."""
    logprobs = raw_logits.float().log_softmax(dim=-1)  # [N, V]
    chosen = logprobs.gather(1, token_ids.view(-1, 1))  # [N, 1]
    ranks = (logprobs > chosen).sum(dim=-1) + 1  # [N]
    top_values, top_ids = logprobs.topk(max(top_ns, default=0), dim=-1)  # [N, max_n], sorted
    results = []
    for token_id, logprob, rank, values, ids, top_n in zip(
        token_ids.tolist(),
        chosen.squeeze(1).tolist(),
        ranks.tolist(),
        top_values.tolist(),
        top_ids.tolist(),
        top_ns,
        strict=True,
    ):
        top = list(zip(ids[:top_n], values[:top_n], strict=True))
        results.append(TokenLogprobs(token_id, logprob, rank, top))
    return results


def prompt_logprobs(
    logits: torch.Tensor,
    next_token_ids: torch.Tensor,
    top_n: int,
    sampleable_vocab_size: int | None = None,
) -> list[TokenLogprobs]:
    """Logprob of each next prompt token under the raw logits of the position before it.

    logits: [P, V]; next_token_ids: [P]. Ids >= sampleable_vocab_size are left out of the softmax.
    """
    if next_token_ids.shape != logits.shape[:1]:
        raise ValueError(
            f"next_token_ids: must be [{logits.shape[0]}], got {list(next_token_ids.shape)}"
        )
    raw = logits[:, :sampleable_vocab_size]  # [P, V']
    return _gather_logprobs(raw, next_token_ids.to(torch.long), [top_n] * logits.shape[0])


class Sampler:
    """Draws one token per row from [R, V] logits under each row's SamplingParams."""

    def __init__(
        self,
        vocab_size: int,
        sampleable_vocab_size: int | None,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        self.vocab_size = vocab_size
        self.sampleable_vocab_size = sampleable_vocab_size or vocab_size
        if not 0 < self.sampleable_vocab_size <= vocab_size:
            raise ValueError(
                f"sampleable_vocab_size: must be in [1, {vocab_size}], got {sampleable_vocab_size}"
            )
        self.eos_token_ids = tuple(eos_token_ids)
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        expected = (len(batch.params), self.vocab_size)
        if logits.shape != expected:
            raise ValueError(f"logits: must be {list(expected)}, got {list(logits.shape)}")
        logits = logits.float()  # [R, V]
        num_rows, device = logits.shape[0], logits.device
        processed = apply_penalties_and_bias(logits, batch)  # [R, V]
        mask_tokens_(processed, batch, self.eos_token_ids, self.sampleable_vocab_size)

        token_ids = torch.empty(num_rows, dtype=torch.long, device=device)  # [R]
        greedy = [i for i, p in enumerate(batch.params) if p.is_greedy]
        sampled = [i for i, p in enumerate(batch.params) if not p.is_greedy]
        if greedy:
            greedy_index = _to_device(greedy, torch.long, device)
            chosen = processed.index_select(0, greedy_index).argmax(dim=-1)  # [G]
            token_ids.index_copy_(0, greedy_index, chosen)
        if sampled:
            sampled_index = _to_device(sampled, torch.long, device)
            x = processed.index_select(0, sampled_index)  # [S, V]
            token_ids.index_copy_(0, sampled_index, self._draw(x, batch, sampled))

        wanted = [i for i, p in enumerate(batch.params) if p.logprobs is not None]
        logprobs: list[TokenLogprobs | None] = [None] * num_rows
        if wanted:
            wanted_index = _to_device(wanted, torch.long, device)
            raw = logits.index_select(0, wanted_index)[:, : self.sampleable_vocab_size]  # [L, V']
            top_ns = [batch.params[i].logprobs for i in wanted]
            chosen_ids = token_ids.index_select(0, wanted_index)  # [L]
            for i, result in zip(wanted, _gather_logprobs(raw, chosen_ids, top_ns), strict=True):
                logprobs[i] = result
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)

    def _draw(self, x: torch.Tensor, batch: SamplingBatch, rows: list[int]) -> torch.Tensor:
        """x: [S, V] processed logits of the non-greedy rows; returns their token ids [S]."""
        params = [batch.params[i] for i in rows]
        device, vocab = x.device, x.shape[1]
        # Row max to 0: min-p below relies on it, and a tiny temperature then sends the other
        # logits to -inf instead of overflowing to inf. Dividing by a temperature of 1 is exact.
        x = x - x.amax(dim=-1, keepdim=True)  # [S, V]
        temperatures = [p.temperature for p in params]
        if any(t != 1.0 for t in temperatures):
            x = x / _to_device(temperatures, x.dtype, device).unsqueeze(1)  # [S, V]

        filtered = [j for j, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1.0]
        if filtered:
            index = _to_device(filtered, torch.long, device)
            top_k = [params[j].top_k if 0 < params[j].top_k < vocab else vocab for j in filtered]
            top_p = [params[j].top_p for j in filtered]
            x = x.index_copy(
                0,
                index,
                _filter_top_k_top_p(
                    x.index_select(0, index),  # [F, V]
                    _to_device(top_k, torch.long, device),
                    _to_device(top_p, x.dtype, device),
                ),
            )

        if any(p.min_p > 0.0 for p in params):
            # min-p: drop p_i < min_p * p_max, i.e. x_i < log(min_p) since x_max is 0 and top-k/p
            # keep the top token; min_p = 0 gives log 0 = -inf, which drops nothing.
            log_min_p = [math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params]
            x = x.masked_fill(x < _to_device(log_min_p, x.dtype, device).unsqueeze(1), -math.inf)

        # Exponential race in log space (the Gumbel-max trick): with U ~ Uniform[0, 1) i.i.d. per
        # token, argmax_i x_i - log(-log U_i) picks token i with probability softmax(x)_i. No
        # softmax, only argmax: a row's token never depends on the other rows, bit for bit.
        # U = 0 gives -inf, never NaN.
        noise = torch.empty_like(x)  # [S, V]
        generator = self._generator(device)
        for row, i in enumerate(rows):
            generator.manual_seed(draw_seed(batch.seeds[i], batch.output_positions[i]))
            noise[row].uniform_(generator=generator)
        gumbel = noise.log_().neg_().log_().neg_()  # [S, V]
        return (x + gumbel).argmax(dim=-1)  # [S]

    def _generator(self, device: torch.device) -> torch.Generator:
        # One generator per device, re-seeded before every row's draw.
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]
