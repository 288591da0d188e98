"""The engine's warm-up: a few made-up requests that reach every kind of step before a real one.

Triton compiles a kernel the first time it meets a new specialisation: a new constant, or an
integer argument that newly is 1 or a multiple of 16 (a step's token count, its number of
sequences, a prompt's length). On a host whose kernel cache is empty each compile stalls the step
that meets it by a second or so, so the first requests of a fresh server would pay them. Decode
steps are compiled when their CUDA graphs are captured; the rest is reached here instead, with
requests that make up the kinds of step a server runs:

    alone      one prompt at a time, of each length class (1, under 16, 16, up to 64, 64, past
               64, a multiple of 16 past 64), each followed by decode steps of one
    together   several prompts in one step, with every sampling path (greedy; temperature with
               top-k, top-p and min-p; seeded, two completions of one prompt; penalties and a
               logit bias; logprobs, prompt logprobs)
    mixed      prompts that join while others decode: prefill and decode rows in one step
    cached     prompts that start with a cached prefix (prefix caching on): prefill over context
    chunked    a prompt past the step's token budget (where the model's context allows one): a
               prefill chunk over the chunk before
    many       a batch as large as max_num_seqs allows, up to 16

Prompts are random token ids; nothing of the warm-up stays in the engine (see
LLMEngine.warm_up). At tp > 1 the ranks run it in lockstep (workers/distributed.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from workers.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
ALONE_LENGTHS = (1, 7, 16, 40, 64, 100, 128)
"""Prompt lengths run one at a time: one of each class a step's token count falls in."""
SAMPLED = (
    GREEDY,
    SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, max_tokens=4, ignore_eos=True),
    SamplingParams(temperature=1.0, seed=7, n=2, logprobs=2, max_tokens=4, ignore_eos=True),
    SamplingParams(
        temperature=0.7, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5,
        logit_bias={0: 1.0}, max_tokens=4, ignore_eos=True,
    ),
    SamplingParams(temperature=0.0, prompt_logprobs=1, logprobs=0, max_tokens=2, ignore_eos=True),
)  # fmt: skip
"""Sampling parameters the prompts run together take, one each (a path of the sampler each)."""
TOGETHER_LENGTHS = (5, 16, 33, 64, 9)
MANY = 16


@dataclass(frozen=True)
class Arrival:
    """A warm-up request: its prompt, its parameters, and the step of its wave it joins at."""

    prompt: list[int]
    params: SamplingParams
    after_steps: int = 0


def plan(
    vocab_size: int,
    max_model_len: int,
    token_budget: int,
    block_size: int,
    max_num_seqs: int,
    prefix_caching: bool,
    kv_tokens: int,
    seed: int = 0,
) -> list[list[Arrival]]:
    """The warm-up's waves, run one after another: each wave's requests join after their
    `after_steps` steps of the wave, and the wave runs until all are done. Prompts that would not
    fit `max_model_len`, or the KV slab's `kv_tokens`, with their tokens to come are left out."""
    rng = random.Random(seed)

    def prompt(length: int) -> list[int]:
        return [rng.randrange(vocab_size) for _ in range(length)]

    waves: list[list[Arrival]] = []
    waves += [[Arrival(prompt(n), GREEDY)] for n in ALONE_LENGTHS]
    together = [Arrival(prompt(n), p) for n, p in zip(TOGETHER_LENGTHS, SAMPLED, strict=True)]
    waves.append(together[:max_num_seqs])
    mixed_first = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    waves.append(
        [
            Arrival(prompt(24), mixed_first),
            Arrival(prompt(20), GREEDY, after_steps=2),
            Arrival(prompt(1), GREEDY, after_steps=3),
        ][:max_num_seqs]
    )
    if prefix_caching:
        prefix = prompt(3 * block_size)
        waves.append([Arrival(prefix, GREEDY)])
        waves.append([Arrival(prefix + prompt(n), GREEDY) for n in (1, 17, 32)][:max_num_seqs])
        waves.append([Arrival(list(prefix), GREEDY)])  # all of it cached: the last recomputed
    if token_budget + 17 + GREEDY.max_tokens <= max_model_len:
        waves.append([Arrival(prompt(token_budget + 17), GREEDY)])
    waves.append([Arrival(prompt(9), GREEDY) for _ in range(min(MANY, max_num_seqs))])
    room = min(max_model_len, kv_tokens)
    fits = [[a for a in wave if len(a.prompt) + a.params.max_tokens <= room] for wave in waves]
    return [wave for wave in fits if wave]
