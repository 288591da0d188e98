"""The batched sampler: exact logit processing, seeded draws, filter support and statistics."""

from __future__ import annotations

import math

import pytest
import torch

from workers.engine.sampling_params import SamplingParams
from workers.layers.sampler import (
    Sampler,
    SamplingBatch,
    apply_penalties_and_bias,
    draw_seed,
    mask_tokens_,
    prompt_logprobs,
    top_k_top_p_cutoff,
    uniforms,
)

VOCAB = 64
EOS = 2
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def make_batch(
    params: list[SamplingParams],
    seeds: list[int] | None = None,
    positions: list[int] | None = None,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
) -> SamplingBatch:
    rows = len(params)
    outputs = outputs if outputs is not None else [[] for _ in range(rows)]
    return SamplingBatch(
        params=params,
        seeds=seeds if seeds is not None else [1234] * rows,
        output_positions=positions if positions is not None else [len(o) for o in outputs],
        prompt_token_ids=prompts if prompts is not None else [[] for _ in range(rows)],
        output_token_ids=outputs,
    )


def draw_many(
    logits: torch.Tensor, params: SamplingParams, draws: int, sampler: Sampler | None = None
) -> torch.Tensor:
    """`draws` draws from one row of logits, one per output position, in a single batch."""
    sampler = sampler or Sampler(logits.shape[1], None, (EOS,))
    batch = make_batch([params] * draws, positions=list(range(draws)))
    return sampler(logits.expand(draws, -1), batch).token_ids


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def splitmix64_output(seed: int, n: int) -> int:
    """Output n (from 0) of Vigna's splitmix64.c seeded with seed: the state has advanced n + 1
    times by the golden gamma, then goes through the finaliser."""
    mask = (1 << 64) - 1
    z = (seed + (n + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def as_int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def test_reference_splitmix64_is_the_published_one() -> None:
    # The first outputs of splitmix64.c seeded with 0.
    expected = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F, 0xF88BB8A8724C81EC]
    assert [splitmix64_output(0, n) for n in range(4)] == expected


@pytest.mark.parametrize("device", DEVICES)
def test_uniforms_are_the_top_24_bits_of_splitmix64(device: str) -> None:
    vocab = 100_352
    # Keys with the top bit set are negative as int64: the shifts must still be logical.
    keys = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 0xDEADBEEFCAFEF00D, draw_seed(7, 3)]
    u = uniforms(torch.tensor([as_int64(k) for k in keys], device=device), vocab).cpu()
    assert u.shape == (len(keys), vocab) and u.dtype == torch.float32
    for row, key in enumerate(keys):
        for n in (0, 1, 2, 3, 1000, 65_535, vocab - 1):
            assert float(u[row, n]) == (splitmix64_output(key, n) >> 40) / 2**24, (key, n)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0


def test_uniforms_are_uniform_and_independent_of_their_neighbours() -> None:
    keys = torch.tensor([as_int64(draw_seed(seed, 0)) for seed in range(64)])
    u = uniforms(keys, 16_384)  # [64, 16384]: 1M values
    bins = (u * 16).long().flatten()
    flat = torch.full((16,), 1 / 16)
    assert chi_square(bins, flat) < 37.7  # 15 degrees of freedom: P = 0.001
    # Pairs of neighbouring tokens fill a 4 x 4 grid evenly: no correlation along the vocabulary.
    quarters = (u * 4).long()  # [64, 16384]
    pairs = (quarters[:, :-1] * 4 + quarters[:, 1:]).flatten()
    assert chi_square(pairs, flat) < 37.7  # 15 degrees of freedom: P = 0.001
    # And so do the same token of neighbouring positions of one request.
    by_position = torch.tensor([as_int64(draw_seed(5, position)) for position in range(4096)])
    column = (uniforms(by_position, 256) * 4).long()  # [4096, 256]
    pairs = (column[:-1] * 4 + column[1:]).flatten()
    assert chi_square(pairs, flat) < 37.7


