"""Sweep the decode kernel's launch settings and dump what the compiler made of both kernels.

    python3 benchmarks/kernel_profile.py [OUT_DIR] [--quick]

For each decode shape of `afs bench kernels` it times pass 1 + pass 2 under several tile sizes,
warp counts, pipeline depths and split targets, with that benchmark's inputs, fp32 check and
timer. For each prefill shape it times the engine's tile config with and without EXP2_SPLIT
(checked against SDPA) and, unless --quick, the autotuner's choice. Then, for every compiled
variant, it writes the Triton GPU IR, PTX and SASS under OUT_DIR and prints registers, spills,
shared memory and counts of the instructions that decide speed: tensor-core MMAs (HMMA/HGMMA),
TMA copies (UTMALDG), asynchronous copies (LDGSTS), plain global loads (LDG) and barriers.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# a fresh compile cache: every binary found there afterwards was built by this run
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="afs-triton-")

import torch  # noqa: E402

from kernels import decode_attention as decode_module  # noqa: E402
from kernels import prefill_attention as prefill_module  # noqa: E402
from workers.bench.kernels import (  # noqa: E402
    SHAPES,
    input_sets,
    measure,
    median_time_ms,
    paged_runner,
    reference_slices,
)

OUT = Path(next((a for a in sys.argv[1:] if not a.startswith("--")), "kernel_profile"))
QUICK = "--quick" in sys.argv  # the decode kernel's current settings only
BLOCK_SIZE = 16


def median_ms(run, rep_ms: float = 30.0) -> float:
    """The benchmark's timer (the GPU held in a spin while calls are queued: no host cost)."""
    return median_time_ms(lambda i: run(), torch.device("cuda"), rep_ms)


def _tool(name: str) -> str | None:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else shutil.which(name)


def _run_tool(*command: str) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return f"({command[0]} failed: {error})"


def describe_compiled() -> list[dict]:
    """Every kernel this run compiled: metadata, registers and spills, SASS instruction counts."""
    rows = []
    cache = Path(os.environ["TRITON_CACHE_DIR"])
    cuobjdump, nvdisasm = _tool("cuobjdump"), _tool("nvdisasm")
    for index, cubin in enumerate(sorted(cache.rglob("*.cubin"))):
        meta = json.loads(cubin.with_suffix(".json").read_text())
        if meta.get("name") != "_kernel":  # pass 1 of decode, prefill; not the combine pass
            continue
        name = f"{cubin.parent.name[:8]}_{index}"
        usage = _run_tool(cuobjdump, "-res-usage", str(cubin)) if cuobjdump else ""
        sass = _run_tool(nvdisasm, "-c", str(cubin)) if nvdisasm else ""
        registers = re.search(r"REG:(\d+)", usage)
        local = re.search(r"LOCAL:(\d+)", usage)
        counts = {
            op: len(re.findall(rf"\b{op}[.\s]", sass))
            for op in ("HGMMA", "HMMA", "UTMALDG", "LDGSTS", "LDG", "STG", "MUFU.EX2", "BAR")
        }
        folder = OUT / "compiled" / name
        folder.mkdir(parents=True, exist_ok=True)
        for source in cubin.parent.iterdir():
            if source.suffix in (".ttgir", ".ptx", ".json"):
                shutil.copy(source, folder / source.name)
        (folder / "kernel.sass").write_text(sass)
        rows.append(
            {
                "name": name,
                "kernel": "prefill" if counts["UTMALDG"] else "decode",  # only prefill uses TMA
                "module": cubin.stem,
                "registers": int(registers.group(1)) if registers else None,
                "local_bytes": int(local.group(1)) if local else None,
                "shared_bytes": meta.get("shared"),
                "num_warps": meta.get("num_warps"),
                "num_stages": meta.get("num_stages"),
                "sass_counts": counts,
            }
        )
    return rows


def sweep_decode() -> list[dict]:
    """The decode kernel under each launch variant, on `afs bench kernels`' own inputs (paged
    slab, input sets rotated out of L2), checked against its fp32 reference and timed by it."""
    rows = []
    default = (dict(decode_module.TILE_CONFIG), decode_module.PROGRAMS_PER_SM)
    # (tile tokens, warps, stages, programs per SM)
    variants = list(itertools.product((64, 128), (4,), (2, 3), (2, 4, 8)))
    if QUICK:
        variants = [(*default[0].values(), default[1])]
    device = torch.device("cuda")
    for shape in (s for s in SHAPES["default"] if s.phase == "decode"):
        sets = input_sets(shape, torch.bfloat16, device)
        refs = reference_slices(shape, sets[0])
        make_run = functools.partial(paged_runner, "triton", shape, sets, BLOCK_SIZE)
        timings = []
        for block_n, warps, stages, per_sm in variants:
            decode_module.TILE_CONFIG = {
                "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages
            }  # fmt: skip
            decode_module.PROGRAMS_PER_SM = per_sm
            try:
                row = measure(shape, "triton", make_run, refs, "bfloat16", 30.0, {})
            except Exception as failure:  # noqa: BLE001 - a variant may not compile
                row = {"status": "error", "reason": str(failure)}
            timings.append({"variant": [block_n, warps, stages, per_sm], **row})
        best = max((t for t in timings if t["status"] == "ok"), key=lambda t: t["rate"])
        rows.append({"shape": shape.name, "best": best, "timings": timings})
        print(f"decode {shape.name}: best {best['variant']}, {best['rate']:.0f} GB/s", flush=True)
    decode_module.TILE_CONFIG, decode_module.PROGRAMS_PER_SM = default
    return rows


