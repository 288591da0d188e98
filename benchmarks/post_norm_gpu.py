"""Olmo 2's post-norm formed inside the next projection (`rms_norm_add_matmul`) against the norm's
own kernel then the projection, at batch 1 on one GPU, in one call.

    python3 benchmarks/post_norm_gpu.py [--out DIR] [--sweep] [--write-table]

For each projection a post-norm feeds (QKV and gate/up of dummy:olmo2-1b and -7b, one row): the
fused call checked against the two kernels (the stream within one bf16 rounding, the product
bitwise the plain kernel's on that stream), then chains timed, each replayed from a CUDA graph
with PDL as the engine runs them, every call on another copy of the weight (copies > 512 MiB in
all, so L2 never holds the next one):

    matmul   the projection alone, the layers' config (its floor here)
    apart    the norm-and-add kernel, then the projection
    fused    rms_norm_add_matmul with the config the layers would give it (fused.py), if any

With --sweep, one-row cuts on the CUDA cores (`fma`: tile width, K step, warps, stages) are timed
fused as well; the fastest is listed for the shape if it beats `apart` by 2% or more, in
post_norm_configs.json under --out and, with --write-table, in kernels/skinny_matmul_configs.json
under this GPU's name (key "NxK m1 norm"), which the layers then follow.
Prints microseconds per call, the weight's read at the copy rate measured first, and what the
fused call saves; writes post_norm_gpu.json under --out.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch
from skinny_gpu import MODELS, graph_us, projections, write_table

from kernels.rmsnorm import rms_norm_add
from kernels.skinny_matmul import (
    Config,
    measured_config,
    rms_norm_add_matmul,
    skinny_matmul,
    table_key,
)
from workers.bench.ceilings import measure_ceilings
from workers.layers.fused import post_norm_route

EPS = 1e-6
SHAPES = {  # name: (N, K), the projections a post-norm feeds
    f"{model} {name}": projections(hidden, inter, vocab)[name]
    for model in ("1b", "7b")
    for hidden, inter, _, vocab in [MODELS[model]]
    for name in ("qkv", "gate_up")
}


def chain_us(step, copies: int) -> float:
    """Microseconds per call of `step(i)` for i over the copies, replayed from one graph (the
    best of three timings of 20 replays)."""
    calls = [functools.partial(step, i) for i in range(copies)]
    return min(graph_us(calls, torch.device("cuda"), repeats=20) for _ in range(3))


SWEEP = [
    Config(block_n, block_k, 1, warps, stages, fma=True)
    for block_n in (8, 16)
    for block_k in (512, 1024)
    for warps in (2, 4)
    for stages in (2, 4)
]


def measure(n: int, k: int, sweep: bool) -> dict:
    """One shape: the checks and each chain's microseconds per call."""
    copies = max(2, -(-(512 << 20) // (n * k * 2)))
    weights = [torch.randn(n, k, device="cuda").bfloat16() / k**0.5 for _ in range(copies)]
    x = torch.randn(1, k, device="cuda").bfloat16() * 4
    residual = torch.randn(1, k, device="cuda").bfloat16()
    norm_weight = (1 + torch.randn(k, device="cuda") / 4).bfloat16()
    plain = measured_config(x, weights[0])
    want = rms_norm_add(x, residual, norm_weight, EPS)

    def matmul(i):
        skinny_matmul(want, weights[i], config=plain)

    def apart(i):
        skinny_matmul(rms_norm_add(x, residual, norm_weight, EPS), weights[i], config=plain)

    def fused_with(config):
        def fused(i):
            rms_norm_add_matmul(x, residual, norm_weight, EPS, weights[i], config=config)

        return fused

    def checks(config) -> dict:
        stream, product = rms_norm_add_matmul(
            x, residual, norm_weight, EPS, weights[0], config=config
        )
        return dict(
            stream_max_diff=(stream.float() - want.float()).abs().max().item(),
            product_bitwise=torch.equal(product, skinny_matmul(stream, weights[0], config=config)),
        )

    row = dict(n=n, k=k, plain=list(plain) if plain else None, copies=copies)
    row["us"] = {"matmul": chain_us(matmul, copies), "apart": chain_us(apart, copies)}
    takes, layers = post_norm_route(x, weights[0])
    if takes:
        row["layers"] = list(layers) if layers else None
        row["us"]["fused"] = chain_us(fused_with(layers), copies)
        row |= checks(layers)
    if sweep:
        row["sweep"] = {}
        for config in SWEEP:
            bad = checks(config)
            if bad["stream_max_diff"] > 0.0625 or not bad["product_bitwise"]:
                row["sweep"][json.dumps(list(config))] = dict(bad, us=None)
                continue
            row["sweep"][json.dumps(list(config))] = dict(
                bad, us=chain_us(fused_with(config), copies)
            )
        timed = [(v["us"], c) for c, v in row["sweep"].items() if v["us"] is not None]
        row["best"] = min(timed) if timed else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--write-table", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    copy_gbps = measure_ceilings(torch.device("cuda"), dtypes=["bfloat16"], repeats=20)["copy_gbps"]
    rows, entries = {}, {}
    for name, (n, k) in SHAPES.items():
        rows[name] = row = measure(n, k, args.sweep)
        torch.cuda.empty_cache()
        best = row.get("best")
        if best and best[0] < 0.98 * row["us"]["apart"]:
            entries[table_key(n, k, 1, norm=True)] = {
                "config": json.loads(best[1]),
                "apart_us": row["us"]["apart"],
                "label": f"{name} m1 norm",
                "us": best[0],
            }
        (args.out / "post_norm_gpu.json").write_text(
            json.dumps({"copy_gbps": copy_gbps, **rows}, indent=1)
        )
    if args.sweep:
        (args.out / "post_norm_configs.json").write_text(json.dumps(entries, indent=1))
        if args.write_table and entries:  # added or replaced; other entries stay
            write_table(torch.cuda.get_device_name(), entries, set(), args.out)
    print(
        f"{'shape':>12} | {'read':>6} | {'matmul':>7} | {'apart':>7} | {'fused':>7} | {'swept':>7}"
    )
    for name, row in rows.items():
        us = row["us"]
        fused = f"{us['fused']:7.2f}" if "fused" in us else "      -"
        swept = f"{row['best'][0]:7.2f} {row['best'][1]}" if row.get("best") else "-"
        read = row["n"] * row["k"] * 2 / (copy_gbps * 1e3)
        print(
            f"{name:>12} | {read:6.2f} | {us['matmul']:7.2f} | {us['apart']:7.2f} | {fused} "
            f"| {swept}"
        )
    print("listed:", ", ".join(entries) or "none")


if __name__ == "__main__":
    main()
