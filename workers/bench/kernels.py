"""Attention kernels: our paged backends against PyTorch's SDPA backends, per shape.

    afs bench kernels [--device auto] [--dtype bfloat16] [--shapes default|small]
                      [--backends auto] [--block-size 16] [--rep-ms 100] [--out-dir] [--report]
                      [--size-gib 1] [--repeats 50] [--matmul-size N]  (the ceilings' flags)

Counting rules, so that each figure comes with its floor (the ceilings are measured at the start
of the run by `measure_ceilings`):
- prefill (causal, S queries over S keys): 4·B·H·S²·D / 2 FLOPs, the two matmuls (Q·Kᵀ and P·V,
  2·S²·D each per head) halved because the causal mask skips the upper triangle.
  Figure: TFLOP/s; fraction of the measured matmul rate.
- decode (one query over L cached keys): 2·B·KVH·L·D·bytes of K/V read, each K/V head read once
  however many query heads share it. Figure: GB/s; fraction of the measured device copy rate.

SDPA peers run on contiguous [B, heads, len, D] tensors, one backend at a time through
`sdpa_kernel`; a backend that refuses a shape is a row with its reason. Ours run on the paged slab
with its blocks scattered, through `AttentionBackend.forward` (the K/V store included). Every
implementation is checked against an fp32 reference on two (sequence, KV head) slices first, and
timed only when it matches.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from workers.attention import build_attention_metadata, get_backend
from workers.bench.ceilings import add_common_arguments, measure_ceilings, resolve_device
from workers.bench.results import write_result

SDPA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")
OUR_BACKENDS = {"cuda": "triton", "cpu": "torch_ref"}  # what `--backends auto` runs
TOLERANCE = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# unit, its scale, and the ceiling (a key of `measure_ceilings`) each phase is a fraction of
UNITS = {
    "prefill": ("TFLOP/s", 1e12, "matmul_tflops_{dtype}"),
    "decode": ("GB/s", 1e9, "copy_gbps"),
}
RULES = {"prefill": "TFLOP/s of 4*B*H*S^2*D/2", "decode": "GB/s of 2*B*KVH*L*D*bytes read"}
MAX_INPUT_SETS = 8

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # q [B, H, Sq, D], k and v [B, KVH, L, D]
Run = Callable[[int], torch.Tensor]  # call i on input set i -> [B, H, Sq, D]
Refs = list[tuple[int, int, torch.Tensor]]  # (sequence, KV head, fp32 [G, Sq, D])


@dataclass(frozen=True)
class Shape:
    phase: str  # "prefill" (causal, queries = keys) or "decode" (one query per sequence)
    batch: int
    num_heads: int
    num_kv_heads: int
    seq_len: int
    head_dim: int

    @property
    def name(self) -> str:
        kv = f" KVH{self.num_kv_heads}" if self.num_kv_heads != self.num_heads else ""
        length = "S" if self.phase == "prefill" else "L"
        return f"B{self.batch} H{self.num_heads}{kv} {length}{self.seq_len} D{self.head_dim}"

    @property
    def query_len(self) -> int:
        return self.seq_len if self.phase == "prefill" else 1

    def work(self, element_size: int) -> float:
        """FLOPs of a causal prefill, or bytes of K/V a decode reads (rules in the docstring)."""
        b, h, s, d = self.batch, self.num_heads, self.seq_len, self.head_dim
        if self.phase == "prefill":
            return 4 * b * h * s * s * d / 2
        return 2 * b * self.num_kv_heads * s * d * element_size


SHAPES = {
    "default": (
        Shape("prefill", 4, 32, 32, 4096, 128),
        Shape("prefill", 16, 16, 16, 2048, 64),
        Shape("prefill", 1, 32, 32, 16384, 128),
        Shape("decode", 64, 32, 32, 4096, 128),
        Shape("decode", 64, 32, 8, 8192, 128),
        Shape("decode", 1, 32, 32, 4096, 128),
        Shape("decode", 256, 16, 16, 2048, 128),
    ),
    # CPU-sized: lengths that end mid-block, GQA, head dims 32 and 64
    "small": (
        Shape("prefill", 2, 4, 4, 75, 32),
        Shape("prefill", 2, 8, 2, 40, 64),
        Shape("decode", 3, 4, 4, 100, 32),
        Shape("decode", 4, 8, 2, 70, 64),
    ),
}


def median_time_ms(run: Run, device: torch.device, rep_ms: float) -> float:
    """Median milliseconds of one call, like triton.testing.do_bench; call i runs input set i."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for i in range(3):  # warm-up: compilation, autotuning, the allocator
        run(i)
    sync()
    start = time.perf_counter()
    for i in range(5):
        run(i)
    sync()
    estimate = (time.perf_counter() - start) / 5
    # at most 200 timed calls: each queues kernels and two events, and the GPU's launch queue
    # (about a thousand entries) must hold them all while it spins
    reps = max(10 if cuda else 3, min(200, int(rep_ms / 1e3 / max(estimate, 1e-7))))
    if not cuda:
        times = []
        for i in range(reps):
            start = time.perf_counter()
            run(i)
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(reps)]
    # hold the GPU in a spin (cycles at ~2 GHz) until every call is queued, so that the time
    # the host takes to launch a short kernel is not counted as the kernel's (the engine replays
    # decode as CUDA graphs, without that cost); queueing takes longer than the estimate because
    # of the events, hence three times it, and long calls keep the GPU busy by themselves
    torch.cuda._sleep(int(min(3 * reps * estimate, 2.0) * 2e9))
    for i, (begin, end) in enumerate(events):
        begin.record()
        run(i)
        end.record()
    sync()
    return statistics.median(begin.elapsed_time(end) for begin, end in events)