def test_the_draw_is_gumbel_max_over_the_counter_uniforms() -> None:
    """The exact contract: token = argmax(x - log(-log U)) with U keyed by (seed, position)."""
    rows, vocab = 16, 300
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(4)) * 2
    seeds = [2**63 - 1 - i for i in range(rows)]
    positions = [3 * i for i in range(rows)]
    batch = make_batch([SamplingParams()] * rows, seeds, positions)
    tokens = Sampler(vocab, None, (EOS,))(logits, batch).token_ids.tolist()
    for row in range(rows):
        key = draw_seed(seeds[row], positions[row])
        u = torch.tensor([(splitmix64_output(key, n) >> 40) / 2**24 for n in range(vocab)])
        x = logits[row] - logits[row].max()
        assert tokens[row] == int((x - (-u.log()).log()).argmax()), row


def test_temperature_zero_is_argmax() -> None:
    logits = torch.randn(8, VOCAB)
    sampler = Sampler(VOCAB, None, (EOS,))
    for params in (SamplingParams(temperature=0.0), SamplingParams(top_k=1, temperature=1.5)):
        out = sampler(logits, make_batch([params] * 8, seeds=list(range(8))))
        assert torch.equal(out.token_ids, logits.argmax(dim=-1))
        assert out.token_ids.dtype == torch.int64 and out.logprobs == [None] * 8


def varied_params(rows: int) -> list[SamplingParams]:
    """A mix touching every code path: greedy, penalties, bias, filters, min_tokens."""
    choices = [
        SamplingParams(),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(top_p=0.8, repetition_penalty=1.3),
        SamplingParams(min_p=0.1, presence_penalty=0.5, frequency_penalty=0.3),
        SamplingParams(temperature=1.4, top_k=10, top_p=0.9, min_p=0.02, logprobs=3),
        SamplingParams(logit_bias={5: 4.0, 9: -3.0}, min_tokens=3, stop_token_ids=[7]),
        SamplingParams(temperature=1e-4),
    ]
    return [choices[i % len(choices)] for i in range(rows)]


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_and_position_same_token_alone_or_in_batch(device: str) -> None:
    rows = 32
    generator = torch.Generator().manual_seed(7)
    # An odd vocabulary makes every row start at a different alignment.
    vocab = 1001
    logits = torch.randn(rows, vocab, generator=generator).to(device) * 3
    params = varied_params(rows)
    seeds = [1000 + i for i in range(rows)]
    positions = [i % 5 for i in range(rows)]
    prompts = [[(i * 7 + j) % vocab for j in range(6)] for i in range(rows)]
    outputs = [[(i * 3 + j) % vocab for j in range(p)] for i, p in enumerate(positions)]
    sampler = Sampler(vocab, vocab - 10, (EOS,))
    batch = make_batch(params, seeds, positions, prompts, outputs)
    together = sampler(logits, batch).token_ids.tolist()
    assert together == sampler(logits, batch).token_ids.tolist()  # and again: no hidden state
    for i in range(rows):
        alone = make_batch([params[i]], [seeds[i]], [positions[i]], [prompts[i]], [outputs[i]])
        assert sampler(logits[i : i + 1], alone).token_ids.tolist() == [together[i]], i
    # Reversing the batch moves every row yet changes none of their tokens.
    reverse = list(range(rows))[::-1]
    reversed_batch = make_batch(
        [params[i] for i in reverse],
        [seeds[i] for i in reverse],
        [positions[i] for i in reverse],
        [prompts[i] for i in reverse],
        [outputs[i] for i in reverse],
    )
    assert sampler(logits[reverse], reversed_batch).token_ids.tolist() == together[::-1]


def test_different_positions_and_seeds_draw_differently() -> None:
    logits = torch.zeros(1, VOCAB)  # uniform: collisions are 1 in 64 by chance
    sampler = Sampler(VOCAB, None, (EOS,))
    draws = 200
    params = [SamplingParams()] * draws

    def tokens(seed: int) -> list[int]:
        batch = make_batch(params, seeds=[seed] * draws, positions=list(range(draws)))
        return sampler(logits.expand(draws, -1), batch).token_ids.tolist()

    first, second = tokens(1), tokens(2)
    assert len(set(first)) > 40  # positions of one request spread over the vocabulary
    assert sum(a == b for a, b in zip(first, second, strict=True)) < 15  # seeds differ
    assert tokens(1) == first