def prefill_choices() -> list[dict]:
    """Per shape: the engine's fixed config with and without EXP2_SPLIT (checked against SDPA
    first), and, unless --quick, the autotuner's pick over every config."""
    import torch.nn.functional as F

    rows = []
    for shape in (s for s in SHAPES["default"] if s.phase == "prefill"):
        b, h, s, d = shape.batch, shape.num_heads, shape.seq_len, shape.head_dim
        q = torch.randn(b * s, h, d, device="cuda").bfloat16()
        k = torch.randn(b * s, shape.num_kv_heads, d, device="cuda").bfloat16()
        v = torch.randn_like(k)
        slab = torch.zeros(2, 1, shape.num_kv_heads, BLOCK_SIZE, d, device="cuda").bfloat16()
        tables = torch.zeros(b, 1, dtype=torch.int32, device="cuda")
        starts = torch.arange(0, b * s + 1, s, dtype=torch.int32, device="cuda")
        lens = torch.full((b,), s, dtype=torch.int32, device="cuda")
        out = torch.empty_like(q)
        flops = shape.work(2)
        reference = F.scaled_dot_product_attention(
            *(x.view(b, s, -1, d).transpose(1, 2) for x in (q, k, v)), is_causal=True
        ).transpose(1, 2).reshape(b * s, h, d)  # fmt: skip
        row: dict = {"shape": shape.name}
        for split in (False, True):
            prefill_module.EXP2_SPLIT = split
            run = functools.partial(
                prefill_module.prefill_attention, q, k, v, slab, tables, starts, lens, d**-0.5,
                out, s,
            )  # fmt: skip
            run()
            error = (out.float() - reference.float()).abs().max().item()
            ms = median_ms(run, 10)
            row[f"exp2_split_{split}"] = {"ms": ms, "tflops": flops / ms / 1e9, "max_err": error}
            print(f"prefill {shape.name} exp2_split={split}: {flops / ms / 1e9:.1f} TFLOP/s, "
                  f"max |err| vs SDPA {error:.4f}", flush=True)  # fmt: skip
        prefill_module.EXP2_SPLIT = False
        if not QUICK:
            run = functools.partial(
                prefill_module.prefill_attention, q, k, v, slab, tables, starts, lens, d**-0.5,
                out, s, autotune=True,
            )  # fmt: skip
            run()
            ms = median_ms(run, 10)
            tuner = prefill_module._tuned_kernel
            row["autotuned"] = {
                "ms": ms,
                "tflops": flops / ms / 1e9,
                "best_config": str(tuner.best_config),
                "config_timings": {
                    str(c): t for c, t in getattr(tuner, "configs_timings", {}).items()
                },
            }
            print(f"prefill {shape.name} autotuned: {flops / ms / 1e9:.1f} TFLOP/s")
        rows.append(row)
    return rows


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    decode_rows = sweep_decode()
    prefill_rows = prefill_choices()
    compiled = describe_compiled()
    result = {"decode": decode_rows, "prefill": prefill_rows, "compiled": compiled}
    (OUT / "kernel_profile.json").write_text(json.dumps(result, indent=1))
    header = "regs local  smem warps stages HGMMA HMMA UTMALDG LDGSTS LDG"
    print(f"\n{'kernel':<22} {'file':<18} {header}")
    for c in compiled:
        n = c["sass_counts"]
        print(
            f"{c['kernel'] + ' ' + c['name']:<22} {c['module'][:18]:<18} {c['registers']!s:>4} "
            f"{c['local_bytes']!s:>5} {c['shared_bytes']!s:>5} {c['num_warps']!s:>5} "
            f"{c['num_stages']!s:>6} {n['HGMMA']:>5} {n['HMMA']:>4} {n['UTMALDG']:>7} "
            f"{n['LDGSTS']:>6} {n['LDG']:>4}"
        )


if __name__ == "__main__":
    main()
