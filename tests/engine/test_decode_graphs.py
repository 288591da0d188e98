"""Decode steps over static, padded buffers (`DecodeGraphs`), eager and as CUDA graphs.

On CPU the padded eager path runs through the Triton interpreter and must give the tokens of the
unpadded path. On a GPU: graphs on and off give bitwise-equal logits and tokens over 64 steps at
batch sizes that are not captured sizes (both run the same padded computation; only the launch
differs), and the graphs' teacher-forced logits stay within the `triton` backend's stated
tolerance of `torch_ref` (tests/kernels/test_triton_backend.py explains it), with greedy tokens
equal wherever the reference's top-2 margin exceeds twice that tolerance.
"""

from __future__ import annotations

import pytest
import torch
from checkpoints import make_checkpoint
from paged import PagedSequences

from workers.attention import get_backend
from workers.decode_graphs import DecodeGraphs, _Layout, capture_sizes
from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams
from workers.weights.loader import load_model

pytest.importorskip("transformers")


@pytest.mark.parametrize("size, max_blocks", [(1, 1), (3, 7), (64, 256), (100, 33)])
def test_the_inputs_one_buffer_holds(size, max_blocks):
    """The static inputs are views of one buffer: apart, each on a 256-byte boundary, and a step
    of any size copies every view's first rows with the bytes up to `end(size)`."""
    layout = _Layout(size, max_blocks)
    buffer = torch.zeros(layout.total, dtype=torch.uint8)
    ids, lens, tables = layout.views(buffer)
    assert ids.shape == (3, size) and ids.dtype == torch.int64
    assert lens.shape == (size,) and tables.shape == (size, max_blocks)
    views = [ids[0], ids[1], ids[2], lens, tables]
    for view in views:
        assert (view.data_ptr() - buffer.data_ptr()) % 256 == 0
    for i, view in enumerate(views):  # each view's bytes are its own
        view.fill_(7)
        for j, other in enumerate(views):
            assert bool((other == (7 if j == i else 0)).all())
        view.fill_(0)
    for rows in range(1, size + 1):
        end = buffer.data_ptr() + layout.end(rows)
        for view in views:
            last = view[rows - 1]
            assert last.data_ptr() + last.numel() * last.element_size() <= end
    assert layout.end(size) == layout.total


def test_capture_sizes_and_padding():
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(128) == [1, 2, 4, 8, *range(16, 129, 8)]
    graphs = DecodeGraphs.__new__(DecodeGraphs)
    graphs.sizes = capture_sizes(20)
    assert [graphs.padded_size(b) for b in (1, 3, 5, 9, 16, 17, 20, 21)] == [
        1, 4, 8, 16, 16, 20, 20, None
    ]  # fmt: skip


def test_refuses_a_backend_without_padded_rows(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir), device="cpu").model
    with pytest.raises(ValueError, match="cannot run padded decode rows"):
        DecodeGraphs(model, [], get_backend("torch_ref"), 16, 4, 64, torch.device("cpu"), True)


def _small_olmo2(path) -> None:
    make_checkpoint(
        path, "Olmo2", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    )


def _engine(model_dir, device, dtype, **overrides) -> LLMEngine:
    return LLMEngine(
        model=str(model_dir),
        device=device,
        dtype=dtype,
        attention_backend="triton",
        num_kv_blocks=256,
        max_num_seqs=16,
        max_model_len=256,
        detokenize=False,
        **overrides,
    )


def _record_logits(engine: LLMEngine) -> list[torch.Tensor]:
    """Every step's sampled logits, as the sampler saw them."""
    recorded, sampler = [], engine.runner.sampler

    def recording(logits, batch):
        recorded.append(logits.clone())
        return sampler(logits, batch)

    engine.runner.sampler = recording
    return recorded


def _count_padded_steps(engine: LLMEngine) -> tuple[list[int], list[bool]]:
    """Each padded step's batch, and whether its input ids were read on the device."""
    batches, on_device, run = [], [], engine.runner.graphs.run

    def counting(input_ids, *args):
        batches.append(len(input_ids))
        on_device.append(isinstance(input_ids, torch.Tensor))
        return run(input_ids, *args)

    engine.runner.graphs.run = counting
    return batches, on_device