def test_draws_over_many_seeds_and_positions_follow_the_distribution() -> None:
    probs = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])
    seeds, positions = 100, 200  # 20k draws, each with its own (seed, position) key
    rows = seeds * positions
    batch = make_batch(
        [SamplingParams()] * rows,
        seeds=[seed for seed in range(seeds) for _ in range(positions)],
        positions=list(range(positions)) * seeds,
    )
    tokens = Sampler(5, None, (EOS,))(probs.log().expand(rows, -1), batch).token_ids
    assert chi_square(tokens, probs) < 18.5  # 4 degrees of freedom: P = 0.001
    # Each frequency within 4 standard deviations of its probability.
    frequency = torch.bincount(tokens, minlength=5).double() / rows
    assert ((frequency - probs).abs() < 4 * (probs * (1 - probs) / rows).sqrt()).all()


def test_a_row_draws_the_same_token_in_any_batch_composition() -> None:
    vocab = 500
    generator = torch.Generator().manual_seed(21)
    logits = torch.randn(40, vocab, generator=generator) * 2
    params = varied_params(40)
    # Others change the batch's widest top-k, greedy share and filter groups around the rows.
    others = [
        SamplingParams(top_k=400, top_p=0.95),
        SamplingParams(top_p=0.5),
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=2),
    ]
    seeds = [int(s) for s in torch.randint(0, 2**63 - 1, (40,), generator=generator)]
    positions = [int(p) for p in torch.randint(0, 1000, (40,), generator=generator)]
    sampler = Sampler(vocab, None, (EOS,))

    def draw(rows: list[int], extra: list[SamplingParams]) -> list[int]:
        batch = make_batch(
            [params[i] for i in rows] + extra,
            [seeds[i] for i in rows] + [1] * len(extra),
            [positions[i] for i in rows] + [0] * len(extra),
        )
        index = torch.tensor(rows + [0] * len(extra))
        return sampler(logits[index], batch).token_ids.tolist()[: len(rows)]

    alone = [draw([i], [])[0] for i in range(40)]
    for trial in range(5):
        rows = torch.randperm(40, generator=generator)[: 8 + 8 * trial].tolist()
        extra = [others[(trial + j) % len(others)] for j in range(trial)]
        assert draw(rows, extra) == [alone[i] for i in rows], trial


def test_plain_sampling_matches_softmax_with_temperature() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2]])
    temperature = 0.7
    tokens = draw_many(logits, SamplingParams(temperature=temperature), 4000)
    probs = (logits[0] / temperature).softmax(-1)
    # 7 degrees of freedom: P(chi2 > 24.3) = 0.001.
    assert chi_square(tokens, probs) < 24.3
    # The same draws are far from the untempered distribution: temperature was applied.
    assert chi_square(tokens, logits[0].softmax(-1)) > 100


def test_top_k_support_and_distribution() -> None:
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(3)) * 2
    tokens = draw_many(logits, SamplingParams(top_k=5), 2000)
    top5 = logits[0].topk(5).indices
    assert set(tokens.tolist()) == set(top5.tolist())
    kept = torch.full((VOCAB,), -math.inf)
    kept[top5] = logits[0, top5]
    probs = kept.softmax(-1)[top5]  # renormalised over the top 5
    slot = (tokens.unsqueeze(1) == top5).int().argmax(dim=1)  # [draws]: index into top5
    assert chi_square(slot, probs) < 18.5  # 4 degrees of freedom: P = 0.001


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([0.35, 0.25, 0.2, 0.1, 0.05, 0.05])
    logits = probs.log().unsqueeze(0)
    # 0.35 + 0.25 = 0.60 < 0.7, so the third token is needed; the fourth is not.
    tokens = draw_many(logits, SamplingParams(top_p=0.7), 2000)
    assert set(tokens.tolist()) == {0, 1, 2}
    # p smaller than the top token's probability keeps exactly that one token.
    assert set(draw_many(logits, SamplingParams(top_p=0.2), 200).tolist()) == {0}
    renormalised = probs[:3] / probs[:3].sum()
    assert chi_square(tokens, renormalised) < 13.8  # 2 degrees of freedom: P = 0.001


