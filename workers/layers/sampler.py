"""The batched sampler: one row of logits per request sampled this step.

Processing order, each step applied to the rows whose parameters ask for it:

    logit bias → repetition penalty → presence penalty → frequency penalty
    → min_tokens mask (EOS and stop_token_ids) → vocabulary mask (ids >= sampleable_vocab_size)
    → greedy rows: argmax
    → other rows: temperature → top-k → top-p → min-p → the draw

Top-k, top-p and min-p each come down to a cut-off logit per row, and the row keeps the tokens at
or above the highest of them; tokens tied with the cut-off are all kept, so the kept set depends on
the logits alone, never on how a sort orders ties. Rows with top-k find the cut-off among their
`topk(max_k)`; only rows with top-p and no top-k sort the whole vocabulary.

The draw is an exponential race: token = argmax(probs / E) with E = -log U ~ Exp(1) i.i.d. per
token picks token i with probability probs[i]; it is computed in log space (Gumbel-max). U comes
from a counter-based generator: U[row, token] is the token-th output of SplitMix64 seeded with a
hash of (request seed, output position), computed for the whole [S, V] block in a few integer
tensor ops, with no per-row launch and no host-device sync. So a token is a pure function of the
request's logits, parameters, seed and position: the same alone or in any batch, and after
preemption or failover. The uniforms are the same bits on CPU and CUDA, so a replay may even move
to another device type (the tokens then match as far as the logits and `log` do).

Nothing in a step waits for the device: host lists reach it through pinned non-blocking copies and
no op has a data-dependent shape. The caller's read of the token ids is the step's one sync;
logprobs, when a request asks for them, add another.

Every argmax (greedy rows, the race) runs on CUDA as `kernels/argmax.py`, which spreads a row over
many programs (PyTorch's reduction gives a row one block); it returns torch.argmax's index.

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

from workers.layers.fused import use_triton

if TYPE_CHECKING:
    from workers.engine.sampling_params import SamplingParams


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """[R, V] to the [R] indices of each row's largest value, as torch.argmax(x, dim=-1): on CUDA
    (or with the kernels forced) through kernels/argmax.py, else torch's."""
    if use_triton(x):
        from kernels.argmax import argmax, fits

        if fits(x):
            return argmax(x)
    return x.argmax(dim=-1)


_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MIX_ROUNDS = ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB))
"""SplitMix64's xor-shift-multiply rounds, (shift, multiplier); its last xor-shift is by 31."""
_UNIFORM_BITS = 24
"""Bits of each hash that make a uniform: float32's significand, so k * 2**-24 is exact."""


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


