"""Offline throughput of the in-process engine: a whole workload queued at once, run to the end.

    afs bench throughput [--model dummy:olmo2-1b] [--workload default|fixed|shared-prefix]
                         [--num-requests 256] [--input-len-range 100,1024]
                         [--output-len-range 100,1024] [--seed 0] [--peer hf] ...

Workloads, all random token ids with `ignore_eos` and greedy decoding, drawn from `--seed`:
- default: as nano-vllm's published benchmark, lengths uniform in the two ranges;
- fixed: every prompt and output as long as its range's upper end (a range may be one number);
- shared-prefix: `--prefix-len` common tokens, then a unique suffix of the default's length.

A decode step is a step of the engine whose every row is one token past its prompt: the schedule
of each step is recorded as the step completes (the scheduler's `update` is wrapped), so steps
that carry prompt tokens, chunks or recomputation after a preemption are left out. Its
floor is the weights plus every row's K/V context over the measured bandwidth; the whole run's
floor sums every step's (compute-bound for prefill). With `--peer hf`, transformers' `generate()`
runs the same requests on the same weights in batches of `--peer-batch-size`, sorted by output
length and then prompt length so that each batch wastes few steps; a batch runs until its longest
output, with left padding, and only each request's own output counts.
"""

from __future__ import annotations

import argparse
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from workers.bench.ceilings import Roofline, free_memory, now, ratios
from workers.bench.compiles import watch_compiles
from workers.bench.latency import (
    add_engine_arguments,
    build_engine,
    engine_facts,
    hf_generate,
    hf_peer_model,
    parse_lengths,
    prepare,
    random_tokens,
)
from workers.bench.results import write_result
from workers.config import EngineConfig
from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams

WORKLOADS = ("default", "fixed", "shared-prefix")
_GIB = 1 << 30