def top_k_top_p_kept_reference(x: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """Tokens kept by top-k then top-p, by the definition: sort, keep the k most likely, then the
    smallest prefix of those whose renormalised probability reaches p (all of them when p = 1)."""
    order = x.argsort(descending=True)[:top_k].tolist()
    probs = x[order].softmax(-1).tolist()
    kept, mass = [], 0.0
    for token, prob in zip(order, probs, strict=True):
        if top_p < 1.0 and mass >= top_p:
            break
        kept.append(token)
        mass += prob
    return set(kept)


def test_top_k_cutoff_from_topk_equals_the_full_sort_and_the_definition() -> None:
    rows, vocab = 24, 1000
    generator = torch.Generator().manual_seed(13)
    x = torch.randn(rows, vocab, generator=generator) * 3
    x = x - x.amax(dim=-1, keepdim=True)  # [F, V], row max 0 as the sampler hands it over
    top_k = torch.randint(1, 300, (rows,), generator=generator)
    top_p = torch.rand(rows, generator=generator) * 0.9 + 0.05
    top_p[::4] = 1.0
    from_topk = top_k_top_p_cutoff(x.topk(int(top_k.max())).values, top_k, top_p)
    from_sort = top_k_top_p_cutoff(x.sort(dim=-1, descending=True).values, top_k, top_p)
    assert torch.equal(from_topk, from_sort)
    # p = 1 keeps all top_k, even tokens too unlikely to move the float sum of the mass.
    tail = torch.tensor([[0.0, -20.0, -30.0, -40.0]])
    assert top_k_top_p_cutoff(tail, torch.tensor([4]), torch.tensor([1.0])).tolist() == [-40.0]
    for row in range(rows):
        kept = set((x[row] >= from_topk[row]).nonzero().flatten().tolist())
        assert kept == top_k_top_p_kept_reference(x[row], int(top_k[row]), float(top_p[row])), row


def test_tokens_tied_with_the_cutoff_are_all_kept() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0, 2.0, 2.0, 1.0]])
    # The 2nd largest logit, 2.0, is shared by tokens 1, 3 and 4: top-k = 2 keeps all three.
    tokens = set(draw_many(logits, SamplingParams(top_k=2), 1000).tolist())
    assert tokens == {0, 1, 3, 4}
    # Likewise top-p: token 0 alone has 0.44 < 0.5 of the mass and any one 2.0 reaches 0.5, so the
    # cut-off is 2.0, and the other two 2.0s stay too.
    tokens = set(draw_many(logits, SamplingParams(top_p=0.5), 1000).tolist())
    assert tokens == {0, 1, 3, 4}


def test_min_p_drops_tokens_below_the_fraction_of_the_top() -> None:
    probs = torch.tensor([0.4, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03])
    logits = probs.log().unsqueeze(0)
    # min_p * p_max = 0.25 * 0.4 = 0.1: tokens 0..3 stay (0.1 is not below 0.1 in exact math,
    # so the test keeps clear of that edge with min_p slightly under).
    tokens = draw_many(logits, SamplingParams(min_p=0.24), 2000)
    assert set(tokens.tolist()) == {0, 1, 2, 3}
    tokens = draw_many(logits, SamplingParams(min_p=0.45), 2000)
    assert set(tokens.tolist()) == {0, 1}
    # With top-k or top-p keeping more, the stricter min-p still decides: 0.3 * 0.4 = 0.12.
    for params in (SamplingParams(min_p=0.3, top_k=5), SamplingParams(min_p=0.3, top_p=0.95)):
        assert set(draw_many(logits, params, 2000).tolist()) == {0, 1, 2}


