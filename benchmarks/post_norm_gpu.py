"""Olmo 2's post-norm formed inside the next projection (`rms_norm_add_matmul`) against the norm's
own kernel then the projection, at batch 1 on one GPU, in one call.

    python3 benchmarks/post_norm_gpu.py [--out DIR]

For each projection a post-norm feeds (QKV and gate/up of dummy:olmo2-1b and -7b, one row, the
layers' measured configs): the fused call checked against the two kernels (the stream within one
bf16 rounding, the product bitwise the plain kernel's on that stream), then three chains timed,
each replayed from a CUDA graph with PDL as the engine runs them, every call on another copy of
the weight (copies > 512 MiB in all, so L2 never holds the next one):

    matmul   the projection alone (its floor here)
    apart    the norm-and-add kernel, then the projection
    fused    rms_norm_add_matmul

Prints microseconds per call and what the fused call saves; writes post_norm_gpu.json under --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kernels.rmsnorm import rms_norm_add
from kernels.skinny_matmul import measured_config, rms_norm_add_matmul, skinny_matmul

EPS = 1e-6
SHAPES = {  # name: (N, K)
    "1b qkv": (6144, 2048),
    "1b gate_up": (16384, 2048),
    "7b qkv": (12288, 4096),
    "7b gate_up": (22016, 4096),
}


def time_chain(step, copies: int, reps: int = 20) -> float:
    """Microseconds per call of `step(i)` for i over the copies, replayed from one graph."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for i in range(copies):  # compile and warm outside the capture
            step(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            step(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / (reps * copies))
    return best


def measure(n: int, k: int) -> dict:
    """One shape: the checks and the three chains' microseconds per call."""
    copies = max(2, -(-(512 << 20) // (n * k * 2)))
    weights = [torch.randn(n, k, device="cuda").bfloat16() / k**0.5 for _ in range(copies)]
    x = torch.randn(1, k, device="cuda").bfloat16() * 4
    residual = torch.randn(1, k, device="cuda").bfloat16()
    norm_weight = (1 + torch.randn(k, device="cuda") / 4).bfloat16()
    config = measured_config(x, weights[0])
    stream, product = rms_norm_add_matmul(x, residual, norm_weight, EPS, weights[0], config=config)
    want = rms_norm_add(x, residual, norm_weight, EPS)

    def matmul(i):
        skinny_matmul(want, weights[i], config=config)

    def apart(i):
        skinny_matmul(rms_norm_add(x, residual, norm_weight, EPS), weights[i], config=config)

    def fused(i):
        rms_norm_add_matmul(x, residual, norm_weight, EPS, weights[i], config=config)

    chains = (("matmul", matmul), ("apart", apart), ("fused", fused))
    return dict(
        n=n, k=k, config=list(config) if config else None, copies=copies,
        stream_max_diff=(stream.float() - want.float()).abs().max().item(),
        product_bitwise=torch.equal(product, skinny_matmul(stream, weights[0], config=config)),
        us={label: time_chain(fn, copies) for label, fn in chains},
        read_us_at_4249=n * k * 2 / 4249e3,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = {}
    for name, (n, k) in SHAPES.items():
        rows[name] = measure(n, k)
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "post_norm_gpu.json").write_text(json.dumps(rows, indent=1))
    print(
        f"{'shape':>12} | {'read':>6} | {'matmul':>7} | {'apart':>7} | {'fused':>7} | saves"
        " | checks"
    )
    for name, row in rows.items():
        us = row["us"]
        print(
            f"{name:>12} | {row['read_us_at_4249']:6.2f} | {us['matmul']:7.2f} "
            f"| {us['apart']:7.2f} "
            f"| {us['fused']:7.2f} | {us['apart'] - us['fused']:5.2f} | stream diff "
            f"{row['stream_max_diff']:.3g}, product bitwise {row['product_bitwise']}"
        )


if __name__ == "__main__":
    main()