Workload = list[tuple[list[int], int]]  # (prompt token ids, output length) per request


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    add = parser.add_argument
    add("--workload", choices=WORKLOADS, default="default")
    add("--num-requests", type=int, default=256)
    add("--input-len-range", type=_length_range, default=(100, 1024), help="LO,HI or N")
    add("--output-len-range", type=_length_range, default=(100, 1024), help="LO,HI or N")
    add("--prefix-len", type=int, default=512, help="shared-prefix: tokens every prompt shares")
    add("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs)
    add(
        "--max-num-batched-tokens",
        type=int,
        default=EngineConfig.max_num_batched_tokens,
        help="token budget of one step (default: the engine's, 8192 on CUDA, 2048 on CPU)",
    )
    add("--peer-batch-size", type=int, default=64, help="requests per generate() of the peer")


def _length_range(text: str) -> tuple[int, int]:
    lengths = parse_lengths(text)
    if len(lengths) > 2 or lengths[0] > lengths[-1]:
        raise argparse.ArgumentTypeError(f"{text!r}: need LO,HI with LO <= HI, or N")
    return lengths[0], lengths[-1]


def make_workload(args: argparse.Namespace, vocab_size: int) -> Workload:
    rng = random.Random(args.seed)
    prefix = (
        random_tokens(rng, args.prefix_len, vocab_size) if args.workload == WORKLOADS[2] else []
    )
    workload = []
    for _ in range(args.num_requests):
        if args.workload == "fixed":
            input_len, output_len = args.input_len_range[1], args.output_len_range[1]
        else:
            input_len = rng.randint(*args.input_len_range)
            output_len = rng.randint(*args.output_len_range)
        workload.append((prefix + random_tokens(rng, input_len, vocab_size), output_len))
    return workload


@dataclass
class _Step:
    """What the scheduler put in one step, recorded as it was scheduled."""

    rows: list[tuple[int, int]]
    """(tokens already cached, new tokens) per scheduled request."""
    sampled: int
    decode: bool
    used_blocks: int


def _record_schedules(engine: LLMEngine, steps: list[_Step]) -> None:
    """One record per step the engine completes, from the schedule it ran (`update` is wrapped:
    it sees every step once, also one scheduled ahead)."""
    scheduler, pool = engine.scheduler, engine.kv.pool
    update = scheduler.update

    def prompt_len(request_id: str) -> int:
        request = scheduler.requests.get(request_id)  # gone if aborted while the step ran
        return request.num_prompt_tokens if request is not None else 0

    def recording_update(out, sampled):
        decode = bool(out.requests) and all(
            len(s.token_ids) == 1 and s.num_computed_tokens >= prompt_len(s.request_id)
            for s in out.requests
        )
        rows = [(s.num_computed_tokens, len(s.token_ids)) for s in out.requests]
        sampled_rows = sum(s.sample for s in out.requests)
        steps.append(_Step(rows, sampled_rows, decode, pool.num_blocks - pool.num_free_blocks))
        return update(out, sampled)

    scheduler.update = recording_update


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak RSS


def _afs_run(
    engine: LLMEngine, workload: Workload, roofline: Roofline
) -> tuple[dict[str, Any], dict[str, float]]:
    device, kv, scheduler = engine.device, engine.kv, engine.scheduler
    preemptions, queries, hits = (
        scheduler.num_preemptions,
        kv.prefix_query_tokens,
        kv.prefix_hit_tokens,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps: list[_Step] = []
    _record_schedules(engine, steps)
    expected = sum(output_len for _, output_len in workload)
    times, generated = [], 0
    with tqdm(total=expected, desc="afs throughput", unit="tok") as bar:
        start = now(device)
        for index, (prompt, output_len) in enumerate(workload):
            params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
            engine.add_request(prompt, params, request_id=f"bench-{index}")
        while engine.has_unfinished_requests():
            # a host clock: a step returns once its ids are on the host, and waiting for the
            # GPU here would also wait for the next step queued ahead, undoing the overlap
            step_start = time.perf_counter()
            outputs = engine.step()
            times.append(time.perf_counter() - step_start)
            new = sum(len(o.new_token_ids) for o in outputs)
            if any(o.error for o in outputs):
                raise RuntimeError(next(o.error for o in outputs if o.error))
            generated += new
            bar.update(new)
        wall = now(device) - start
    if generated != expected:
        raise RuntimeError(f"the engine generated {generated} tokens, not {expected}")

    floors = [roofline.step_seconds(s.rows, s.sampled) for s in steps]
    decode = [i for i, s in enumerate(steps) if s.decode]
    decode_time = sum(times[i] for i in decode)
    decode_floor = sum(floors[i] for i in decode)
    prompt_tokens = sum(len(prompt) for prompt, _ in workload)
    queried = kv.prefix_query_tokens - queries
    figures = {
        "output_tok_s": generated / wall,
        "total_tok_s": (prompt_tokens + generated) / wall,
        "requests_s": len(workload) / wall,
        "wall_s": wall,
        "roofline_fraction": sum(floors) / wall,
        "steps": len(steps),
        "decode_steps": len(decode),
        "peak_memory_gib": _peak_memory_bytes(device) / _GIB,
        "kv_usage_peak": max(s.used_blocks for s in steps) / kv.pool.num_blocks,
        "preemptions": scheduler.num_preemptions - preemptions,
        "prefix_hit_rate": (kv.prefix_hit_tokens - hits) / queried if queried else 0.0,
        "prompt_tokens": prompt_tokens,
        "output_tokens": generated,
    }
    floor = {"wall_s": sum(floors), "output_tok_s": generated / sum(floors)}
    if decode:  # absent only when every output is one token long
        figures["decode_step_ms"] = decode_time * 1e3 / len(decode)
        figures["decode_batch_mean"] = sum(len(steps[i].rows) for i in decode) / len(decode)
        figures["decode_roofline_fraction"] = decode_floor / decode_time
        floor["decode_step_ms"] = decode_floor * 1e3 / len(decode)
    return figures, floor


def _hf_run(
    hf: torch.nn.Module, workload: Workload, batch_size: int, device: torch.device
) -> dict[str, Any]:
    order = sorted(range(len(workload)), key=lambda i: (workload[i][1], len(workload[i][0])))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    hf_generate(hf, [workload[order[0]][0][:16]], 2)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, computed = now(device), 0
    for batch in tqdm(batches, desc="hf throughput", unit="batch"):
        longest = max(workload[i][1] for i in batch)
        hf_generate(hf, [workload[i][0] for i in batch], longest)
        computed += longest * len(batch)
    wall = now(device) - start
    prompt_tokens = sum(len(prompt) for prompt, _ in workload)
    output_tokens = sum(output_len for _, output_len in workload)
    figures = {
        "output_tok_s": output_tokens / wall,
        "total_tok_s": (prompt_tokens + output_tokens) / wall,
        "requests_s": len(workload) / wall,
        "wall_s": wall,
        "generated_tokens": computed,  # every row runs to its batch's longest output
    }
    if device.type == "cuda":  # on CPU the process's peak RSS would include the engine's
        figures["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / _GIB
    return figures


def run(args: argparse.Namespace) -> Path:
    if args.num_requests < 1 or args.peer_batch_size < 1 or args.prefix_len < 0:
        raise ValueError("--num-requests and --peer-batch-size must be >= 1, --prefix-len >= 0")
    prefix_len = args.prefix_len if args.workload == "shared-prefix" else 0
    longest = prefix_len + args.input_len_range[1] + args.output_len_range[1]
    device, ceilings = prepare(args, longest)
    engine = build_engine(
        args,
        device,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    model, model_config = engine.model, engine.model_config
    roofline = Roofline.for_model(model, model_config, ceilings)
    workload = make_workload(args, model_config.vocab_size)
    # prompts no request of the workload shares, at its first requests' lengths: the kernels a
    # first mixed prefill of those lengths compiles are compiled before the clock starts
    warmup_rng = random.Random(args.seed + 1)
    warmup = [
        random_tokens(warmup_rng, len(prompt), model_config.vocab_size)
        for prompt, _ in workload[:8]
    ]
    engine.generate(warmup, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    with watch_compiles() as compiles:
        figures, floors = _afs_run(engine, workload, roofline)
    figures["kernel_compiles_timed"] = len(compiles)
    slab_bytes = engine.num_kv_blocks * engine.config.block_size * roofline.kv_bytes_per_token
    config = {
        "model": args.model,
        "dtype": model_config.dtype,
        "device": str(device),
        "workload": args.workload,
        "num_requests": args.num_requests,
        "input_len_range": list(args.input_len_range),
        "output_len_range": list(args.output_len_range),
        "prefix_len": prefix_len,
        "seed": args.seed,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": engine.scheduler.max_num_batched_tokens,
        "num_kv_blocks": engine.num_kv_blocks,
        "block_size": engine.config.block_size,
        "kv_slab_gib": slab_bytes / _GIB,  # inside peak_memory_gib on a GPU
        "weight_bytes": roofline.weight_bytes,
        "kv_bytes_per_token": roofline.kv_bytes_per_token,
        "compiled_while_timed": compiles,  # each a stall a warmed-up server would not have
        **engine_facts(engine),
    }
    engine.shutdown()  # the other ranks' processes, when tp > 1

    peers = {}
    if args.peer == "hf":
        del engine
        free_memory(device)
        hf = hf_peer_model(model, model_config)
        del model
        free_memory(device)
        peer = _hf_run(hf, workload, args.peer_batch_size, device)
        peers["hf"] = {
            "figures": peer,
            "afs_over_peer": ratios(figures, peer),
            "batch_size": args.peer_batch_size,
            "attn_implementation": hf.config._attn_implementation,
        }

    summary = (
        f"{args.workload} ×{args.num_requests}: {figures['output_tok_s']:,.1f} output tok/s, "
        f"{figures['total_tok_s']:,.1f} total tok/s "
        f"({figures['roofline_fraction']:.2f} of roofline)"
    )
    if "decode_step_ms" in figures:
        summary += (
            f", decode step {figures['decode_step_ms']:.2f} ms "
            f"({figures['decode_roofline_fraction']:.2f} of roofline)"
        )
    if peers:
        summary += f", {peers['hf']['afs_over_peer']['output_tok_s']:.2f}× HF"
    if compiles:
        seconds = sum(c["seconds"] or 0.0 for c in compiles)
        summary += f"; {len(compiles)} kernel compiles while timed ({seconds:.2f} s)"
    print(summary)
    return write_result(
        "throughput", config, figures, {"ceilings": ceilings, **floors}, peers, summary,
        args.out_dir, args.report,
    )  # fmt: skip