def test_filters_compose_with_temperature() -> None:
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(11)) * 3
    params = SamplingParams(temperature=0.5, top_k=20, top_p=0.9, min_p=0.05)
    tokens = set(draw_many(logits, params, 2000).tolist())
    scaled = logits[0] / 0.5
    order = scaled.argsort(descending=True)[:20]
    probs = scaled[order].softmax(-1)
    nucleus = int((probs.cumsum(-1) - probs < 0.9).sum())
    kept = probs[:nucleus]
    allowed = {int(order[i]) for i in range(nucleus) if kept[i] >= 0.05 * kept[0]}
    assert tokens <= allowed and len(tokens) >= 2


def test_plain_greedy_batch_takes_the_same_tokens_as_the_full_path() -> None:
    vocab, sampleable = 300, 290
    # bf16 logits have many ties: both paths must take the first of the tied maxima.
    logits = (torch.randn(16, vocab, generator=torch.Generator().manual_seed(8)) * 3).bfloat16()
    logits[:, ::7] = logits.amax(dim=-1, keepdim=True)
    logits[:3, sampleable:] = 100.0  # padding ids are never taken
    sampler = Sampler(vocab, sampleable, (EOS,))
    plain = sampler(logits, make_batch([SamplingParams(temperature=0.0)] * 16)).token_ids
    # A presence penalty without output tokens changes nothing, yet sends the batch the long way.
    penalised = make_batch([SamplingParams(temperature=0.0, presence_penalty=1.0)] * 16)
    assert torch.equal(plain, sampler(logits, penalised).token_ids)
    assert torch.equal(plain, logits[:, :sampleable].float().argmax(dim=-1))


def test_the_argmax_kernel_draws_the_tokens_torch_does(monkeypatch) -> None:
    """kernels/argmax.py (forced here; on CPU through the interpreter) in every argmax of the
    sampler: greedy rows on both paths and the race of sampled rows give the same ids."""
    import kernels.argmax
    from workers.layers import fused

    calls = []
    kernel = kernels.argmax.argmax
    monkeypatch.setattr(kernels.argmax, "argmax", lambda x: calls.append(x.shape) or kernel(x))
    vocab, sampleable = 5000, 4990
    logits = torch.randn(12, vocab, generator=torch.Generator().manual_seed(9)) * 3
    logits = logits.bfloat16().to("cuda" if torch.cuda.is_available() else "cpu")
    logits[:, ::97] = logits.amax(dim=-1, keepdim=True)  # ties across the kernel's chunks
    sampler = Sampler(vocab, sampleable, (EOS,))
    batches = [
        make_batch([SamplingParams(temperature=0.0)] * 12),
        make_batch([SamplingParams(temperature=0.0, presence_penalty=1.0)] * 12),
        make_batch([SamplingParams(temperature=0.8, top_k=50 * (i % 3)) for i in range(12)]),
    ]
    monkeypatch.setattr(fused, "FORCE_TRITON", False)
    want = [sampler(logits, batch).token_ids for batch in batches]
    monkeypatch.setattr(fused, "FORCE_TRITON", True)
    got = [sampler(logits, batch).token_ids for batch in batches]
    assert calls == [(12, sampleable), (12, vocab), (12, vocab)]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("device", DEVICES)
def test_logits_in_bf16_draw_what_their_fp32_widening_draws(device: str) -> None:
    """The model hands the sampler logits in its own dtype: every path (greedy, penalties, bias,
    filters, seeded draws, logprobs) gives the tokens and logprobs of the same logits in fp32."""
    rows, vocab = 24, 1001
    generator = torch.Generator().manual_seed(11)
    logits = (torch.randn(rows, vocab, generator=generator) * 3).bfloat16().to(device)
    params = [
        p if p.logprobs is not None else SamplingParams(**{**vars(p), "logprobs": 2})
        for p in varied_params(rows)
    ]
    outputs = [[(i * 5 + j) % vocab for j in range(i % 4)] for i in range(rows)]
    batch = make_batch(
        params, seeds=[50 + i for i in range(rows)], prompts=[[3, 4]] * rows, outputs=outputs
    )
    sampler = Sampler(vocab, vocab - 7, (EOS,))
    narrow, wide = sampler(logits, batch), sampler(logits.float(), batch)
    assert torch.equal(narrow.token_ids, wide.token_ids)
    assert narrow.logprobs == wide.logprobs
    greedy = make_batch([SamplingParams(temperature=0.0)] * rows)
    assert torch.equal(sampler(logits, greedy).token_ids, sampler(logits.float(), greedy).token_ids)