def to_device(values: list | np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values on the device without making the host wait for the GPU stream."""
    tensor = torch.as_tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _splitmix64(x: int) -> int:
    """Steele et al.'s SplitMix64 finaliser: a bijective 64-bit mix."""
    x = (x + _GOLDEN_GAMMA) & _MASK64
    for shift, multiplier in _MIX_ROUNDS:
        x = ((x ^ (x >> shift)) * multiplier) & _MASK64
    return x ^ (x >> 31)


def draw_seed(seed: int, position: int) -> int:
    """The key of one row's draw: a hash of (request seed, output position), in [0, 2**64)."""
    return _splitmix64((_splitmix64(seed) + position) & _MASK64)


def _signed64(value: int) -> int:
    """The int64 with the same 64 bits as the unsigned value (torch has no uint64 arithmetic)."""
    return value - (1 << 64) if value >> 63 else value


def uniforms(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """U[row, token] = top 24 bits of output `token` of SplitMix64 seeded with keys[row], / 2**24.

    keys: [S] int64 holding the unsigned 64-bit keys' bits. Returns [S, vocab] float32 in [0, 1).
    Integer ops only, so the result is the same bits on every device. torch's int64 is signed:
    multiplication and addition wrap modulo 2**64 exactly as unsigned ones do, but a right shift is
    arithmetic, so each shift is masked to its low 64 - shift bits to make it logical.
    """
    # Output n of a generator seeded with k mixes k + (n + 1) * gamma (it adds gamma, then mixes).
    steps = torch.arange(1, vocab + 1, dtype=torch.long, device=keys.device)  # [V]
    state = keys.unsqueeze(1) + steps.mul_(_signed64(_GOLDEN_GAMMA))  # [S, V]
    shifted = torch.empty_like(state)  # [S, V]
    for shift, multiplier in _MIX_ROUNDS:
        torch.bitwise_right_shift(state, shift, out=shifted).bitwise_and_((1 << (64 - shift)) - 1)
        state.bitwise_xor_(shifted).mul_(_signed64(multiplier))
    # The last xor-shift (x ^ x >> 31) leaves the top 33 bits as they are, so it is skipped.
    top_bits = state.bitwise_right_shift_(64 - _UNIFORM_BITS).bitwise_and_((1 << _UNIFORM_BITS) - 1)
    return top_bits.float().mul_(2.0**-_UNIFORM_BITS)  # [S, V]: k / 2**24, k < 2**24


def _token_index(
    row_lists: list[list[int]], rows: list[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors (row, token id) for every token of row_lists[k], placed on row rows[k]."""
    lengths = [len(tokens) for tokens in row_lists]
    # numpy reads long Python lists about ten times faster than torch.tensor does.
    row_index = np.repeat(np.asarray(rows, dtype=np.int64), lengths)
    token_ids = np.fromiter(chain.from_iterable(row_lists), dtype=np.int64, count=sum(lengths))
    return to_device(row_index, torch.long, device), to_device(token_ids, torch.long, device)


def _take_rows(x: torch.Tensor, rows: list[int], index: torch.Tensor) -> torch.Tensor:
    """x[rows] (rows ascending, distinct; index: them on the device); x itself when they are all."""
    return x if len(rows) == x.shape[0] else x.index_select(0, index)


def _is_penalised(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )


def _early_rows(batch: SamplingBatch) -> list[int]:
    """Rows still short of min_tokens: the position of the token drawn = output tokens before it."""
    return [i for i, p in enumerate(batch.params) if batch.output_positions[i] < p.min_tokens]


def apply_penalties_and_bias(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Logit bias, then repetition, presence and frequency penalties; returns a new tensor."""
    out = logits.clone()  # [R, V]
    device = out.device
    biased = [i for i, p in enumerate(batch.params) if p.logit_bias]
    if biased:
        index = _token_index([list(batch.params[i].logit_bias) for i in biased], biased, device)
        biases = [b for i in biased for b in batch.params[i].logit_bias.values()]
        out.index_put_(index, to_device(biases, out.dtype, device), accumulate=True)

    penalised = [i for i, p in enumerate(batch.params) if _is_penalised(p)]
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
    # a device-side True: assigning a Python bool would copy it from pageable memory (a sync)
    seen.index_put_(_token_index(prompts, repeating, device), torch.ones_like(seen[0, 0]))

    def column(values: list[float]) -> torch.Tensor:
        return to_device(values, out.dtype, device).unsqueeze(1)  # [P, 1]

    repetition = column([p.repetition_penalty for p in params])
    presence = column([p.presence_penalty for p in params])
    frequency = column([p.frequency_penalty for p in params])
    row_index = to_device(penalised, torch.long, device)
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
    early = _early_rows(batch)
    if early:
        banned = [[*eos_token_ids, *batch.params[i].stop_token_ids] for i in early]
        index = _token_index(banned, early, logits.device)
        # a device-side -inf: assigning a Python float would copy it from pageable memory (a sync)
        logits.index_put_(index, torch.full_like(logits[0, 0], -math.inf))
    logits[:, sampleable_vocab_size:] = -math.inf  # [R, V - sampleable]: padding ids
    return logits


def top_k_top_p_cutoff(
    largest: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """The smallest logit that top-k, then top-p over the top-k, keep in each row.

    largest: [F, W] each row's W largest scaled logits, descending, the first one 0; top_k: [F] in
    [1, W] (W when off); top_p: [F]. Returns [F]. Only a row's first top_k values are read, so
    `topk(W)` for any W >= top_k and a full sort give the same cut-off.
    """
    # Prefix masses, unnormalised: the top logit is 0, so exp never overflows.
    mass = largest.exp().cumsum(dim=-1)  # [F, W]: mass of the j + 1 largest
    top_k_mass = mass.gather(1, (top_k - 1).unsqueeze(1))  # [F, 1]
    # top-p: keep the smallest prefix whose probability is >= p, i.e. keep token j + 1 while the
    # mass up to j is < p of the top-k's. The first token is always kept, and the count stays
    # below top_k because mass[j] >= top_k_mass from j = top_k - 1 on. Rows with p == 1 keep all
    # top_k so float rounding in the cumsum never drops a token.
    nucleus = (mass < top_p.unsqueeze(1) * top_k_mass).sum(dim=-1) + 1  # [F]
    kept = torch.where(top_p < 1.0, nucleus, top_k)  # [F]
    return largest.gather(1, (kept - 1).unsqueeze(1)).squeeze(1)  # [F]


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


def _cutoff(x: torch.Tensor, params: list[SamplingParams], top_k: list[int]) -> torch.Tensor:
    """[S] the lowest logit each row keeps under min-p, top-k and top-p (x: [S, V], each row's
    max 0; top_k: each row's k, the vocabulary size for none)."""
    device, vocab = x.device, x.shape[1]
    # min-p: drop p_i < min_p * p_max, i.e. x_i < log(min_p) since x_max is 0 (top-k and top-p
    # keep the top token, and renormalising scales p_i and p_max alike); min_p = 0 gives
    # log 0 = -inf, which drops nothing.
    min_p_cutoff = [math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params]
    cutoff = to_device(min_p_cutoff, x.dtype, device)  # [S]
    with_top_k = [j for j in range(len(params)) if top_k[j] < vocab]
    top_p_only = [j for j, p in enumerate(params) if top_k[j] == vocab and p.top_p < 1.0]
    for group in (with_top_k, top_p_only):
        if not group:
            continue
        index = to_device(group, torch.long, device)
        width = max(top_k[j] for j in group)
        candidates = _take_rows(x, group, index)  # [G, V]
        if width < vocab:
            largest = candidates.topk(width, dim=-1).values  # [G, max_k], descending
        else:
            largest = candidates.sort(dim=-1, descending=True).values  # [G, V]
        group_cutoff = top_k_top_p_cutoff(
            largest,
            to_device([top_k[j] for j in group], torch.long, device),
            to_device([params[j].top_p for j in group], x.dtype, device),
        )  # [G]
        # Every filter is a cut-off on the same logits, so together they keep x >= the highest.
        cutoff.index_copy_(0, index, torch.maximum(cutoff.index_select(0, index), group_cutoff))
    return cutoff


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

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        expected = (len(batch.params), self.vocab_size)
        if logits.shape != expected:
            raise ValueError(f"logits: must be {list(expected)}, got {list(logits.shape)}")
        num_rows, device = logits.shape[0], logits.device
        plain_greedy = all(
            p.is_greedy and not p.logit_bias and not _is_penalised(p) for p in batch.params
        )
        if plain_greedy and not _early_rows(batch):
            # Nothing changes a logit: the argmax over the sampleable ids, without a copy.
            token_ids = row_argmax(logits[:, : self.sampleable_vocab_size])  # [R]
        else:
            token_ids = self._sample(logits.float(), batch)  # [R]

        wanted = [i for i, p in enumerate(batch.params) if p.logprobs is not None]
        logprobs: list[TokenLogprobs | None] = [None] * num_rows
        if wanted:
            wanted_index = to_device(wanted, torch.long, device)
            raw = logits.index_select(0, wanted_index)[:, : self.sampleable_vocab_size]  # [L, V']
            top_ns = [batch.params[i].logprobs for i in wanted]
            chosen_ids = token_ids.index_select(0, wanted_index)  # [L]
            for i, result in zip(wanted, _gather_logprobs(raw, chosen_ids, top_ns), strict=True):
                logprobs[i] = result
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """logits: [R, V] float32; every processing step, then argmax or the draw per row."""
        device = logits.device
        processed = apply_penalties_and_bias(logits, batch)  # [R, V]
        mask_tokens_(processed, batch, self.eos_token_ids, self.sampleable_vocab_size)
        token_ids = torch.empty(logits.shape[0], dtype=torch.long, device=device)  # [R]
        greedy = [i for i, p in enumerate(batch.params) if p.is_greedy]
        sampled = [i for i, p in enumerate(batch.params) if not p.is_greedy]
        if greedy:
            greedy_index = to_device(greedy, torch.long, device)
            chosen = row_argmax(_take_rows(processed, greedy, greedy_index))  # [G]
            token_ids.index_copy_(0, greedy_index, chosen)
        if sampled:
            sampled_index = to_device(sampled, torch.long, device)
            x = _take_rows(processed, sampled, sampled_index)  # [S, V]
            token_ids.index_copy_(0, sampled_index, self._draw(x, batch, sampled))
        return token_ids

    def _draw(self, x: torch.Tensor, batch: SamplingBatch, rows: list[int]) -> torch.Tensor:
        """x: [S, V] processed logits of the non-greedy rows; returns their token ids [S]."""
        params = [batch.params[i] for i in rows]
        device, vocab = x.device, x.shape[1]
        # Row max to 0: the cut-offs below rely on it, and a tiny temperature then sends the other
        # logits to -inf instead of overflowing to inf. Dividing by a temperature of 1 is exact.
        x = x - x.amax(dim=-1, keepdim=True)  # [S, V]
        temperatures = [p.temperature for p in params]
        if any(t != 1.0 for t in temperatures):
            x = x / to_device(temperatures, x.dtype, device).unsqueeze(1)  # [S, V]

        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        filtered = zip(top_k, params, strict=True)
        if any(k < vocab or p.top_p < 1.0 or p.min_p > 0.0 for k, p in filtered):
            x = x.masked_fill(x < _cutoff(x, params, top_k).unsqueeze(1), -math.inf)  # [S, V]

        # Exponential race in log space (the Gumbel-max trick): with U ~ Uniform[0, 1) i.i.d. per
        # token, argmax_i x_i - log(-log U_i) picks token i with probability softmax(x)_i. No
        # softmax, only argmax: a row's token never depends on the other rows, bit for bit.
        # U = 0 gives -inf, never NaN; U <= 1 - 2**-24 keeps -log U > 0, so no +inf either.
        keys = [_signed64(draw_seed(batch.seeds[i], batch.output_positions[i])) for i in rows]
        noise = uniforms(to_device(keys, torch.long, device), vocab)  # [S, V]
        gumbel = noise.log_().neg_().log_().neg_()  # [S, V]
        return row_argmax(gumbel.add_(x))  # [S]
