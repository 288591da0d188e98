"""Sweep the decode kernel's launch settings and dump what the compiler made of both kernels.

    python3 benchmarks/kernel_profile.py [OUT_DIR]

For each decode shape of `afs bench kernels` it times pass 1 + pass 2 under several tile sizes,
warp counts, pipeline depths and split targets (CUDA events, median of 50 after warm-up; inputs
checked against a plain PyTorch reference first). For the prefill kernel it reports the
autotuner's choice and timings per shape. Then, for every compiled variant, it writes the
Triton GPU IR, PTX and SASS under OUT_DIR and prints registers, spills, shared memory and counts
of the instructions that decide speed: tensor-core MMAs (HMMA/HGMMA), TMA copies (UTMALDG),
asynchronous copies (LDGSTS), plain global loads (LDG) and barriers.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import sys
from pathlib import Path

import torch

from kernels import decode_attention as decode_module
from kernels import prefill_attention as prefill_module
from workers.bench.kernels import SHAPES

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "kernel_profile")
BLOCK_SIZE = 16


def median_ms(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends, strict=True):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))[reps // 2]


def paged_decode_inputs(batch, heads, kv_heads, length, dim):
    per_seq = -(-length // BLOCK_SIZE)
    slab = torch.randn(2, batch * per_seq, kv_heads, BLOCK_SIZE, dim, device="cuda").bfloat16()
    tables = torch.randperm(batch * per_seq, device="cuda").view(batch, per_seq).int()
    q = torch.randn(batch, heads, dim, device="cuda").bfloat16()
    lens = torch.full((batch,), length, dtype=torch.int32, device="cuda")
    return q, slab, tables, lens


def decode_reference(q, slab, tables, length):
    b, h, d = q.shape
    kv_heads = slab.shape[2]
    kv = slab[:, tables[0].long()]  # first sequence: [2, n, KVH, BS, D]
    k, v = kv.permute(0, 2, 1, 3, 4).reshape(2, kv_heads, -1, d)[:, :, :length].float()
    k = k.repeat_interleave(h // kv_heads, 0)
    v = v.repeat_interleave(h // kv_heads, 0)
    scores = (q[0].float().unsqueeze(1) @ k.transpose(1, 2)).squeeze(1) * d**-0.5  # [H, L]
    return (scores.softmax(-1).unsqueeze(1) @ v).squeeze(1)  # [H, D]


def compiled_kernels(fn) -> list:
    """Every compiled binary a JIT function (or an autotuner's) holds, whatever the version."""
    fn = getattr(fn, "fn", fn)
    found = []
    for cache in getattr(fn, "device_caches", {}).values():
        table = cache[0] if isinstance(cache, tuple) else cache
        found.extend(v for v in table.values() if hasattr(v, "asm"))
    return found


def sass_of(kernel) -> str:
    try:
        from triton.tools.disasm import get_sass

        return get_sass(kernel.asm["cubin"])
    except Exception as error:  # noqa: BLE001 - report, do not fail the profile
        return f"(no SASS: {error})"


def describe(name: str, kernel) -> dict:
    sass = sass_of(kernel)
    counts = {
        op: len(re.findall(rf"\b{op}\b", sass))
        for op in ("HMMA", "HGMMA", "UTMALDG", "LDGSTS", "LDG", "STG", "BAR", "SYNCS")
    }
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    for key in ("ttgir", "ptx"):
        if key in kernel.asm:
            (folder / f"kernel.{key}").write_text(kernel.asm[key])
    (folder / "kernel.sass").write_text(sass)
    metadata = kernel.metadata
    return {
        "name": name,
        "registers": getattr(kernel, "n_regs", None),
        "spills": getattr(kernel, "n_spills", None),
        "shared_bytes": getattr(metadata, "shared", None),
        "num_warps": getattr(metadata, "num_warps", None),
        "num_stages": getattr(metadata, "num_stages", None),
        "sass_counts": counts,
    }


def sweep_decode() -> list[dict]:
    rows = []
    default = (dict(decode_module.TILE_CONFIG), decode_module.PROGRAMS_PER_SM)
    variants = list(itertools.product((32, 64, 128), (4, 8), (1, 2, 3), (2, 4, 8)))
    # (tile tokens, warps, stages, programs per SM)
    for shape in (s for s in SHAPES["default"] if s.phase == "decode"):
        kv_bytes = 2 * shape.batch * shape.num_kv_heads * shape.seq_len * shape.head_dim * 2
        # inputs smaller than 4x the 60 MB L2 rotate over copies, so reads come from HBM
        sets = [
            paged_decode_inputs(
                shape.batch, shape.num_heads, shape.num_kv_heads, shape.seq_len, shape.head_dim
            )
            for _ in range(1 if kv_bytes > 240e6 else 4)
        ]
        q, slab, tables, lens = sets[0]
        out = torch.empty_like(q)
        want = decode_reference(q, slab, tables, shape.seq_len)
        turn = itertools.count()
        timings = []
        for block_n, warps, stages, per_sm in variants:
            decode_module.TILE_CONFIG = {
                "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages
            }  # fmt: skip
            decode_module.PROGRAMS_PER_SM = per_sm

            def run(sets=sets, turn=turn, scale=shape.head_dim**-0.5, out=out):
                q, slab, tables, lens = sets[next(turn) % len(sets)]
                decode_module.decode_attention(q, slab, tables, lens, scale, out)

            try:
                decode_module.decode_attention(q, slab, tables, lens, shape.head_dim**-0.5, out)
                error = (out[0].float() - want).abs().max().item()
                if error > 2e-2:
                    raise RuntimeError(f"max error {error}")
                ms = median_ms(run)
            except Exception as failure:  # noqa: BLE001 - a variant may not compile
                timings.append({"variant": [block_n, warps, stages, per_sm], "error": str(failure)})
                continue
            timings.append(
                {"variant": [block_n, warps, stages, per_sm], "ms": ms, "gbs": kv_bytes / ms / 1e6}
            )
        best = max((t for t in timings if "gbs" in t), key=lambda t: t["gbs"])
        rows.append({"shape": shape.name, "best": best, "timings": timings})
        print(f"decode {shape.name}: best {best}", flush=True)
    decode_module.TILE_CONFIG, decode_module.PROGRAMS_PER_SM = default
    return rows


def prefill_choices() -> list[dict]:
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

        run = functools.partial(
            prefill_module.prefill_attention, q, k, v, slab, tables, starts, lens, d**-0.5, out, s
        )
        run()
        ms = median_ms(run, 10)
        flops = 4 * b * h * s * s * d / 2
        tuner = prefill_module._tuned_kernel
        row = {
            "shape": shape.name,
            "ms": ms,
            "tflops": flops / ms / 1e9,
            "best_config": str(tuner.best_config),
            "config_timings": {str(c): t for c, t in getattr(tuner, "configs_timings", {}).items()},
        }
        rows.append(row)
        print(f"prefill {shape.name}: {row['tflops']:.1f} TFLOP/s with {row['best_config']}")
    return rows


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    decode_rows = sweep_decode()
    prefill_rows = prefill_choices()
    compiled = [
        describe(f"prefill_{i}", k) for i, k in enumerate(compiled_kernels(prefill_module._kernel))
    ] + [describe(f"decode_{i}", k) for i, k in enumerate(compiled_kernels(decode_module._kernel))]
    result = {"decode": decode_rows, "prefill": prefill_rows, "compiled": compiled}
    (OUT / "kernel_profile.json").write_text(json.dumps(result, indent=1))
    print(
        "\nkernel                      regs spills  smem  warps stages  "
        "HGMMA HMMA UTMALDG LDGSTS LDG"
    )
    for c in compiled:
        n = c["sass_counts"]
        print(
            f"{c['name']:<26} {c['registers']!s:>5} {c['spills']!s:>6} {c['shared_bytes']!s:>6} "
            f"{c['num_warps']!s:>5} {c['num_stages']!s:>6}  {n['HGMMA']:>5} {n['HMMA']:>4} "
            f"{n['UTMALDG']:>7} {n['LDGSTS']:>6} {n['LDG']:>4}"
        )


if __name__ == "__main__":
    main()
