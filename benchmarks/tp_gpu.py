"""Tensor parallelism on two GPUs: correctness against one GPU, and decode scaling.

    python3 benchmarks/tp_gpu.py [--out DIR] [--deadline SECONDS] [--parts check,rates,collectives]
                                 [--models dummy:olmo2-7b,dummy:olmo2-13b]

1. A tiny random Llama (fp32, made here with transformers): greedy tokens over 64 steps, tp = 2
   against tp = 1, and tp = 2 with decode graphs (the peer all-reduce kernels inside) against
   tp = 2 run eagerly (NCCL).
2. dummy:olmo2-7b (bf16): teacher-forced log-probabilities at 127 positions (prompt logprobs of a
   128-token sequence), tp = 2 against tp = 1: largest difference and top-1 agreement.
3. At tp = 2, the time a decode step spends in collectives at batch 1 and 64. Eager steps (NCCL):
   the PyTorch profiler's NCCL kernel time over 20 steps on rank 0, beside the step's wall time.
   Graph steps (the peer kernels): each collective a 7B step makes, timed alone on two ranks as
   100 calls replayed from one graph (and NCCL eagerly beside), times its count per step. (The
   profiler is not used there: on the H200 a profiled tp = 2 engine replaying graphs with the
   peer kernels stopped making progress.)
4. Batch-1 decode tokens/s of dummy:olmo2-7b and -13b at tp = 1 and 2 (128-token prompt), and
   at tp = 2 with the peer kernels pulling (AFS_PEER_PUSH=0; they push by default), run eagerly,
   and without asynchronous scheduling.
The throughput workloads at tp = 1 and 2 are `bash benchmarks/gpu_suite.sh tp`.
Prints a table last; writes tp_gpu.json under --out after each part.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from workers.bench.ceilings import free_memory
from workers.bench.latency import afs_times
from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams

PROMPT = list(range(1000, 1128))


def engine(model: str, tp: int, **kwargs) -> LLMEngine:
    # the last engine's frame has returned by now: its memory can go
    free_memory(torch.device("cuda"))
    return LLMEngine(model=model, device="cuda", tp=tp, gpu_memory_utilization=0.45, **kwargs)


def tiny_tokens(path: str, tp: int, eager: bool = False) -> list[int]:
    eng = engine(path, tp, dtype="float32", max_num_seqs=8, enforce_eager=eager)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
        return eng.generate([PROMPT[:40]], params)[0].completions[0].token_ids
    finally:
        eng.shutdown()


def tiny_runs(config_class, model_class, kv_heads: int) -> tuple[list, list, list]:
    """A tiny random model of transformers' classes, saved and run greedily: tp = 1, tp = 2,
    tp = 2 eager."""
    with tempfile.TemporaryDirectory() as tiny:
        config = config_class(
            vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512,
            initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )  # fmt: skip
        torch.manual_seed(0)
        model_class(config).save_pretrained(tiny)
        return tiny_tokens(tiny, 1), tiny_tokens(tiny, 2), tiny_tokens(tiny, 2, eager=True)


def teacher_forced(model: str, tp: int) -> list:
    eng = engine(model, tp, max_num_seqs=8)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=5)
        return eng.generate([PROMPT], params)[0].prompt_logprobs[1:]
    finally:
        eng.shutdown()


def decode_rate(model: str, tp: int, new_tokens: int = 128, **kwargs) -> float:
    eng = engine(model, tp, max_num_seqs=8, **kwargs)
    try:
        eng.generate([PROMPT], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
        _, decode_s = afs_times(eng, PROMPT, new_tokens, None)
        return (new_tokens - 1) / decode_s
    finally:
        eng.shutdown()


def allreduce_share(model: str, batch: int, steps: int = 20) -> dict:
    """Eager tp = 2 steps (NCCL) under the profiler: NCCL kernel time beside the wall time."""
    eng = engine(model, 2, max_num_seqs=max(batch, 8), enforce_eager=True)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=steps + 16, ignore_eos=True)
        for i in range(batch):
            eng.add_request([(t + 7 * i) % 30000 for t in PROMPT], params)
        for _ in range(6):  # the prompts, then decode steps to warm up
            eng.step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                eng.step()
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
        nccl_us = sum(
            getattr(e, "device_time_total", 0) or 0
            for e in prof.key_averages()
            if "nccl" in e.key.lower()
        )
        return {
            "batch": batch,
            "step_ms": wall / steps * 1e3,
            "allreduce_ms_per_step": nccl_us / 1e3 / steps,
            "allreduce_share": nccl_us / 1e6 / wall,
        }
    finally:
        eng.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--deadline", type=float, default=0, help="seconds; past it, print every stack and exit"
    )
    parser.add_argument("--parts", default="check,rates,collectives")
    parser.add_argument("--models", default="dummy:olmo2-7b,dummy:olmo2-13b")
    args = parser.parse_args()
    parts, models = args.parts.split(","), args.models.split(",")
    if args.deadline:
        faulthandler.dump_traceback_later(args.deadline, exit=True)
    result: dict = {
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "tp_gpu.json" if len(parts) == 3 else f"tp_gpu_{'_'.join(parts)}.json"

    def save() -> None:
        (out / name).write_text(json.dumps(result, indent=2))

    if "check" in parts:
        check(result, save)
    if "rates" in parts:
        rates(result, save, models)
    if "collectives" in parts:
        collectives(result, save)
    report(result)


def check(result: dict, save) -> None:
    import transformers

    one, two, two_eager = tiny_runs(transformers.LlamaConfig, transformers.LlamaForCausalLM, 2)
    result["tiny_fp32_greedy_64_equal"] = one == two
    result["tiny_fp32_tp2_graphs_equal_eager"] = two == two_eager
    print(f"tiny fp32 greedy tp=2 == tp=1 over 64 steps: {one == two}; "
          f"tp=2 graphs == eager: {two == two_eager}", flush=True)  # fmt: skip
    save()

    ref, split = teacher_forced("dummy:olmo2-7b", 1), teacher_forced("dummy:olmo2-7b", 2)
    diffs = [abs(a.logprob - b.logprob) for a, b in zip(ref, split, strict=True)]
    tops = [a.top[0][0] == b.top[0][0] for a, b in zip(ref, split, strict=True)]
    result["olmo2_7b_bf16_teacher_forced"] = {
        "positions": len(diffs),
        "max_abs_logprob_diff": max(diffs),
        "mean_abs_logprob_diff": sum(diffs) / len(diffs),
        "top1_agreement": sum(tops) / len(tops),
    }
    print(result["olmo2_7b_bf16_teacher_forced"], flush=True)
    save()

    # Olmo 2's decode path at tp = 2: every decode matmul through the skinny kernel (so the
    # row-parallel ones push their partials as tagged words), the post-norm all-reduces and the
    # QK-norm sums through tagged words; fp32, so the tokens must not move
    from workers.layers import fused

    saved, os.environ["AFS_SKINNY_MATMUL"] = fused.SKINNY_MATMUL, "1"  # rank 1 too
    fused.SKINNY_MATMUL = True
    try:
        one, two, two_eager = tiny_runs(transformers.Olmo2Config, transformers.Olmo2ForCausalLM, 4)
    finally:
        fused.SKINNY_MATMUL = saved
        del os.environ["AFS_SKINNY_MATMUL"]
    result["tiny_olmo2_fp32_skinny_greedy_64_equal"] = one == two
    result["tiny_olmo2_fp32_skinny_tp2_graphs_equal_eager"] = two == two_eager
    print(f"tiny Olmo 2 fp32 (skinny matmuls, pushed partials): tp=2 == tp=1 over 64 steps: "
          f"{one == two}; tp=2 graphs == eager: {two == two_eager}", flush=True)  # fmt: skip
    save()


def rates(result: dict, save, models: list[str]) -> None:
    rates: dict = {}
    result["batch1_decode_tok_s"] = rates
    for model in models:
        rates[model] = {}
        for tp in (1, 2):
            rates[model][tp] = decode_rate(model, tp)
            print(model, rates[model], flush=True)
            save()
        os.environ["AFS_PEER_PUSH"] = "0"  # the spawned rank takes it too
        try:
            rates[model]["2 pull"] = decode_rate(model, 2)
        finally:
            del os.environ["AFS_PEER_PUSH"]
        rates[model]["2 eager"] = decode_rate(model, 2, enforce_eager=True)
        rates[model]["2 sync"] = decode_rate(model, 2, async_scheduling=False)
        print(model, rates[model], flush=True)
        save()


# what one dummy:olmo2-7b decode step at tp = 2 sums or gathers, per row, and how many times
STEP_COLLECTIVES = {
    "qk_squares [B, 2] fp32": ((2,), torch.float32, "sum", 32),
    "o_proj, down_proj [B, 4096] bf16": ((4096,), torch.bfloat16, "sum", 64),
    "embedding [B, 4096] bf16": ((4096,), torch.bfloat16, "sum", 1),
    "lm_head gather [B, 50176] bf16": ((100352 // 2,), torch.bfloat16, "gather", 1),
}


def _time_collectives(rank: int, init_method: str, batches: tuple, results) -> None:
    from workers import distributed

    device = torch.device("cuda", rank)
    distributed.init_tensor_parallel(rank, 2, init_method, device)
    try:
        if not distributed.init_peer_collectives(64 << 20, device):
            raise RuntimeError("peer buffers could not be mapped")
        timings = {}
        peers = distributed.get_peer_buffers()
        for batch in batches:
            for name, (row, dtype, kind, count) in STEP_COLLECTIVES.items():
                x = torch.ones(batch, *row, dtype=dtype, device=device)
                op = (
                    distributed.tp_all_reduce
                    if kind == "sum"
                    else distributed.tp_all_gather_last_dim
                )
                peers.push = False
                peer_us = _graph_us(lambda op=op, x=x: op(x), device)
                peers.push = True
                push_us = _graph_us(lambda op=op, x=x: op(x), device)
                peers.push = False
                distributed.set_peer_buffers(None)  # the same calls over NCCL, eagerly
                nccl_us = _eager_us(lambda op=op, x=x: op(x), device)
                distributed.set_peer_buffers(peers)
                timings[f"{name} @ B={batch}"] = {
                    "batch": batch, "per_step": count, "peer_us": peer_us, "push_us": push_us,
                    "nccl_us": nccl_us,
                }  # fmt: skip
        if rank == 0:
            results.put(timings)
    finally:
        distributed.destroy_tensor_parallel()


def _graph_us(call, device: torch.device, calls: int = 100) -> float:
    for _ in range(3):
        call()  # compiled and warm before the capture
    torch.cuda.synchronize(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(calls):
            call()
    graph.replay()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / (5 * calls) * 1e6


def _eager_us(call, device: torch.device, calls: int = 200) -> float:
    for _ in range(10):
        call()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        call()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls * 1e6


def collectives(result: dict, save) -> None:
    import torch.multiprocessing as mp

    from workers.worker import free_rendezvous

    context = mp.get_context("spawn")
    results = context.Queue()
    init_method = free_rendezvous()
    ranks = [
        context.Process(target=_time_collectives, args=(r, init_method, (1, 64), results))
        for r in (0, 1)
    ]
    for process in ranks:
        process.start()
    timings = results.get(timeout=180)
    for process in ranks:
        process.join(60)
    result["tp2_collective_us"] = timings
    for batch in (1, 64):
        rows = [t for t in timings.values() if t["batch"] == batch]
        result.setdefault("tp2_collectives_per_step_ms", {})[batch] = {
            kind: sum(t[f"{kind}_us"] * t["per_step"] for t in rows) / 1e3
            for kind in ("peer", "push", "nccl")
        }
    print(result["tp2_collectives_per_step_ms"], flush=True)
    save()
    result["tp2_allreduce"] = []
    for batch in (1, 64):
        result["tp2_allreduce"].append(allreduce_share("dummy:olmo2-7b", batch))
        print(result["tp2_allreduce"][-1], flush=True)
        save()


def report(result: dict) -> None:
    if "olmo2_7b_bf16_teacher_forced" in result:
        print(json.dumps(result["olmo2_7b_bf16_teacher_forced"]))
        print(f"tiny fp32 greedy tp=2 == tp=1 over 64 steps: "
              f"{result['tiny_fp32_greedy_64_equal']}; "
              f"tp=2 graphs == eager: {result['tiny_fp32_tp2_graphs_equal_eager']}")  # fmt: skip
    for name, row in result.get("tp2_collective_us", {}).items():
        print(f"{name}: peer kernels in a graph {row['peer_us']:.1f} us (pushing "
              f"{row['push_us']:.1f} us), NCCL eager "
              f"{row['nccl_us']:.1f} us, {row['per_step']} per 7B step")  # fmt: skip
    for batch, row in result.get("tp2_collectives_per_step_ms", {}).items():
        print(f"7B tp=2 batch {batch}: collectives {row['peer']:.2f} ms a step with the peer "
              f"kernels ({row['push']:.2f} pushing), {row['nccl']:.2f} ms over NCCL")  # fmt: skip
    for row in result.get("tp2_allreduce", []):
        print(f"7B tp=2 batch {row['batch']} (eager, NCCL, profiled): step "
              f"{row['step_ms']:.2f} ms, collectives {row['allreduce_ms_per_step']:.2f} ms "
              f"({row['allreduce_share']:.0%})")  # fmt: skip
    for model, by_tp in result.get("batch1_decode_tok_s", {}).items():
        if "2 sync" not in by_tp:
            continue
        print(f"{model}: tp=1 {by_tp[1]:.1f} tok/s, tp=2 {by_tp[2]:.1f} tok/s, "
              f"x{by_tp[2] / by_tp[1]:.2f}; pulling {by_tp.get('2 pull', float('nan')):.1f}; "
              f"tp=2 eager {by_tp['2 eager']:.1f}, "
              f"synchronous {by_tp['2 sync']:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