def _generate(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams):
    return [r.completions[0].token_ids for r in engine.generate(prompts, params)]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_padded_decode_on_cpu_gives_the_unpadded_tokens(tiny_llama_dir, async_scheduling):
    # with asynchronous scheduling the padded steps read their input ids on the device
    prompts = [list(range(3 + i, 3 + i + n)) for i, n in enumerate((5, 17, 33))]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    expected = _generate(_engine(tiny_llama_dir, "cpu", "float32"), prompts, params)

    engine = _engine(tiny_llama_dir, "cpu", "float32", async_scheduling=async_scheduling)
    runner, worker_config = engine.runner, engine.config
    runner.graphs = DecodeGraphs(
        runner.model,
        runner.kv_caches,
        runner.backend,
        worker_config.block_size,
        worker_config.max_num_seqs,
        256,
        torch.device("cpu"),
        enforce_eager=True,
    )
    batches, on_device = _count_padded_steps(engine)
    assert _generate(engine, prompts, params) == expected
    assert batches == [3] * 5  # every decode step took the padded path (batch 3 runs at 4)
    assert any(on_device) == async_scheduling


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graphs_on_and_off_are_bitwise_equal(tmp_path, dtype):
    _small_olmo2(tmp_path)
    generator = torch.Generator().manual_seed(0)
    greedy = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=64, ignore_eos=True)
    engines = {
        graphs: _engine(tmp_path, "cuda", dtype, enforce_eager=not graphs)
        for graphs in (True, False)
    }
    assert engines[True].runner.graphs.graphs and not engines[False].runner.graphs.graphs
    samplers = {graphs: engine.runner.sampler for graphs, engine in engines.items()}
    for batch in (3, 5, 13):  # none is a captured size (1, 2, 4, 8, 16)
        lengths = torch.randint(1, 70, (batch,), generator=generator).tolist()
        prompts = [torch.randint(0, 320, (n,), generator=generator).tolist() for n in lengths]
        for params in (greedy, seeded):
            tokens, logits = {}, {}
            for graphs, engine in engines.items():
                recorded = _record_logits(engine)
                batches, _ = _count_padded_steps(engine)
                tokens[graphs] = _generate(engine, prompts, params)
                logits[graphs] = recorded
                assert batches.count(batch) == 63  # every decode step took the padded path
                engine.runner.sampler = samplers[graphs]
            assert tokens[True] == tokens[False]
            assert len(logits[True]) == len(logits[False]) == 64
            for on, off in zip(logits[True], logits[False], strict=True):
                assert torch.equal(on, off)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,relative", [("float32", None), ("bfloat16", 6e-2)])
def test_graph_logits_match_torch_ref_teacher_forced(tmp_path, dtype, relative):
    _small_olmo2(tmp_path)
    model = load_model(str(tmp_path), dtype=dtype, device="cuda").model
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 320, (n,), generator=generator).tolist() for n in (5, 16, 37)]
    reference = PagedSequences(model, backend="torch_ref")
    graph_slab = [layer.clone() for layer in reference.slab]
    graphs = DecodeGraphs(
        model, graph_slab, get_backend("triton", "cuda"), 16, 8, 256, torch.device("cuda"), False
    )
    tables = [[] for _ in prompts]
    want = reference.forward(tables, [0] * len(prompts), prompts)
    computed = [len(p) for p in prompts]
    ends = torch.tensor(computed).cumsum(0) - 1
    tokens = want[ends].argmax(-1).tolist()
    for _ in range(64):
        want = reference.forward(tables, computed, [[t] for t in tokens])  # [3, vocab]
        for ours, theirs in zip(graph_slab, reference.slab, strict=True):
            ours.copy_(theirs)  # the same history each step, so rounding cannot compound
        slots = [t[c // 16] * 16 + c % 16 for t, c in zip(tables, computed, strict=True)]
        logits = graphs.run(tokens, computed, slots, tables)
        got = logits[: len(prompts)]
        tolerance = 2e-3 if relative is None else relative * float(want.abs().max())
        torch.testing.assert_close(got, want, atol=tolerance, rtol=0)
        top2 = want.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * tolerance
        assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
        computed = [c + 1 for c in computed]
        tokens = want.argmax(-1).tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_async_scheduling_on_cuda_gives_the_synchronous_tokens(tmp_path, dtype):
    # graphs replayed with their input ids read from the previous step's draw on the device;
    # greedy and seeded sampling with logprobs, requests of different lengths finishing apart
    _small_olmo2(tmp_path)
    generator = torch.Generator().manual_seed(5)
    prompts = [
        torch.randint(0, 320, (n,), generator=generator).tolist() for n in (3, 20, 41, 9, 66)
    ]
    params = [
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.8, top_k=50, seed=11, max_tokens=64, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=17, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=64, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
    ]
    results = {}
    for async_scheduling in (False, True):
        engine = _engine(tmp_path, "cuda", dtype, async_scheduling=async_scheduling)
        assert engine.runner.graphs.graphs
        _, on_device = _count_padded_steps(engine)
        for i, (prompt, param) in enumerate(zip(prompts, params, strict=True)):
            engine.add_request(prompt, param, request_id=str(i))
        outputs: dict[str, list] = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                got = outputs.setdefault(output.request_id, [[], []])
                got[0].extend(output.new_token_ids)
                got[1].extend((lp.token_id, lp.logprob) for lp in output.logprobs or [])
        results[async_scheduling] = outputs
        assert any(on_device) == async_scheduling  # steps really were queued ahead
        assert engine.kv.pool.num_free_blocks == engine.kv.pool.num_blocks
    assert results[True] == results[False]
    assert [len(v[0]) for v in results[True].values()] == [p.max_tokens for p in params]