@pytest.mark.gpu
def test_a_step_never_waits_for_the_gpu() -> None:
    rows, vocab = 32, 1001
    logits = torch.randn(rows, vocab, device="cuda")
    params = [p for p in varied_params(rows) if p.logprobs is None]  # logprobs may sync
    outputs = [[(i * 3 + j) % vocab for j in range(i % 5)] for i in range(len(params))]
    batch = make_batch(params, prompts=[[1, 2, 3]] * len(params), outputs=outputs)
    sampler = Sampler(vocab, vocab - 10, (EOS,))
    sampler(logits[: len(params)], batch)  # warm up: first-time allocations may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        token_ids = sampler(logits[: len(params)], batch).token_ids
        greedy = sampler(logits, make_batch([SamplingParams(temperature=0.0)] * rows)).token_ids
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert token_ids.shape == (len(params),) and greedy.shape == (rows,)


def test_bias_and_penalties_exactly() -> None:
    logits = torch.tensor([[1.0, -1.0, 2.0, -0.5, 0.5, 3.0, -2.0, 0.0]])
    rows = logits.expand(6, -1)
    params = [
        SamplingParams(logit_bias={1: 2.0, 6: -100.0}),
        SamplingParams(repetition_penalty=2.0),
        SamplingParams(presence_penalty=0.5),
        SamplingParams(frequency_penalty=0.25),
        SamplingParams(logit_bias={1: 2.0}, repetition_penalty=4.0, presence_penalty=-1.0),
        SamplingParams(),
    ]
    prompt, output = [0, 1, 0], [3, 4, 4, 4]
    batch = make_batch(params, prompts=[prompt] * 6, outputs=[output] * 6)
    before = rows.clone()
    out = apply_penalties_and_bias(rows, batch)
    assert torch.equal(rows, before)  # the input is left as it was

    expected = [list(map(float, logits[0])) for _ in range(6)]
    expected[0][1] += 2.0
    expected[0][6] -= 100.0
    for t in (0, 1, 3, 4):  # repetition penalty over prompt and output
        x = expected[1][t]
        expected[1][t] = x / 2.0 if x > 0 else x * 2.0
    for t in (3, 4):  # presence: once per token in the output
        expected[2][t] -= 0.5
    expected[3][3] -= 0.25 * 1  # frequency: per occurrence
    expected[3][4] -= 0.25 * 3
    # Bias first (-1 + 2 = 1 > 0), then the repetition penalty divides: 1 / 4.
    expected[4][1] = (-1.0 + 2.0) / 4.0
    expected[4][0] = 1.0 / 4.0
    expected[4][3] = -0.5 * 4.0 + 1.0
    expected[4][4] = 0.5 / 4.0 + 1.0
    torch.testing.assert_close(out, torch.tensor(expected), rtol=0, atol=1e-6)


def test_min_tokens_masks_eos_and_stop_token_ids() -> None:
    eos_ids = (EOS, 9)
    params = SamplingParams(min_tokens=3, stop_token_ids=[5], temperature=0.0)
    logits = torch.zeros(4, 16)
    batch = make_batch([params] * 4, positions=[0, 2, 3, 7])
    masked = mask_tokens_(logits.clone(), batch, eos_ids, 16)
    banned = torch.zeros(16, dtype=torch.bool)
    banned[[EOS, 9, 5]] = True
    for row in (0, 1):
        assert torch.isneginf(masked[row, banned]).all() and (masked[row, ~banned] == 0).all()
    assert (masked[2:] == 0).all()  # from the min_tokens-th output token on, EOS is allowed

    # Through the sampler: EOS dominates, yet cannot be drawn early.
    logits[:, EOS] = 50.0
    logits[:, 9] = 40.0
    logits[:, 5] = 30.0
    logits[:, 11] = 1.0
    sampler = Sampler(16, None, eos_ids)
    assert sampler(logits, batch).token_ids.tolist() == [11, 11, EOS, EOS]
    # Random draws too; another request's stop_token_ids (5) are not this one's.
    sampled = make_batch([SamplingParams(min_tokens=3)] * 4, positions=[0, 1, 2, 3])
    assert sampler(logits, sampled).token_ids.tolist() == [5, 5, 5, EOS]


