"""Where a decode step's time goes: graph replay, kernels by kind, and the host around them.

    python3 benchmarks/decode_profile.py [--model dummy:olmo2-7b] [--batch 1] [--context 256]
                                         [--tp 1] [--out DIR]

Builds the engine (CUDA graphs on), fills `--batch` sequences to `--context` tokens, then measures
on the same static inputs:
- engine step: one whole `engine.step()` of decode (scheduler, input staging, replay, sampling,
  outputs), median wall time over 50 steps;
- graph replay: the captured forward + LM head alone, CUDA events, median of 50;
- kernels: one eager run of the same padded forward under the PyTorch profiler, GPU time summed by
  kind (cuBLAS GEMMs, our Triton kernels, other);
and the weight + KV read floor of the step at the measured copy bandwidth. The difference between
the engine step and the replay is the host's share. Last, a timeline of 20 engine steps under the
profiler: the GPU's period per step (from one step's embedding kernel to the next), the time its
kernels and copies take, and each op outside the model's kernels (copies, the draw) with the idle
gap before it.

At `--tp` above 1 the engine spawns the other ranks and everything is seen from rank 0: the engine
steps and their timeline only (a graph replayed or a forward run on rank 0 alone would wait for
ranks that are not stepping); a peer kernel's time then includes its wait for the other ranks.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch

from workers.bench.ceilings import Roofline, measure_ceilings, median_seconds
from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams

# The profiler names a Triton kernel by its function (`_kernel` in every file of kernels/), so
# ours are told apart from cuBLAS's by that;
# the skinny matmul's `_matmul_kernel` counts with the GEMMs.
KINDS = [
    ("gemm", r"gemm|sm90_xmma|cutlass|nvjet|matmul|splitk"),
    ("ours (Triton)", r"^_kernel$"),
    ("peer collectives", r"^_(tagged_)?all_(reduce|gather)"),
]


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="dummy:olmo2-7b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--out", default="decode_profile")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    device = torch.device("cuda")
    engine = LLMEngine(
        model=args.model, device="cuda", detokenize=False, max_num_seqs=max(8, args.batch),
        tp=args.tp,
    )  # fmt: skip
    ceilings = measure_ceilings(device, (engine.model_config.dtype,), 1.0, 10, 4096)
    roofline = Roofline.for_model(engine.model, engine.model_config, ceilings)
    prompts = [[(7 * i + j) % 1000 + 10 for j in range(args.context)] for i in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=1024, ignore_eos=True)
    warmup = [[t + 1 for t in prompt] for prompt in prompts]
    engine.generate(warmup, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    for prompt in prompts:
        engine.add_request(prompt, params)
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.step()  # the prompts, and their first tokens
    prefill_ms = (time.perf_counter() - start) * 1e3
    for _ in range(5):
        engine.step()

    # -- whole engine steps --
    step_seconds = []
    for _ in range(50):
        start = time.perf_counter()
        engine.step()  # returns after the sampled ids reached the host
        step_seconds.append(time.perf_counter() - start)
    step_ms = statistics.median(step_seconds) * 1e3

    # -- the graph alone, on the last step's inputs; kernels of one eager forward of the same
    #    padded batch (one rank only) --
    graphs = engine.runner.graphs
    size = graphs.padded_size(args.batch)
    replay_ms, kernels = float("nan"), []
    if args.tp == 1:
        replay_ms = median_seconds(graphs.graphs[size].replay, device, 50) * 1e3
        kernels = eager_kernels(graphs, size)
    by_kind: dict[str, float] = {}
    launches = 0
    for name, gpu_ms, count in kernels:
        if gpu_ms:
            kind = kind_of(name)
            by_kind[kind] = by_kind.get(kind, 0.0) + gpu_ms
            launches += count
    top = sorted(kernels, key=lambda row: -row[1])[:12]

    period = step_timeline(engine, 20, engine.model_config.num_hidden_layers)

    context = args.context + 60
    floor_ms = roofline.step_seconds([(context, 1)] * args.batch, args.batch) * 1e3
    engine.shutdown()
    result = {
        "model": args.model,
        "tp": args.tp,
        "batch": args.batch,
        "padded_batch": size,
        "context": context,
        "prefill_step_ms": prefill_ms,
        "engine_step_ms": step_ms,
        "graph_replay_ms": replay_ms,
        "host_ms": step_ms - replay_ms,
        "floor_ms": floor_ms,
        "eager_kernels_ms_by_kind": by_kind,
        "eager_kernel_launches": launches,
        "top_kernels": top,
        "ceilings": ceilings,
        "timeline": period,
    }
    tp = f"_tp{args.tp}" if args.tp > 1 else ""
    (out / f"decode_profile_{args.model.split(':')[-1]}_b{args.batch}{tp}.json").write_text(
        json.dumps(result, indent=1)
    )
    print(
        f"{args.model} batch {args.batch} (padded {size}), context ~{context}: engine step "
        f"{step_ms:.3f} ms = graph replay {replay_ms:.3f} ms + host {step_ms - replay_ms:.3f} ms; "
        f"floor {floor_ms:.3f} ms ({floor_ms / replay_ms:.2f} of the replay)"
    )
    print(f"prefill step of {args.batch} x {args.context} tokens: {prefill_ms:.2f} ms")
    total = sum(by_kind.values())
    print(f"eager forward kernels: {launches} launches, {total:.3f} ms of GPU time")
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<16} {ms:8.3f} ms  {ms / total:6.1%}")
    for name, ms, count in top:
        print(f"  {ms:8.3f} ms  x{count:<4} {name[:90]}")
    print(
        f"timeline: GPU period {period['period_ms']:.3f} ms a step, ops busy "
        f"{period['busy_ms']:.3f} ms, {period['ops']} ops; outside the model's kernels:"
    )
    for name, gap_us, busy_us in period["outside"]:
        print(f"  gap {gap_us:6.1f} us, then {busy_us:6.1f} us  {name[:80]}")
    exposed = period.get("exposed")
    if exposed:
        print(f"exposed time a layer: {exposed['layer_us']:.1f} us; by place in the layer:")
        for place, us in exposed["per_layer_us"]:
            print(f"  {us:7.2f} us  {place}")
        print("outside the layers:")
        for name, us in exposed["rest_us"]:
            print(f"  {us:7.2f} us  {name}")
        print(f"  {exposed['to_next_step_us']:7.2f} us  to the next step's first op")


def eager_kernels(graphs, size: int) -> list:
    """(name, GPU ms, launches) of each kernel of one eager forward of the padded batch."""
    with torch.inference_mode():
        graphs._forward(size)  # warm
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            graphs._forward(size)
            torch.cuda.synchronize()
    return [
        (e.key, (getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)) / 1e3,
         e.count)
        for e in prof.key_averages()
        if e.device_type == torch.autograd.DeviceType.CUDA
    ]  # fmt: skip


def step_timeline(engine: LLMEngine, steps: int, layers: int) -> dict:
    """GPU ops of `steps` engine steps in start order, cut into periods at each embedding kernel
    (a decode step's first); the median period's figures, its ops outside the model, and each
    kernel's exposed time (its end less the latest end before it: with PDL a kernel starts early,
    so this is what it adds to the step), averaged by its place in a layer."""
    cuda = torch.autograd.DeviceType.CUDA
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    ops = sorted(
        (
            (e.time_range.start, e.time_range.end, e.name)
            for e in prof.events()
            if e.device_type == cuda
        ),
        key=lambda op: op[0],
    )
    starts = [
        i for i, (_, _, name) in enumerate(ops) if "indexSelect" in name or "embedding" in name
    ]
    periods = []
    for a, b in zip(starts, starts[1:], strict=False):
        window = ops[a:b]
        outside, exposed, last_end = [], [], window[0][0]
        for start, end, name in window:
            if kind_of(name) == "other" and "indexSelect" not in name:
                outside.append((name, start - last_end, end - start))
            exposed.append((name, max(0.0, end - last_end)))  # any idle gap before it included
            last_end = max(last_end, end)
        periods.append({
            "period_ms": (ops[b][0] - ops[a][0]) / 1e3,
            "busy_ms": sum(end - start for start, end, _ in window) / 1e3,
            "ops": len(window),
            "outside": outside,
            "exposed": exposed_by_place(exposed, ops[b][0] - last_end, layers),
        })  # fmt: skip
    if not periods:
        return {"period_ms": 0.0, "busy_ms": 0.0, "ops": 0, "outside": []}
    periods.sort(key=lambda period: period["period_ms"])
    return periods[len(periods) // 2]


def exposed_by_place(exposed: list, to_next_step: float, layers: int) -> dict:
    """A step's (op, exposed microseconds): the model's kernels between the embedding and the
    last layer's end averaged by their place in a layer (named by kernel and place), the rest
    (embedding, final norm, LM head, draw, copies) one by one, and the gap to the next step."""
    model = [i for i, (name, _) in enumerate(exposed) if kind_of(name) != "other"]
    # the layers start at the first GEMM (after the embedding's all-reduce, at tp > 1) and end
    # before the final norm, the LM head and its gather
    first = next((n for n, i in enumerate(model) if kind_of(exposed[i][0]) == "gemm"), 0)
    model = model[first:]
    per_layer = len(model) // layers
    places: list[list[float]] = [[] for _ in range(per_layer)]
    for n, i in enumerate(model[: per_layer * layers]):
        places[n % per_layer].append(exposed[i][1])
    layer_ops = set(model[: per_layer * layers])
    names = [exposed[i][0] for i in model[:per_layer]]
    return {
        "per_layer_us": [
            (f"{n}: {names[n][:40]}", statistics.mean(us)) for n, us in enumerate(places) if us
        ],
        "layer_us": sum(statistics.mean(us) for us in places if us),
        "rest_us": [(name[:60], us) for i, (name, us) in enumerate(exposed) if i not in layer_ops],
        "to_next_step_us": to_next_step,
    }


if __name__ == "__main__":
    main()
