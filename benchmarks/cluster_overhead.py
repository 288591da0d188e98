"""What the cluster costs: one closed-loop workload through `afs serve` (gRPC gateway, global
scheduler, Ray worker actor) and through the in-process engine, at several concurrencies.

    python benchmarks/cluster_overhead.py [--concurrency 1,4,16] [--input-len 64] [--output-len 64]
                                          [--model M] [--device cpu|cuda] [--tp N]

Prompts are random token ids drawn as `afs loadtest` draws them (same seed, same ids on both
paths), each generating exactly --output-len tokens. Both paths get the machine's cores in turn:
the engine in this process first, then the server with one worker actor (every CPU by default).
Figures use the load test's rules (cluster/loadtest.py). On CUDA the replica's tp ranks take one
GPU each, as the in-process engine's do (it gives them back before the server starts). Prints a
table last; writes JSON under --out (cluster_overhead_DEVICE[_tpN].json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster import loadtest
from protos.afs.v1 import inference_pb2
from workers.bench.ceilings import free_memory
from workers.bench.results import git_commit
from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams

MODEL = "smollm2-135m-instruct"


def requests_for(concurrency: int) -> int:
    return max(8, 2 * concurrency)


def loadtest_args(server: str, concurrency: int, args: argparse.Namespace) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    loadtest.add_arguments(parser)
    return parser.parse_args(
        [
            "--server", server,
            "--concurrency", str(concurrency),
            "--num-requests", str(requests_for(concurrency)),
            "--input-len", str(args.input_len),
            "--output-len", str(args.output_len),
            "--len-dist", "fixed",
            "--seed", "0",
        ]
    )  # fmt: skip


def in_process(engine: LLMEngine, concurrency: int, args: argparse.Namespace) -> dict:
    card = inference_pb2.ModelCard(
        name=MODEL, max_model_len=engine.max_model_len, vocab_size=engine.model_config.vocab_size
    )
    work = loadtest.build_workload(
        loadtest_args("-", concurrency, args), np.random.default_rng(0), card
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    records = [record for _, record in work]
    pending = list(range(len(work)))[::-1]
    inflight: dict[str, int] = {}
    start = time.perf_counter()
    while pending or inflight:
        while pending and len(inflight) < concurrency:
            index = pending.pop()
            request_id = engine.add_request(list(work[index][0].token_ids.ids), params)
            records[index].send_time = time.perf_counter()
            inflight[request_id] = index
        outputs = engine.step()
        now = time.perf_counter()
        for output in outputs:
            record = records[inflight[output.request_id]]
            if output.new_token_ids:
                record.arrival_times.append(now)
                record.token_counts.append(len(output.new_token_ids))
            if output.finished:
                del inflight[output.request_id]
    return loadtest.summarize(records, time.perf_counter() - start)


def wait_for_server(address: str, server: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.time() < deadline:
            assert server.poll() is None, "afs serve exited"
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(1)
    raise TimeoutError("afs serve did not come up")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--port", type=int, default=50071)
    parser.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        help="each worker's CPUs; default all, shared by the tp ranks",
    )
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks of the replica")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    cpus = args.cpus_per_worker or (os.cpu_count() or 1) / args.tp
    engine_flags = ["--model", args.model, "--device", args.device, "--tp", str(args.tp)]
    engine_flags += ["--max-num-seqs", "32"]
    if args.device == "cpu":
        engine_flags += ["--kv-cache-gib", "0.5"]

    engine = LLMEngine(
        model=args.model, device=args.device, tp=args.tp, kv_cache_gib=0.5, max_num_seqs=32
    )
    in_process(engine, 1, argparse.Namespace(input_len=8, output_len=4))  # warm-up
    local = {c: in_process(engine, c, args) for c in levels}
    engine.shutdown()
    del engine
    free_memory(torch.device(args.device))  # the server's replica takes the same GPUs

    address = f"127.0.0.1:{args.port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", "--port", str(args.port),
         "--metrics-port", "0", "--cpus-per-worker", str(cpus), *engine_flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_server(address, server)
        loadtest.run(loadtest_args(address, 1, argparse.Namespace(input_len=8, output_len=4)))
        remote = {c: loadtest.run(loadtest_args(address, c, args)) for c in levels}
    finally:
        server.terminate()
        server.wait(60)

    rows = []
    for c in levels:
        a, b = remote[c], local[c]
        rows.append(
            {
                "concurrency": c,
                "requests": requests_for(c),
                "cluster": a,
                "in_process": b,
                "throughput_cost": 1 - a["output_token_throughput"] / b["output_token_throughput"],
                "ttft_p50_overhead_ms": a["ttft_ms"]["p50"] - b["ttft_ms"]["p50"],
            }
        )
    result = {
        "command": "python benchmarks/cluster_overhead.py " + " ".join(sys.argv[1:]),
        "machine": platform.processor() or platform.machine(),
        "cpus": cpus,
        "git_commit": git_commit(),
        "model": args.model,
        "device": args.device,
        "tp": args.tp,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"cluster_overhead_{args.device}" + (f"_tp{args.tp}" if args.tp > 1 else "")
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(
        f"{'C':>3} {'path':<10} {'TTFT p50':>9} {'p99':>8} {'ITL p50':>8} {'p99':>8} {'tok/s':>7}"
    )
    for row in rows:
        for name in ("in_process", "cluster"):
            r = row[name]
            print(
                f"{row['concurrency']:>3} {name:<10} {r['ttft_ms']['p50']:9.1f} "
                f"{r['ttft_ms']['p99']:8.1f} {r['itl_ms']['p50']:8.1f} {r['itl_ms']['p99']:8.1f} "
                f"{r['output_token_throughput']:7.1f}"
            )
        print(
            f"    cluster cost: {100 * row['throughput_cost']:.1f}% of throughput, "
            f"{row['ttft_p50_overhead_ms']:+.1f} ms TTFT p50"
        )


if __name__ == "__main__":
    main()