def test_ids_past_the_sampleable_vocab_are_never_drawn() -> None:
    vocab, sampleable = 80, 70
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(5))
    logits[0, sampleable:] = 10.0  # padding rows of the LM head look very likely
    sampler = Sampler(vocab, sampleable, (EOS,))
    tokens = draw_many(logits, SamplingParams(temperature=2.0), 1000, sampler)
    assert int(tokens.max()) < sampleable
    greedy = draw_many(logits, SamplingParams(temperature=0.0), 4, sampler)
    assert greedy.tolist() == [int(logits[0, :sampleable].argmax())] * 4


def test_logprobs_are_raw_log_softmax_with_ranks_and_top_n() -> None:
    vocab, sampleable = 50, 48
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(9)) * 2
    params = [
        SamplingParams(logprobs=5, repetition_penalty=1.8, temperature=0.8),
        SamplingParams(logprobs=0, logit_bias={3: 20.0}),
        SamplingParams(),
        SamplingParams(logprobs=20, temperature=0.0, presence_penalty=1.0),
    ]
    batch = make_batch(params, prompts=[[1, 2, 3]] * 4, outputs=[[4, 5]] * 4)
    out = Sampler(vocab, sampleable, (EOS,))(logits, batch)
    assert out.logprobs[2] is None
    reference = logits[:, :sampleable].log_softmax(-1)  # raw: no penalty, bias or temperature
    for row, top_n in ((0, 5), (1, 0), (3, 20)):
        result = out.logprobs[row]
        token = int(out.token_ids[row])
        assert result.token_id == token
        assert result.logprob == pytest.approx(float(reference[row, token]), abs=1e-6)
        assert result.rank == int((reference[row] > reference[row, token]).sum()) + 1
        assert len(result.top) == top_n
        values = [value for _, value in result.top]
        assert values == sorted(values, reverse=True)
        expected_ids = reference[row].topk(top_n).indices.tolist()
        assert [token_id for token_id, _ in result.top] == expected_ids
        assert all(token_id < sampleable for token_id, _ in result.top)
    assert out.logprobs[1].token_id == 3  # the bias made it the near-certain draw


def test_prompt_logprobs() -> None:
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(2))
    next_ids = torch.tensor([4, 0, 29, 7, 7])
    results = prompt_logprobs(logits, next_ids, 3)
    reference = logits.log_softmax(-1)
    for row, result in enumerate(results):
        token = int(next_ids[row])
        assert result.token_id == token
        assert result.logprob == pytest.approx(float(reference[row, token]), abs=1e-6)
        assert result.rank == int((reference[row] > reference[row, token]).sum()) + 1
        assert [t for t, _ in result.top] == reference[row].topk(3).indices.tolist()
    narrowed = prompt_logprobs(logits, next_ids.clamp_max(19), 2, sampleable_vocab_size=20)
    assert narrowed[0].logprob == pytest.approx(float(logits[0, :20].log_softmax(-1)[4]))
    assert all(t < 20 for result in narrowed for t, _ in result.top)
    with pytest.raises(ValueError, match=r"^next_token_ids: must be \[5\]"):
        prompt_logprobs(logits, next_ids[:2], 2)


def test_bad_shapes_are_value_errors() -> None:
    sampler = Sampler(VOCAB, None, (EOS,))
    with pytest.raises(ValueError, match=r"^logits: must be \[2, 64\]"):
        sampler(torch.zeros(2, VOCAB + 1), make_batch([SamplingParams()] * 2))
    with pytest.raises(ValueError, match=r"^seeds: "):
        SamplingBatch([SamplingParams()], [1, 2], [0], [[]], [[]])
    with pytest.raises(ValueError, match=r"^sampleable_vocab_size: "):
        Sampler(VOCAB, VOCAB + 1, (EOS,))
