"""The decode matmul (kernels/skinny_matmul.py) against cuBLAS on one GPU, in one call.

    python3 benchmarks/skinny_gpu.py [--out DIR] [--deadline SECONDS] [--models 1b,7b]
                                     [--parts sweep,check,alone,chain,rates] [--sweep-rows 1]

0. (part "sweep") For every decode weight shape of the --models (of 1b, 7b, 13b; 7B's and 13B's
   halves at tp = 2 too; --tps 1 for tp = 1 only), at the --sweep-rows (1, the default; 8 for
   the entries that serve batches of 2 to 16, 64 for those of 17 to 64), and for down_proj with
   SwiGLU inside: each candidate cut (`Config`: tile width, K step, slices, warps, stages;
   one-row calls on the CUDA cores as well) checked against the fp32 product and timed as in 2;
   the fastest re-timed beside cuBLAS (and the activation kernel, for SwiGLU). Shapes where it
   beats cuBLAS by 3% or more go into kernels/skinny_matmul_configs.json under this GPU's name
   (here and under --out), which the layers then follow (fused.py) and the later parts take. A
   shape already listed stays while it beats cuBLAS at all: some narrow wins alone were added
   after they won end to end, and a sweep does not drop them for missing the bar.
1. Correctness, bf16: every decode projection of dummy:olmo2-1b and -7b (and 7B's halves at tp = 2)
   at 1, 8 and 64 rows against the fp32 product rounded to bf16 (cuBLAS's difference beside), and
   down_proj with SwiGLU inside against the activation kernel then that product: the largest
   difference over the output's largest magnitude.
2. Each projection alone: calls replayed from a CUDA graph, each call on another copy of the
   weight (copies > 512 MiB in all, so the 50 MiB L2 never holds the next one): microseconds per
   call and the read rate as a fraction of the copy rate measured here, cuBLAS beside.
3. A step's chain: every layer's four projections in order (distinct weights, as in a model; the
   SwiGLU activation before down_proj: its own kernel beside cuBLAS, inside ours), then the LM
   head, in one graph: time per decode step, cuBLAS against the kernel's default plan (without
   and with PDL) and against the layers' choice (measured configs where listed, else cuBLAS).
4. Batch-1 decode tok/s of the engine (128-token prompt, 128 new), PDL on: cuBLAS only
   (AFS_SKINNY_MATMUL=0), with the attention prologue inside the decode kernel
   (AFS_DECODE_PROLOGUE_MAX_BATCH=16, the default) and apart (0); the measured shapes
   through the kernel (unset, the default); every projection through it (=1); for each model,
   7B at tp = 2 as well where two GPUs are visible.
   A variant that fails is recorded with its error.
Prints a table last; writes skinny_gpu_<parts>.json under --out after each part.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import time
from itertools import product
from pathlib import Path

import torch
import torch.nn.functional as F
import tp_gpu

from kernels import launch
from kernels import skinny_matmul as skinny_module
from kernels.activation import silu_and_mul
from kernels.skinny_matmul import Config, plan, row_tile, skinny_matmul, table_key
from workers.attention import triton_backend
from workers.bench.ceilings import free_memory, measure_ceilings
from workers.bench.results import git_commit
from workers.layers import fused

# (hidden, intermediate, layers, vocab) of the dummy Olmo 2 models
MODELS = {
    "1b": (2048, 8192, 16, 100352),
    "7b": (4096, 11008, 32, 100352),
    "13b": (5120, 13824, 40, 100352),
}
# label, AFS_SKINNY_MATMUL (None: unset, the measured shapes only), the decode kernel taking the
# attention prologue (AFS_DECODE_PROLOGUE_MAX_BATCH=16, the default) or not (0); PDL on
RATE_VARIANTS = (
    ("cublas", False, 16),
    ("cublas_prologue_apart", False, 0),
    ("table", None, 16),
    ("ours", True, 16),
)


def projections(hidden: int, inter: int, vocab: int, tp: int = 1) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of one rank's decode weights."""
    return {
        "qkv": (3 * hidden // tp, hidden),
        "o_proj": (hidden, hidden // tp),
        "gate_up": (2 * inter // tp, hidden),
        "down": (hidden, inter // tp),
        "lm_head": (vocab // tp, hidden),
    }


def rank_projections(models: list[str], tps: tuple[int, ...] = (1, 2)):
    """(label, N, K) of every decode weight of a rank: 1B, 7B (13B), their halves at tp = 2."""
    for model in models:
        hidden, inter, _, vocab = MODELS[model]
        for tp in (1,) if model == "1b" else tps:
            for name, (n, k) in projections(hidden, inter, vocab, tp).items():
                yield f"{model} tp{tp} {name}", n, k


def _max_rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest |got - want| over want's largest magnitude."""
    return ((got.float() - want).abs().max() / want.abs().max()).item()


def graph_us(calls: list, device: torch.device, repeats: int = 5) -> float:
    """Microseconds per call of `calls` (thunks) captured in order in one graph and replayed."""
    for call in calls[:3]:
        call()  # compiled, workspace made, cuBLAS settled before the capture
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize(device)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) * 1e3 / (repeats * len(calls))


SMEM_PER_SM = 228 * 1024  # H100/H200


def candidates(n: int, k: int, m: int, num_sms: int) -> list[Config]:
    """The cuts a sweep tries for an N x K weight at m rows: the default plan; tl.dot tiles of 32
    to 128 features with K steps of 64 to 256 and 3 to 8 pipeline stages, each unsplit, split
    about as the plan would (half and twice that too), and split so that the programs fill the
    GPU's resident slots (by shared memory) exactly once or twice (no last, partial wave); for
    one row, narrow tiles on the CUDA cores too."""
    found = [plan(n, k, num_sms)]

    def splits(block_n: int, block_k: int, per_sm: int, resident: int) -> set[int]:
        steps = -(-k // block_k)
        tiles = -(-n // block_n)
        auto = max(1, min(steps // 2, round(per_sm * num_sms / tiles)))
        waves = {max(1, min(steps, round(w * resident * num_sms / tiles))) for w in (1, 2)}
        return {1, auto, max(1, auto // 2), min(steps, 2 * auto)} | waves

    dot_tiles = (
        (32, 128, (3, 6)),
        (64, 128, (3, 5)),
        (128, 128, (3, 4)),
        (32, 256, (3,)),
        (64, 256, (3,)),
        (64, 64, (4, 8)),
        (128, 64, (4, 8)),
    )
    pad = row_tile(m, found[0])  # x's rows as the kernel pads them for tl.dot
    for block_n, block_k, stage_counts in dot_tiles:
        for stages in stage_counts:
            smem = stages * (block_n + pad) * block_k * 2
            if smem > SMEM_PER_SM:
                continue
            resident = max(1, min(4, SMEM_PER_SM // smem))
            for split in sorted(splits(block_n, block_k, 4, resident)):
                found.append(Config(block_n, block_k, split, 4, stages))
    if m == 1:
        fma_tiles = ((8, 512), (16, 256), (32, 256), (8, 1024))
        for (block_n, block_k), (warps, stages) in product(fma_tiles, ((2, 2), (4, 2), (4, 4))):
            for split in sorted(splits(block_n, block_k, 8, 8)):
                found.append(Config(block_n, block_k, split, warps, stages, True))
    return list(dict.fromkeys(found))


def sweep(
    result: dict,
    save,
    device: torch.device,
    out: Path,
    models: list[str],
    sweep_rows: list[int],
    tps: tuple[int, ...],
) -> None:
    num_sms = launch.num_sms(device)
    gpu = torch.cuda.get_device_name(device)
    rows: dict = {}
    result["sweep"] = rows
    table: dict = {}
    swept: set[str] = set()
    listed = set(skinny_module._table(gpu))  # entries already in the table: kept while they win
    shapes = []
    for label, n, k in rank_projections(models, tps):
        shapes.append((label, n, k, False))
        if label.endswith(" down"):
            shapes.append((label + " swiglu", n, k, True))
    for label, n, k, swiglu in shapes:
        nbytes = n * k * 2
        copies = max(2, -(-(256 << 20) // nbytes))
        weights = [(torch.randn(n, k, device=device) / k**0.5).bfloat16() for _ in range(copies)]
        for m in sweep_rows:
            key = table_key(n, k, m, swiglu)
            if key in table or f"{key} (slower)" in rows:
                continue  # the same shape from another model
            x = torch.randn(m, 2 * k if swiglu else k, device=device).bfloat16()
            act = silu_and_mul(x) if swiglu else x
            want = (act.float() @ weights[0].float().T).bfloat16().float()

            def cublas(w, x=x, swiglu=swiglu):
                return F.linear(silu_and_mul(x) if swiglu else x, w)

            def ours(config, x=x, swiglu=swiglu, weights=weights):  # a call a weight copy
                return [
                    lambda w=w: skinny_matmul(x, w, swiglu=swiglu, config=config) for w in weights
                ]

            timed = []
            for config in candidates(n, k, m, num_sms):
                try:
                    got = skinny_matmul(x, weights[0], swiglu=swiglu, config=config)
                    if _max_rel_diff(got, want) > 1.6e-2:
                        continue
                    timed.append((graph_us(ours(config), device), config))
                except Exception as exc:  # noqa: BLE001 - a candidate that fails is skipped
                    print(label, m, config, "failed:", repr(exc)[:200], flush=True)
            if not timed:
                continue
            timed.sort(key=lambda t: t[0])
            best = timed[0][1]
            cublas_calls = [lambda w=w: cublas(w) for w in weights]
            ours_us = min(graph_us(ours(best), device, 20) for _ in range(2))
            cublas_us = min(graph_us(cublas_calls, device, 20) for _ in range(2))
            row = {
                "label": f"{label} m{m}",
                "config": list(best),
                "us": ours_us,
                "cublas_us": cublas_us,
                "candidates": len(timed),
                "runner_up": [[us, list(c)] for us, c in timed[1:4]],
            }
            faster = ours_us < (1.0 if key in listed else 0.97) * cublas_us
            swept.add(key)
            rows[key if faster else f"{key} (slower)"] = row
            if faster:
                table[key] = {k_: row[k_] for k_ in ("config", "us", "cublas_us", "label")}
            print(
                f"{label} m{m}: ours {ours_us:.1f} us {best} cuBLAS {cublas_us:.1f} us", flush=True
            )
        del weights
        free_memory(device)
        save()
        write_table(gpu, table, swept, out)  # after each shape: a run cut short keeps its part
    print(f"{len(table)} of {len(rows)} shapes faster than cuBLAS", flush=True)


def write_table(gpu: str, table: dict, swept: set[str], out: Path) -> None:
    """This GPU's measured configs into kernels/skinny_matmul_configs.json and a copy under
    --out: the shapes swept now replace their old entries (or drop them, where cuBLAS won), the
    rest and other GPUs' are kept. The layers take them from the next call on."""
    path = skinny_module._TABLE_PATH
    tables = json.loads(path.read_text()) if path.exists() else {}
    entries = {k: v for k, v in tables.get(gpu, {}).items() if k not in swept}
    tables[gpu] = dict(sorted({**entries, **table}.items()))
    text = json.dumps(tables, indent=1, sort_keys=True) + "\n"
    path.write_text(text)
    (out / path.name).write_text(text)
    skinny_module._table.cache_clear()
    skinny_module._device_table.cache_clear()


def check(result: dict, save, device: torch.device, models: list[str]) -> None:
    rows = {}
    gen = torch.Generator(device).manual_seed(0)
    for label, n, k in rank_projections(models):
        w = (torch.randn(n, k, device=device, generator=gen) / k**0.5).bfloat16()
        for m in (1, 8, 64):
            x = torch.randn(m, k, device=device, generator=gen).bfloat16()
            want = (x.float() @ w.float().T).bfloat16().float()
            rows[f"{label} m{m}"] = {
                "ours": _max_rel_diff(skinny_matmul(x, w), want),
                "cublas": _max_rel_diff(F.linear(x, w), want),
            }
            if label.endswith("tp1 down"):
                # with SwiGLU inside, against the activation kernel then the fp32 product
                gate_up = torch.randn(m, 2 * k, device=device, generator=gen).bfloat16()
                act = silu_and_mul(gate_up)
                want = (act.float() @ w.float().T).bfloat16().float()
                rows[f"{label} swiglu m{m}"] = {
                    "ours": _max_rel_diff(skinny_matmul(gate_up, w, swiglu=True), want),
                    "cublas": _max_rel_diff(F.linear(act, w), want),
                }
        del w
    result["check_bf16_max_rel_diff"] = rows
    worst = max(r["ours"] for r in rows.values())
    result["check_ok"] = worst <= 1.6e-2
    print(f"bf16 check: largest difference {worst:.2e} of the output's scale", flush=True)
    save()


def alone(result: dict, save, device: torch.device, copy_gbps: float, models: list[str]) -> None:
    rows = {}
    for shape, n, k in rank_projections(models):
        nbytes = n * k * 2
        copies = max(2, -(-(512 << 20) // nbytes))
        weights = [torch.randn(n, k, device=device).bfloat16() for _ in range(copies)]
        for m in (1, 8):
            x = torch.randn(m, k, device=device).bfloat16()
            row = {"n": n, "k": k, "m": m, "plan": plan(n, k, launch.num_sms(device))}
            for label, op in (("cublas", F.linear), ("ours", skinny_matmul)):
                calls = [lambda w=w, op=op, x=x: op(x, w) for w in weights]
                us = graph_us(calls, device)
                row[f"{label}_us"] = us
                row[f"{label}_of_copy"] = nbytes / (us * 1e-6) / (copy_gbps * 1e9)
            rows[f"{shape} m{m}"] = row
        del weights
        free_memory(device)
        save()
    result["alone"] = rows


def chain(result: dict, save, device: torch.device, models: list[str]) -> None:
    """Each layer's qkv, o_proj, gate_up, then SwiGLU and down_proj (cuBLAS: the activation
    kernel and F.linear; ours: the activation inside the matmul), then the LM head."""
    rows = {}
    for model in models:
        hidden, inter, layers, vocab = MODELS[model]
        shapes = projections(hidden, inter, vocab)
        weights = [
            (name, torch.randn(*shapes[name], device=device).bfloat16())
            for _ in range(layers)
            for name in ("qkv", "o_proj", "gate_up", "down")
        ] + [("lm_head", torch.randn(*shapes["lm_head"], device=device).bfloat16())]
        for m in (1, 8):
            x = torch.randn(m, hidden, device=device).bfloat16()
            attn = torch.randn(m, hidden, device=device).bfloat16()
            gate_up = torch.randn(m, 2 * inter, device=device).bfloat16()
            inputs = {"qkv": x, "o_proj": attn, "gate_up": x, "lm_head": x}

            def cublas(name, w, inputs=inputs, gate_up=gate_up):
                if name == "down":
                    return F.linear(silu_and_mul(gate_up), w)
                return F.linear(inputs[name], w)

            def ours(name, w, inputs=inputs, gate_up=gate_up):
                if name == "down":
                    return skinny_matmul(gate_up, w, swiglu=True)
                return skinny_matmul(inputs[name], w)

            def layers_choice(name, w, inputs=inputs, gate_up=gate_up):
                if name == "down":  # as GatedMLP: SwiGLU inside where measured, else apart
                    out = fused.swiglu_linear(gate_up, w)
                    return out if out is not None else fused.linear(silu_and_mul(gate_up), w)
                return fused.linear(inputs[name], w)

            variants = (
                ("cublas", cublas, False),
                ("ours", ours, False),
                ("ours_pdl", ours, True),
                ("table_pdl", layers_choice, True),
            )
            row = {}
            for label, op, pdl in variants:
                calls = [lambda n=n, w=w, op=op: op(n, w) for n, w in weights]
                try:
                    with switches(None, pdl, 0):  # PDL is read at each launch: the capture's
                        ms = graph_us(calls, device) * len(calls) / 1e3
                    row[f"{label}_ms_per_step"] = ms
                except Exception as exc:  # noqa: BLE001 - a variant that fails is reported
                    row[f"{label}_error"] = repr(exc)
            rows[f"{model} m{m}"] = row
            print(model, m, row, flush=True)
        del weights
        free_memory(device)
        save()
    result["chain"] = rows


@contextlib.contextmanager
def switches(skinny: bool | None, pdl: bool, prologue_max_batch: int):
    """The decode matmul everywhere (True), nowhere (False) or on the measured shapes (None), PDL,
    and the attention prologue inside the decode kernel up to `prologue_max_batch` sequences: set
    in this process and in the environment a spawned rank reads; put back afterwards."""
    saved = fused.SKINNY_MATMUL, launch.PDL, triton_backend.PROLOGUE_MAX_BATCH, dict(os.environ)
    fused.SKINNY_MATMUL, launch.PDL = skinny, pdl
    triton_backend.PROLOGUE_MAX_BATCH = prologue_max_batch
    os.environ["AFS_PDL"] = "1" if pdl else "0"
    os.environ["AFS_DECODE_PROLOGUE_MAX_BATCH"] = str(prologue_max_batch)
    os.environ.pop("AFS_SKINNY_MATMUL", None)
    if skinny is not None:
        os.environ["AFS_SKINNY_MATMUL"] = "1" if skinny else "0"
    try:
        yield
    finally:
        fused.SKINNY_MATMUL, launch.PDL, triton_backend.PROLOGUE_MAX_BATCH, environ = saved
        os.environ.clear()
        os.environ.update(environ)


def rates(result: dict, save, models: list[str]) -> None:
    rows: dict = {}
    result["batch1_decode_tok_s"] = rows
    tps = (1, 2) if torch.cuda.device_count() >= 2 else (1,)
    for model in models:
        for tp in tps if model != "1b" else (1,):
            key = f"dummy:olmo2-{model} tp{tp}"
            rows[key] = {}
            for label, skinny, prologue in RATE_VARIANTS:
                try:
                    with switches(skinny, True, prologue):
                        rows[key][label] = tp_gpu.decode_rate(f"dummy:olmo2-{model}", tp)
                except Exception as exc:  # noqa: BLE001 - a variant that fails is reported
                    rows[key][label] = repr(exc)
            print(key, rows[key], flush=True)
            save()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--deadline", type=float, default=0)
    parser.add_argument("--parts", default="check,alone,chain,rates")
    parser.add_argument("--models", default="1b,7b")
    # 8 rows: each 7B entry beat cuBLAS alone, yet a step's chain of them at 8 rows was slower
    # (4.33 ms against 3.85); one row only until that is understood
    parser.add_argument("--sweep-rows", default="1")
    parser.add_argument("--tps", default="1,2", help="the sweep's 7B and 13B ranks: tp = 1, 2")
    args = parser.parse_args()
    if args.deadline:
        faulthandler.dump_traceback_later(args.deadline, exit=True)
    device = torch.device("cuda")
    parts = args.parts.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "gpu": torch.cuda.get_device_name(device),
        "git_commit": git_commit(),
    }
    copy_gbps = measure_ceilings(device, dtypes=["bfloat16"], repeats=20)["copy_gbps"]
    result["copy_gbps"] = copy_gbps

    def save() -> None:
        (out / f"skinny_gpu_{'_'.join(parts)}.json").write_text(json.dumps(result, indent=2))

    start = time.perf_counter()
    models = args.models.split(",")
    if "sweep" in parts:
        rows = [int(m) for m in args.sweep_rows.split(",")]
        sweep(result, save, device, out, models, rows, tuple(int(t) for t in args.tps.split(",")))
    if "check" in parts:
        check(result, save, device, models)
    if "alone" in parts:
        alone(result, save, device, copy_gbps, models)
    if "chain" in parts:
        chain(result, save, device, models)
    if "rates" in parts:
        rates(result, save, models)
    result["wall_s"] = time.perf_counter() - start
    save()

    print(f"\ncopy rate {copy_gbps:.0f} GB/s")
    for key, row in result.get("sweep", {}).items():
        print(f"sweep {row['label']:28s} ours {row['us']:7.1f} us cuBLAS {row['cublas_us']:7.1f} us"
              f" {row['config']}{'' if 'slower' not in key else ' (slower)'}")  # fmt: skip
    for key, row in result.get("alone", {}).items():
        print(f"{key:24s} cuBLAS {row['cublas_us']:7.1f} us ({row['cublas_of_copy']:.2f} of copy) "
              f"ours {row['ours_us']:7.1f} us ({row['ours_of_copy']:.2f})")  # fmt: skip
    for key, row in result.get("chain", {}).items():
        print(f"chain {key} (ms a step):", row)
    for key, row in result.get("batch1_decode_tok_s", {}).items():
        print(f"{key} batch-1 decode tok/s:", row)
    if "check_ok" in result:
        print("bf16 check:", "ok" if result["check_ok"] else "FAILED")


if __name__ == "__main__":
    main()
