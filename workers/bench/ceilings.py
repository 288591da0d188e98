"""The machine's ceilings, measured: memory bandwidth (a large copy) and the matmul rate.

    afs bench ceilings [--device auto|cpu|cuda] [--size-gib 1] [--repeats 50] [--matmul-size N]

Bandwidth counts the bytes read plus the bytes written by a device-to-device copy of random data
far larger than any cache; the matmul rate is 2·N³ FLOPs over the time of one N×N×N product (bf16
and fp16 on CUDA, fp32 on CPU). Each result is checked before it is timed; the figure is the median
of `--repeats` runs after a warm-up, timed with CUDA events on a GPU. The other benchmarks call
`measure_ceilings` in their own run to compute floors (nothing is cached across processes), and
`Roofline` turns those ceilings into the least time a forward pass of a model can take.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from workers.bench.results import REPORT, RESULTS_DIR, write_result
from workers.config import EngineConfig, ModelConfig, dtype_name, parse_dtype

_GIB = 1 << 30
_WARMUP = 3
_CHECK_SLICE = 64  # rows and columns of the product checked against float64


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags every `afs bench` command shares: device, output, and how ceilings are measured."""
    add = parser.add_argument
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add("--out-dir", type=Path, default=RESULTS_DIR, help="where the JSON result goes")
    add("--report", type=Path, default=REPORT, help="markdown file that gets a row per run")
    add("--size-gib", type=float, default=1.0, help="ceilings: GiB copied per bandwidth run")
    add("--repeats", type=int, default=50, help="ceilings: timed runs of each measurement")
    add("--matmul-size", type=int, default=None, help="ceilings: N of N³ (8192 CUDA, 2048 CPU)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)


def resolve_device(name: str) -> torch.device:
    return EngineConfig(device=name).resolved_device()


def now(device: torch.device) -> float:
    """A wall-clock reading after all queued device work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def median_seconds(
    fn: Callable[[], object], device: torch.device, repeats: int, bar: tqdm | None = None
) -> float:
    """Median time of `fn` over `repeats` runs after a warm-up; CUDA events on a GPU."""
    for _ in range(_WARMUP):
        fn()
    times = []
    if device.type == "cuda":
        events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
            if bar is not None:
                bar.update()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
            if bar is not None:
                bar.update()
    return statistics.median(times)


def free_memory(device: torch.device) -> None:
    """Give back what deleted engines and models held (they may sit in reference cycles)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ratios(ours: dict[str, Any], peer: dict[str, Any]) -> dict[str, Any]:
    """ours / peer for every number (nested dicts alike) that both sides report."""
    out: dict[str, Any] = {}
    for key, value in ours.items():
        other = peer.get(key)
        if isinstance(value, dict) and isinstance(other, dict):
            out[key] = ratios(value, other)
        elif isinstance(value, int | float) and isinstance(other, int | float) and other:
            out[key] = value / other
    return out


def default_matmul_size(device: torch.device, size: int | None) -> int:
    return size or (8192 if device.type == "cuda" else 2048)


def default_dtypes(device: torch.device) -> tuple[str, ...]:
    return ("bfloat16", "float16") if device.type == "cuda" else ("float32",)


def measure_ceilings(
    device: torch.device,
    dtypes: Sequence[str] | None = None,
    size_gib: float = 1.0,
    repeats: int = 50,
    matmul_size: int | None = None,
) -> dict[str, float]:
    """`copy_gbps` and `matmul_tflops_<dtype>` for each dtype, measured now on `device`."""
    if size_gib <= 0 or repeats < 1:
        raise ValueError(f"size_gib must be > 0 and repeats >= 1, got {size_gib}, {repeats}")
    dtypes = tuple(dtype_name(parse_dtype(d)) for d in dtypes or default_dtypes(device))
    n = default_matmul_size(device, matmul_size)
    ceilings: dict[str, float] = {}
    with tqdm(total=repeats * (1 + len(dtypes)), desc="ceilings", unit="run") as bar:
        ceilings["copy_gbps"] = _copy_gbps(device, size_gib, repeats, bar)
        for dtype in dtypes:
            ceilings[f"matmul_tflops_{dtype}"] = _matmul_tflops(device, dtype, n, repeats, bar)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the engine built next profiles free memory
    return ceilings


def _copy_gbps(device: torch.device, size_gib: float, repeats: int, bar: tqdm) -> float:
    numel = max(1, int(size_gib * _GIB) // 4)
    source = torch.randn(numel, device=device)  # [numel] fp32, random: never time zeros
    target = torch.zeros_like(source)
    target.copy_(source)
    if not torch.equal(target, source):
        raise RuntimeError("copy check failed: the target differs from its source")
    seconds = median_seconds(lambda: target.copy_(source), device, repeats, bar)
    return 2 * source.numel() * source.element_size() / seconds / 1e9  # read + write


def _matmul_tflops(device: torch.device, dtype: str, n: int, repeats: int, bar: tqdm) -> float:
    torch_dtype = parse_dtype(dtype)
    a = torch.randn(n, n, device=device, dtype=torch_dtype)  # [n, n]
    b = torch.randn(n, n, device=device, dtype=torch_dtype)  # [n, n]
    out = torch.full((n, n), float("nan"), device=device, dtype=torch_dtype)  # [n, n], poisoned
    torch.matmul(a, b, out=out)
    _check_matmul(a, b, out, torch_dtype)
    seconds = median_seconds(lambda: torch.matmul(a, b, out=out), device, repeats, bar)
    return 2 * n**3 / seconds / 1e12


def _check_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, dtype: torch.dtype) -> None:
    rows = a[:_CHECK_SLICE].double()  # [s, n]
    cols = b[:, :_CHECK_SLICE].double()  # [n, s]
    reference = rows @ cols  # [s, s]
    # rounding bound: a few units of the dtype's epsilon on the sum of |products|
    bound = 4 * torch.finfo(dtype).eps * (rows.abs() @ cols.abs()).max().item()
    error = (out[:_CHECK_SLICE, :_CHECK_SLICE].double() - reference).abs().max().item()
    if not error <= bound:
        raise RuntimeError(f"matmul check failed: max error {error:.3g} > bound {bound:.3g}")


def read_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights a forward reads in full: every parameter but the token embedding's
    table, of which a step reads only its tokens' rows (unless the LM head shares it)."""
    embedding = model.model.embed_tokens.weight
    return sum(
        p.numel() * p.element_size()
        for p in model.parameters()
        if p is not embedding or p is model.lm_head.weight
    )


@dataclass(frozen=True)
class Roofline:
    """The least time a forward of this model can take on a machine with these ceilings."""

    weight_bytes: int
    """The parameters a forward reads in full (`read_weight_bytes`: all but the token
    embedding's table, unless the LM head shares it)."""
    linear_params: int
    """Weights of the decoder layers' matrices: 2 FLOPs each per token."""
    lm_head_params: int
    """Weights of the LM head: 2 FLOPs each per sampled row."""
    attention_width: int
    """layers × query heads × head_dim: the width of QKᵀ and PV per token and key."""
    kv_bytes_per_token: int
    """K and V of one token over all layers (this rank's heads)."""
    bytes_per_second: float
    flops_per_second: float | None
    """The matmul rate in the model's dtype, when measured."""

    @classmethod
    def for_model(cls, model: nn.Module, config: ModelConfig, ceilings: dict[str, Any]) -> Roofline:
        """The floor of one rank: `model` is the rank's shard (all of it at tp = 1), so its
        weights, heads and K/V are the rank's; the ranks run side by side, each at `ceilings`."""
        tflops = ceilings.get(f"matmul_tflops_{dtype_name(config.torch_dtype)}")
        attn = model.model.layers[0].self_attn  # this rank's heads
        layers = config.num_hidden_layers
        layer_kv_bytes = 2 * attn.num_kv_heads * attn.head_dim * config.torch_dtype.itemsize
        return cls(
            weight_bytes=read_weight_bytes(model),
            linear_params=sum(p.numel() for p in model.model.layers.parameters() if p.dim() == 2),
            lm_head_params=model.lm_head.weight.numel(),
            attention_width=layers * attn.num_heads * attn.head_dim,
            kv_bytes_per_token=layers * layer_kv_bytes,
            bytes_per_second=ceilings["copy_gbps"] * 1e9,
            flops_per_second=tflops * 1e12 if tflops else None,
        )

    def step_seconds(self, rows: Sequence[tuple[int, int]], sampled: int) -> float:
        """Floor of one forward; `rows` holds (tokens already cached, new tokens) per sequence.

        Memory: the weights plus every sequence's K/V context. Compute: the matmuls, plus causal
        attention, where a new token at position p meets p + 1 keys (2 FLOPs each for QKᵀ, PV).
        """
        if not rows:
            return 0.0  # nothing scheduled: no forward runs
        context = sum(cached + new for cached, new in rows)
        memory = (self.weight_bytes + context * self.kv_bytes_per_token) / self.bytes_per_second
        if self.flops_per_second is None:
            return memory
        tokens = sum(new for _, new in rows)
        keys = sum(new * (cached + (new + 1) / 2) for cached, new in rows)
        flops = (
            2 * self.linear_params * tokens
            + 2 * self.lm_head_params * sampled
            + 4 * self.attention_width * keys
        )
        return max(memory, flops / self.flops_per_second)


def run(args: argparse.Namespace) -> Path:
    device = resolve_device(args.device)
    ceilings = measure_ceilings(
        device, size_gib=args.size_gib, repeats=args.repeats, matmul_size=args.matmul_size
    )
    n = default_matmul_size(device, args.matmul_size)
    config = {
        "device": str(device),
        "copy_bytes_each_way": int(args.size_gib * _GIB) // 4 * 4,
        "matmul_size": n,
        "repeats": args.repeats,
        "statistic": "median",
    }
    summary = f"copy {ceilings['copy_gbps']:,.1f} GB/s" + "".join(
        f"; {key.removeprefix('matmul_tflops_')} {n}³ matmul {value:,.1f} TFLOP/s"
        for key, value in ceilings.items()
        if key.startswith("matmul_")
    )
    print(summary)
    return write_result(
        "ceilings", config, ceilings, summary=summary, out_dir=args.out_dir, report=args.report
    )