def input_sets(shape: Shape, dtype: torch.dtype, device: torch.device) -> list[Inputs]:
    """Enough independent sets to cycle through that each call starts with its inputs out of L2."""
    b, kvh, s, d = shape.batch, shape.num_kv_heads, shape.seq_len, shape.head_dim
    sizes = [(b, shape.num_heads, shape.query_len, d), (b, kvh, s, d), (b, kvh, s, d)]
    count = 1
    if device.type == "cuda":
        l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
        set_bytes = sum(map(math.prod, sizes)) * dtype.itemsize
        count = min(MAX_INPUT_SETS, math.ceil(2 * l2_bytes / set_bytes))
    return [tuple(torch.randn(n, dtype=dtype, device=device) for n in sizes) for _ in range(count)]


def reference_slices(shape: Shape, inputs: Inputs) -> Refs:
    """fp32 attention of the first and the last (sequence, KV head) and its query heads."""
    group = shape.num_heads // shape.num_kv_heads
    slices = []
    for b, kv_head in sorted({(0, 0), (shape.batch - 1, shape.num_kv_heads - 1)}):
        q = inputs[0][b, kv_head * group : (kv_head + 1) * group].float()  # [G, Sq, D]
        k, v = inputs[1][b, kv_head].float(), inputs[2][b, kv_head].float()  # [L, D]
        scores = q @ k.T * shape.head_dim**-0.5  # [G, Sq, L]
        if shape.phase == "prefill":
            future = torch.ones_like(scores[0], dtype=torch.bool).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        slices.append((b, kv_head, scores.softmax(-1) @ v))
    return slices


