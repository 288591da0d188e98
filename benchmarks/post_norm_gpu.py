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
Prints microseconds per call and what the fused call saves; writes post_norm_gpu.json under --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import kernels.skinny_matmul as skinny_module
from kernels.rmsnorm import rms_norm_add
from kernels.skinny_matmul import (
    Config,
    measured_config,
    rms_norm_add_matmul,
    skinny_matmul,
    table_key,
)

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
    row["us"] = {"matmul": time_chain(matmul, copies), "apart": time_chain(apart, copies)}
    layers = layers_config(x, weights[0])
    if layers is not False:
        row["layers"] = list(layers) if layers else None
        row["us"]["fused"] = time_chain(fused_with(layers), copies)
        row |= checks(layers)
    if sweep:
        row["sweep"] = {}
        for config in SWEEP:
            bad = checks(config)
            if bad["stream_max_diff"] > 0.0625 or not bad["product_bitwise"]:
                row["sweep"][json.dumps(list(config))] = dict(bad, us=None)
                continue
            row["sweep"][json.dumps(list(config))] = dict(
                bad, us=time_chain(fused_with(config), copies)
            )
        timed = [(v["us"], c) for c, v in row["sweep"].items() if v["us"] is not None]
        row["best"] = min(timed) if timed else None
    return row


def layers_config(x: torch.Tensor, weight: torch.Tensor):
    """The config the layers would give the fused call (fused.rms_norm_add_linear's rule), or
    False where they would not fuse it."""
    config = measured_config(x, weight, norm=True)
    if config is not None:
        return config
    plain = measured_config(x, weight)
    return plain if plain is not None and plain.fma else False


def write_table(entries: dict, out: Path, write: bool) -> None:
    """The sweep's winners into post_norm_configs.json under out (and the kernel's table)."""
    (out / "post_norm_configs.json").write_text(json.dumps(entries, indent=1))
    if not write or not entries:
        return
    path = Path(skinny_module.__file__).with_name("skinny_matmul_configs.json")
    table = json.loads(path.read_text()) if path.exists() else {}
    table.setdefault(torch.cuda.get_device_name(), {}).update(entries)
    for gpu in table:
        table[gpu] = dict(sorted(table[gpu].items()))
    path.write_text(json.dumps(table, indent=1) + "\n")
    skinny_module._table.cache_clear()
    skinny_module._device_table.cache_clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--write-table", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
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
        (args.out / "post_norm_gpu.json").write_text(json.dumps(rows, indent=1))
    if args.sweep:
        write_table(entries, args.out, args.write_table)
    print(
        f"{'shape':>12} | {'read':>6} | {'matmul':>7} | {'apart':>7} | {'fused':>7} | {'swept':>7}"
    )
    for name, row in rows.items():
        us = row["us"]
        fused = f"{us['fused']:7.2f}" if "fused" in us else "      -"
        swept = f"{row['best'][0]:7.2f} {row['best'][1]}" if row.get("best") else "-"
        read = row["n"] * row["k"] * 2 / 4249e3
        print(
            f"{name:>12} | {read:6.2f} | {us['matmul']:7.2f} | {us['apart']:7.2f} | {fused} "
            f"| {swept}"
        )
    print("listed:", ", ".join(entries) or "none")


if __name__ == "__main__":
    main()
