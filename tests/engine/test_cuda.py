"""The engine on a CUDA device: the slab sized from a profiling forward, same tokens as on CPU."""

from __future__ import annotations

import pytest
import torch

from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu


def test_cuda_engine_matches_cpu_and_fits_its_memory_budget(tiny_llama_dir):
    prompts = [list(range(3, 3 + n)) for n in (5, 40, 130)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    cpu = LLMEngine(model=str(tiny_llama_dir), device="cpu", num_kv_blocks=64)
    expected = [r.completions[0].token_ids for r in cpu.generate(prompts, params)]

    gpu = LLMEngine(
        model=str(tiny_llama_dir), device="cuda", dtype="float32", gpu_memory_utilization=0.5
    )
    free, total = torch.cuda.mem_get_info()
    assert gpu.num_kv_blocks > 1000
    assert total - free <= 0.5 * total * 1.02  # the slab stays under the utilization cap
    got = [r.completions[0].token_ids for r in gpu.generate(prompts, params)]
    assert got == expected

    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=16, ignore_eos=True)
    first = gpu.generate(prompts, seeded)
    again = gpu.generate(prompts, seeded)
    assert [r.completions[0].token_ids for r in first] == [
        r.completions[0].token_ids for r in again
    ]


def test_dummy_olmo2_1b_generates_in_bf16():
    engine = LLMEngine(model="dummy:olmo2-1b", device="cuda", gpu_memory_utilization=0.3)
    assert engine.model_config.torch_dtype == torch.bfloat16
    [result] = engine.generate(
        [list(range(100, 228))], SamplingParams(max_tokens=8, ignore_eos=True)
    )
    assert len(result.completions[0].token_ids) == 8


def test_a_warmed_up_engine_compiles_nothing_while_it_serves():
    """The warm-up reaches every kind of step: requests of lengths, batches and sampling paths
    it never ran compile no Triton kernel (in this process; Triton's disk cache aside)."""
    from workers.bench.compiles import watch_compiles

    engine = LLMEngine(
        model="dummy:olmo2-1b", device="cuda", gpu_memory_utilization=0.3, max_num_seqs=16
    )
    assert engine.warm_up_report["steps"] > 0
    prompts = [list(range(100, 100 + n)) for n in (2, 23, 37, 77, 300, 513)]
    mixed = [
        SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
        SamplingParams(temperature=0.9, top_k=50, max_tokens=7, ignore_eos=True),
        SamplingParams(
            temperature=1.0, top_p=0.8, seed=3, logprobs=3, max_tokens=6, ignore_eos=True
        ),
        SamplingParams(temperature=0.0, prompt_logprobs=2, max_tokens=3, ignore_eos=True),
        SamplingParams(temperature=0.5, presence_penalty=1.0, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.0, n=3, max_tokens=4, ignore_eos=True),
    ]
    with watch_compiles() as compiled:
        results = engine.generate(prompts, mixed)
        engine.generate([p[:11] for p in prompts] * 2, mixed[0])  # a batch of 12 at once
    assert all(r.completions[0].token_ids for r in results)
    assert [c["kernel"] for c in compiled] == []