def paged_runner(backend_name: str, shape: Shape, sets: list[Inputs], block_size: int) -> Run:
    """Our backend over slabs holding each set's cached K/V in scattered blocks."""
    device = sets[0][0].device
    try:
        backend = get_backend(backend_name, device.type)
    except ValueError as error:  # not registered (yet) in workers/attention
        raise NotImplementedError(str(error)) from error
    b, kv_heads, seq_len, d = sets[0][1].shape
    query_len, cached = shape.query_len, shape.seq_len - shape.query_len
    per_seq = -(-seq_len // block_size)
    order = torch.randperm(b * per_seq)  # block i of sequence j is order[j * per_seq + i]
    meta = build_attention_metadata(
        order.view(b, per_seq).tolist(), [cached] * b, [query_len] * b, block_size, device
    )
    steps = []
    for q, k, v in sets:
        # the whole K/V goes into the slab once, so that a timed call is the attention kernel
        # alone (in the engine the store is fused into the RoPE kernel)
        kv = torch.stack([k, v])  # [2, B, KVH, S, D]
        kv = F.pad(kv, (0, 0, 0, per_seq * block_size - seq_len))
        kv = kv.view(2, b, kv_heads, per_seq, block_size, d).transpose(2, 3)
        slab = torch.zeros(2, b * per_seq, kv_heads, block_size, d, dtype=k.dtype, device=device)
        slab[:, order.to(device)] = kv.reshape(2, b * per_seq, kv_heads, block_size, d)
        new_k, new_v = (x[:, :, cached:].transpose(1, 2).flatten(0, 1) for x in (k, v))
        tokens = q.transpose(1, 2).flatten(0, 1)  # [T, H, D]
        steps.append((tokens, new_k, new_v, slab))  # new K/V [T, KVH, D]

    def run(i: int) -> torch.Tensor:
        out = backend.forward(*steps[i % len(steps)], meta, d**-0.5, kv_stored=True)  # [T, H, D]
        return out.view(b, query_len, shape.num_heads, d).transpose(1, 2)

    return run


def measure(
    shape: Shape,
    impl: str,
    make_run: Callable[[], Run],
    refs: Refs,
    dtype_name: str,
    rep_ms: float,
    ceilings: dict[str, float],
) -> dict[str, Any]:
    """One row: check the implementation's output, then time it; a refusal gives its reason.

    `ceilings` holds the rates that give each figure its floor and fraction.
    """
    dtype = getattr(torch, dtype_name)
    unit, scale, ceiling_key = UNITS[shape.phase]
    row: dict[str, Any] = {"phase": shape.phase, "shape": shape.name, "impl": impl}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run = make_run()
            out = run(0)
        except (RuntimeError, ValueError) as error:
            # SDPA explains a refusal in warnings, then raises "no available kernel"
            reason = " | ".join([str(w.message) for w in caught] + [str(error)])[:600]
            status = "not implemented" if isinstance(error, NotImplementedError) else "unavailable"
            return row | {"status": status, "reason": reason}
    group = shape.num_heads // shape.num_kv_heads
    errors = [(out[b, h * group : (h + 1) * group].float() - ref).abs().max() for b, h, ref in refs]
    error = float(max(errors)) if bool(out.isfinite().all()) else math.nan
    row["max_abs_err"] = error if math.isfinite(error) else None
    if not error <= TOLERANCE[dtype]:
        return row | {"status": "wrong", "reason": f"max |error| {error:.3g} vs fp32 reference"}
    milliseconds = median_time_ms(run, out.device, rep_ms)
    work = shape.work(dtype.itemsize)
    rate = work / (milliseconds / 1e3) / scale
    ceiling = ceilings.get(ceiling_key.format(dtype=dtype_name))
    floor_ms = work / (ceiling * scale) * 1e3 if ceiling else None
    return row | {
        "status": "ok",
        "median_ms": milliseconds,
        "rate": rate,
        "unit": unit,
        "floor_ms": floor_ms,
        "roofline_fraction": rate / ceiling if ceiling else None,
    }


def bench_shape(
    shape: Shape, args: argparse.Namespace, device: torch.device, ceilings: dict[str, float]
) -> list[dict]:
    sets = input_sets(shape, getattr(torch, args.dtype), device)
    timing = (args.dtype, args.rep_ms, ceilings)
    refs = reference_slices(shape, sets[0])
    causal, gqa = shape.phase == "prefill", shape.num_heads != shape.num_kv_heads

    def sdpa_run(i: int) -> torch.Tensor:
        q, k, v = sets[i % len(sets)]
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    rows = []
    for name in [*SDPA_BACKENDS, *(["MATH"] if device.type == "cpu" else [])]:
        with sdpa_kernel([getattr(SDPBackend, name)]):
            impl = "sdpa_" + name.split("_")[0].lower()
            rows.append(measure(shape, impl, lambda: sdpa_run, refs, *timing))
    best = max((r["rate"] for r in rows if r["status"] == "ok"), default=None)
    backends = args.backends.split(",") if args.backends != "auto" else [OUR_BACKENDS[device.type]]
    for name in backends:
        make_run = partial(paged_runner, name, shape, sets, args.block_size)
        row = measure(shape, name, make_run, refs, *timing)
        rows.append(row | {"vs_best_sdpa": row["rate"] / best if "rate" in row and best else None})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    add = parser.add_argument
    add("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    add("--shapes", default="default", choices=list(SHAPES))
    add("--backends", default="auto", help="ours, comma-separated (auto: triton; cpu: torch_ref)")
    add("--block-size", type=int, default=16, help="tokens per block of the paged slab")
    add("--rep-ms", type=float, default=100.0, help="about how long each row is timed")
    add("--seed", type=int, default=0)


def summary(rows: list[dict[str, Any]]) -> str:
    """The first shape of each phase: each implementation's rate, or its status."""
    first_shapes = {r["phase"]: r["shape"] for r in reversed(rows)}
    shown: dict[str, list[str]] = {}
    for r in rows:
        if first_shapes[r["phase"]] == r["shape"]:
            cell = f"{r['rate']:.4g} {r['unit']}" if "rate" in r else r["status"]
            shown.setdefault(f"{r['phase']} {r['shape']}", []).append(f"{r['impl']} {cell}")
    return "; ".join(f"{key}: {', '.join(cells)}" for key, cells in shown.items())


def run(args: argparse.Namespace) -> Path:
    device = resolve_device(args.device)
    ceilings = measure_ceilings(device, [args.dtype], args.size_gib, args.repeats, args.matmul_size)
    torch.manual_seed(args.seed)
    rows = []
    for shape in SHAPES[args.shapes]:
        for row in bench_shape(shape, args, device, ceilings):
            shown = f"{row['rate']:9.4g} {row['unit']}" if "rate" in row else row["reason"][:90]
            print(f"{shape.phase:8} {shape.name:26} {row['impl']:15} {row['status']:15} {shown}")
            rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next shape's inputs may need this shape's memory
    keys = ("dtype", "shapes", "backends", "block_size", "rep_ms", "seed")
    config = {"device": str(device), "rules": RULES} | {key: getattr(args, key) for key in keys}
    return write_result(
        "kernels",
        config,
        figures={"rows": [r for r in rows if not r["impl"].startswith("sdpa_")]},
        floors={"ceilings": ceilings},
        peers={"rows": [r for r in rows if r["impl"].startswith("sdpa_")]},
        summary=summary(rows),
        out_dir=args.out_dir,
        report=args.report,
    )
