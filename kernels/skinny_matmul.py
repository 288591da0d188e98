"""y = x W^T for a few rows of x (a decode step's tokens): a weight-streaming matmul.

At decode a linear layer multiplies M <= 64 rows by a weight of N x K: the FLOPs are nothing, the
time is reading W once. What limits the read is how many bytes are in flight: a tile scheme made
for large M gives a small matrix (a 2048 x 2048 o_proj, 8 MiB) only a few dozen tiles of N, so
most of the GPU's SMs sit idle while those few stream their rows. Here the work is cut both ways:

    grid = (N tiles of BLOCK_N, SPLIT slices of K)

so every SM streams a share of W even when N is small. Each program loads [BLOCK_N, BLOCK_K]
tiles of W (K contiguous, so each row of the tile is one coalesced read) with its [16, BLOCK_K]
tile of x (rows past M masked to zero) and accumulates x W^T in fp32 with `tl.dot`. x's rows are
padded to 16 (to 64 for 17 to 64 rows), so a row's result does not depend on how many other rows
of its class came with it; a decode batch is graphed at a size of its own class. A config
with `fma` runs a one-row call on the CUDA cores instead (products summed along each W row, no
padding): a batch of one is graphed at its own size, so its row never meets others.

How a shape is cut (tile width, K step, slices, warps, stages) is a `Config`: the default `plan`,
or one measured on the GPU (`benchmarks/skinny_gpu.py --parts sweep` times candidates against
cuBLAS and writes skinny_matmul_configs.json, beside this file, with the shapes where one won;
workers/layers/fused.py sends only those shapes here unless told otherwise).

With SPLIT > 1 the slices' fp32 partial sums meet without another launch: each program writes its
[16 (64), BLOCK_N] partial to a workspace and bumps its N tile's counter (acq_rel, GPU scope); the
program that brings the counter to SPLIT sums the SPLIT partials in slice order (so the result
does not depend on which program came last), writes y in x's dtype and sets the counter back to
zero for the next call. The workspace is one per device, shared by every layer: a call's partials
are consumed before the next kernel on the stream starts (with PDL too: nothing is read or written
before the wait for the kernel before).

With programmatic dependent launch (kernels/launch.py, on by default) a program starts while the
kernel before it finishes; it spends that time prefetching its first two W tiles into L2.

`rms_norm_add_matmul` takes Olmo 2's post-norm on the way in as well: x is a sublayer's output,
and the rows multiplied are the residual stream, residual + rms_norm(x), which the call also
returns. It takes one row (a batch of one): each program first takes the row's mean square over
all of K, its chunks loaded at once (a few KiB, from L2), so the norm costs no launch of its own.
A cut on the CUDA cores (`fma`) then forms the stream tile by tile as it loads them. A cut padded
for `tl.dot` forms the whole row once, before its loop, into a row of scratch of its own (one
program writes the stream out), and its loop reads that row back like any x: an operand formed
in registers at each K step is not pipelined, and such a loop was measured at twice the time of
the plain one (7B's QKV, 59.5 against 27.8 µs).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.launch import (
    device_buffers,
    last_to_arrive,
    num_sms,
    pdl_options,
    rearm,
    wait_for_previous,
)
from kernels.peer_collectives import WordsTarget, push_row_words
from kernels.rmsnorm import add_rounded

MAX_ROWS = 64
"""Rows of x one call takes (decode batches up to this size)."""
_BLOCK_K = 128
_WORKSPACE_FLOATS = 1 << 22  # 16 MiB of fp32 partials
_COUNTERS = 1 << 16
_NORM_CHUNK = 2048  # elements of x a program loads at once for the norm's mean square
_STAGE_ELEMENTS = 1 << 23  # scratch for the post-norm's stream, a row a program (tl.dot cuts)


@triton.jit
def _matmul_kernel(
    x_ptr, stride_x, w_ptr, stride_w, y_ptr, stride_y,
    part_ptr, count_ptr,
    residual_ptr, stride_residual, norm_w_ptr, stream_ptr, stride_stream, eps, stage_ptr,
    M, N, K, K_PER_SPLIT, SPLIT,
    words_ptrs, epochs_ptr, rank, SLOT_WORDS, ROW_WORDS,
    SPLIT_K: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr, SWIGLU: tl.constexpr, NORM: tl.constexpr,
    NORM_CHUNK: tl.constexpr, NORM_CHUNKS: tl.constexpr, PUSH_WORDS: tl.constexpr,
    WORLD: tl.constexpr, PEER_PROGRAMS: tl.constexpr, PACK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, ROWS)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    k_start = split * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    if PDL:
        # launched early: while the kernel before finishes, pull this program's first two W
        # tiles into L2 (weights, which no kernel writes), then wait for it
        prefetch_l2(w_ptr, cols, col_ok, stride_w, k_start, k_end, BLOCK_K)
    wait_for_previous(PDL)
    if NORM:  # the row's 1 / rms over all of K (every program): its chunks' loads all in flight
        squares = tl.zeros([NORM_CHUNK], dtype=tl.float32)
        for c in tl.static_range(0, NORM_CHUNKS):
            chunk = c * NORM_CHUNK + tl.arange(0, NORM_CHUNK)
            part = tl.load(x_ptr + chunk, mask=chunk < K, other=0.0).to(tl.float32)
            squares += part * part
        inv_rms = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        if ROWS > 1:
            # a tl.dot operand formed in registers at every K step is not pipelined: the stream
            # is formed once, into a row of scratch this program alone uses, and read back in
            # the loop as a plain operand (after a barrier: other threads read what one wrote)
            staged = stage_ptr + (tile * SPLIT + split).to(tl.int64) * K
            for c in tl.static_range(0, NORM_CHUNKS):
                chunk = c * NORM_CHUNK + tl.arange(0, NORM_CHUNK)
                in_k = chunk < K
                formed = _post_norm(
                    tl.load(x_ptr + chunk, mask=in_k, other=0.0),
                    tl.load(residual_ptr + chunk, mask=in_k, other=0.0),
                    tl.load(norm_w_ptr + chunk, mask=in_k, other=0.0),
                    inv_rms,
                    w_ptr.dtype.element_ty,
                )
                tl.store(staged + chunk, formed, mask=in_k)
                if (tile == 0) & (split == 0):  # one program writes the stream
                    tl.store(stream_ptr + chunk, formed, mask=in_k)
            tl.debug_barrier()
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    if ROWS == 1:  # the products' running sums, each thread its own columns: one reduction, last
        wide = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)

    # -- stream this program's slice of K: W [BLOCK_N, BLOCK_K] and x [ROWS, BLOCK_K] tiles --
    for k in range(k_start, k_end, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        w = tl.load(
            w_ptr + cols[:, None].to(tl.int64) * stride_w + ks[None, :],
            mask=col_ok[:, None] & k_ok[None, :],
            other=0.0,
            eviction_policy="evict_first",  # read once a step: leave L2 to what is read again
        )
        x_tile = x_ptr + rows[:, None] * stride_x + ks[None, :]
        x_ok = row_ok[:, None] & k_ok[None, :]
        if SWIGLU:  # x holds gate | up: silu(gate) * up in fp32, rounded as kernels/activation.py
            gate = tl.load(x_tile, mask=x_ok, other=0.0).to(tl.float32)
            up = tl.load(x_tile + K, mask=x_ok, other=0.0).to(tl.float32)
            x = (gate * tl.sigmoid(gate) * up).to(w.dtype)
        elif NORM and ROWS > 1:  # the stream, staged before the loop (one row: row 0)
            x = tl.load(staged + rows[:, None] * 0 + ks[None, :], mask=x_ok, other=0.0)
        elif NORM:
            # x is a sublayer's output: residual + rms_norm(x), rounded as kernels/rmsnorm.py
            x = _post_norm(
                tl.load(x_tile, mask=x_ok, other=0.0),
                tl.load(
                    residual_ptr + rows[:, None] * stride_residual + ks[None, :],
                    mask=x_ok,
                    other=0.0,
                ),
                tl.load(norm_w_ptr + ks, mask=k_ok, other=0.0)[None, :],
                inv_rms,
                w.dtype,
            )
            if tile == 0:  # the first tile's programs write the stream, each its slice of K
                tl.store(stream_ptr + rows[:, None] * stride_stream + ks[None, :], x, mask=x_ok)
        else:
            x = tl.load(x_tile, mask=x_ok, other=0.0)
        if ROWS == 1:  # one row: products and sums on the CUDA cores, no padding to 16 rows
            wide += w.to(tl.float32) * x.to(tl.float32)
        elif IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))

    if ROWS == 1:
        acc = tl.sum(wide, axis=1)[None, :]
    out = y_ptr + rows[:, None] * stride_y + cols[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    if not SPLIT_K:
        _write_tile(acc.to(y_ptr.dtype.element_ty), out, out_ok, rows, row_ok, tile * BLOCK_N, N,
                    words_ptrs, epochs_ptr, rank, SLOT_WORDS, ROW_WORDS, ROWS, BLOCK_N,
                    PUSH_WORDS, WORLD, PEER_PROGRAMS, PACK)  # fmt: skip
    else:
        # -- publish this slice's partial; the tile's last program sums them in slice order --
        tile_parts = part_ptr + tile.to(tl.int64) * (SPLIT * ROWS * BLOCK_N)
        offsets = rows[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(tile_parts + split * (ROWS * BLOCK_N) + offsets, acc)
        if last_to_arrive(count_ptr + tile, SPLIT):
            total = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
            for s in range(SPLIT):
                total += tl.load(tile_parts + s * (ROWS * BLOCK_N) + offsets, cache_modifier=".cg")
            _write_tile(total.to(y_ptr.dtype.element_ty), out, out_ok, rows, row_ok,
                        tile * BLOCK_N, N, words_ptrs, epochs_ptr, rank, SLOT_WORDS, ROW_WORDS,
                        ROWS, BLOCK_N, PUSH_WORDS, WORLD, PEER_PROGRAMS, PACK)  # fmt: skip
            rearm(count_ptr + tile)


@triton.jit
def _write_tile(value, out, out_ok, rows, row_ok, col0, N, words_ptrs, epochs_ptr, rank,
                SLOT_WORDS, ROW_WORDS, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                PUSH_WORDS: tl.constexpr, WORLD: tl.constexpr, PEER_PROGRAMS: tl.constexpr,
                PACK: tl.constexpr):  # fmt: skip
    """An output tile into y, and with PUSH_WORDS to the other ranks as tagged words too."""
    tl.store(out, value, mask=out_ok)
    if PUSH_WORDS:
        push_row_words(value, rows, row_ok, col0, N, words_ptrs, epochs_ptr, rank, SLOT_WORDS,
                       ROW_WORDS, ROWS, BLOCK_N, WORLD, PEER_PROGRAMS, PACK)  # fmt: skip


@triton.jit
def _post_norm(x, residual, weight, inv_rms, dtype: tl.constexpr):
    """residual + rms_norm(x), given x's 1 / rms, rounded as kernels/rmsnorm.py rounds it: the
    norm to dtype, then the add in fp32, rounded once."""
    normed = (x.to(tl.float32) * inv_rms * weight.to(tl.float32)).to(dtype)
    return add_rounded(residual, normed, dtype)


@triton.jit
def prefetch_l2(w_ptr, cols, col_ok, stride_w, k_start, k_end, BLOCK_K: tl.constexpr):
    """`prefetch.global.L2` of every 128-byte line of W's rows `cols`, columns k_start to
    k_start + 2 * BLOCK_K (within k_end): one instruction per line, no registers filled."""
    lines: tl.constexpr = 2 * BLOCK_K * 2 // 128  # 16-bit weights
    offsets = k_start + tl.arange(0, lines) * 64  # elements
    pointers = w_ptr + cols[:, None].to(tl.int64) * stride_w + offsets[None, :]
    ok = col_ok[:, None] & (offsets < k_end)[None, :]
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
        "=r,l,r",
        [pointers, ok.to(tl.int32)],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


class Config(NamedTuple):
    """How one call is cut: tiles of `block_n` features, K steps of `block_k`, `split` slices of K
    (1: no partials), and the launch's warps and pipeline stages. `fma`: a one-row call sums its
    products on the CUDA cores instead of padding x to 16 rows for `tl.dot`."""

    block_n: int
    block_k: int
    split: int
    num_warps: int = 4
    num_stages: int = 4
    fma: bool = False


@functools.lru_cache
def plan(n: int, k: int, num_sms: int, split: int | None = None) -> Config:
    """The default cut of an N x K weight on a GPU of `num_sms` SMs: tiles of 64 output features,
    and K split until there are about four programs per SM, each streaming at least two BLOCK_K
    steps (or into about `split` slices, when given). Depends on the shape only, never on M."""
    block_n = 64
    tiles = triton.cdiv(n, block_n)
    steps = triton.cdiv(k, _BLOCK_K)
    if split is None:
        split = max(1, min(steps // 2, round(4 * num_sms / tiles)))
    return Config(block_n, _BLOCK_K, split)


def stages(config: Config, element_size: int) -> int:
    """The pipeline stages a launch takes: the config's for 16-bit data; at most two for 32-bit
    (fp32's tiles are twice the bytes, and four stages of the default cut's tiles overflow an
    H200 SM's shared memory)."""
    return config.num_stages if element_size <= 2 else min(config.num_stages, 2)


def row_tile(m: int, config: Config) -> int:
    """The rows x is padded to: 1 for a one-row call on the CUDA cores, else 16, or 64 past 16."""
    if config.fma and m == 1:
        return 1
    return 16 if m <= 16 else MAX_ROWS


def _slices(n: int, k: int, config: Config, rows: int = 16) -> tuple[int, int]:
    """(slices, K per slice) of a config at `rows` padded rows: no empty slice, and no more
    slices than the workspace holds partials for (one where the counters would not do)."""
    steps = triton.cdiv(k, config.block_k)
    tiles = triton.cdiv(n, config.block_n)
    fits = _WORKSPACE_FLOATS // (max(rows, 16) * config.block_n * tiles)
    if tiles > _COUNTERS:
        fits = 1
    k_per_split = triton.cdiv(steps, max(1, min(config.split, steps, fits))) * config.block_k
    return triton.cdiv(k, k_per_split), k_per_split


# AFS_SKINNY_TABLE names another table (a benchmark's A/B of configs end to end)
_TABLE_PATH = Path(
    os.environ.get("AFS_SKINNY_TABLE", Path(__file__).with_name("skinny_matmul_configs.json"))
)


@functools.lru_cache
def _table(gpu: str) -> dict[str, Config]:
    """Measured configs for this GPU's name, from skinny_matmul_configs.json (written by
    benchmarks/skinny_gpu.py --parts sweep): only shapes where one beat cuBLAS are listed."""
    if not _TABLE_PATH.exists():
        return {}
    entries = json.loads(_TABLE_PATH.read_text()).get(gpu, {})
    return {key: Config(*value["config"]) for key, value in entries.items()}


def table_key(n: int, k: int, m: int, swiglu: bool = False, norm: bool = False) -> str:
    """A measured shape: N, K, its class of rows (one, 2 to 16, 17 to 64), SwiGLU inside or not,
    the post-norm inside (`rms_norm_add_matmul`) or not."""
    rows = "m1" if m == 1 else "m16" if m <= 16 else "m64"
    return f"{n}x{k} {rows}{' swiglu' if swiglu else ''}{' norm' if norm else ''}"


@functools.lru_cache
def _device_table(device: torch.device) -> dict[str, Config]:
    return _table(torch.cuda.get_device_name(device)) if device.type == "cuda" else {}


def measured_config(
    x: torch.Tensor, weight: torch.Tensor, swiglu: bool = False, norm: bool = False
) -> Config | None:
    """The config measured faster than cuBLAS (with `norm`: than the norm's kernel then the
    matmul) for this call's shape on this GPU, or None."""
    key = table_key(weight.shape[0], weight.shape[1], x.shape[0], swiglu, norm)
    return _device_table(x.device).get(key)


def _workspace(device: torch.device) -> tuple[torch.Tensor, ...]:
    """This device's partials and counters (zeroed once; each call leaves its counters at 0)."""
    return device_buffers(
        "skinny_matmul",
        device,
        lambda: (
            torch.empty(_WORKSPACE_FLOATS, dtype=torch.float32, device=device),
            torch.zeros(_COUNTERS, dtype=torch.int32, device=device),
        ),
    )


def _stage(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """This device's scratch for the post-norm's stream of a padded (tl.dot) call: a row for
    every program, in the activations' dtype."""
    return device_buffers(
        f"skinny_matmul_stage_{dtype}_{_STAGE_ELEMENTS}",
        device,
        lambda: (torch.empty(_STAGE_ELEMENTS, dtype=dtype, device=device),),
    )[0]


def skinny_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    swiglu: bool = False,
    split: int | None = None,
    config: Config | None = None,
    push: WordsTarget | None = None,
) -> torch.Tensor:
    """x [M, K] (M <= 64) times weight [N, K] transposed: [M, N] in x's dtype, summed in fp32.

    `swiglu`: x is a gate/up projection's output [M, 2K] (gate first) and the rows multiplied are
    silu(gate) * up, computed on the way in exactly as `kernels.activation.silu_and_mul` does
    (one launch and one [M, K] round trip fewer). `split` overrides the plan's K slices (tests);
    `config` the whole plan (a measured one, or a sweep's candidate). `push`: the product is a
    row-parallel layer's partial sum, and each output tile also goes, as it is written, to the
    other ranks as the tagged words of the post-norm all-reduce that follows
    (kernels/peer_collectives.py), which then only waits for theirs."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] * (2 if swiglu else 1):
        raise ValueError(f"skinny_matmul: x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    if push is not None and (
        push.row_words * push.pack < weight.shape[0] or weight.shape[0] % push.pack
    ):
        raise ValueError(f"skinny_matmul: {weight.shape[0]} outputs do not fit {push}")
    return _launch(x, weight, swiglu, None, split, config, push)


def rms_norm_add_matmul(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    split: int | None = None,
    config: Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Olmo 2's post-norm and the next projection in one launch: stream = residual +
    rms_norm(x) (x, residual [M, K]; rounded as `kernels.rmsnorm.rms_norm_add` rounds it), and
    stream times weight [N, K] transposed. Returns (stream, product).

    One row only (M = 1). Every program takes the row's mean square over all of K before its
    loop, then forms the stream: tile by tile as it goes (a cut on the CUDA cores; the first N
    tile's programs write it), or the whole row once before its loop (a cut padded for tl.dot;
    one program writes it).
    The norm's own launch, and its round trip through memory ahead of the matmul, are gone."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"rms_norm_add_matmul: x {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1:
        raise ValueError(
            f"rms_norm_add_matmul: residual {tuple(residual.shape)} {residual.dtype} for x "
            f"{tuple(x.shape)} {x.dtype}, rows contiguous"
        )
    if norm_weight.shape != (x.shape[1],) or not norm_weight.is_contiguous():
        raise ValueError(
            f"rms_norm_add_matmul: norm weight {tuple(norm_weight.shape)}, expected [{x.shape[1]}]"
        )
    if x.shape[0] != 1:
        raise ValueError(f"rms_norm_add_matmul takes one row, got {x.shape[0]}")
    stream = torch.empty_like(x)
    product = _launch(x, weight, False, (residual, norm_weight, stream, eps), split, config, None)
    return stream, product


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    swiglu: bool,
    norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None,
    split: int | None,
    config: Config | None,
    push: WordsTarget | None,
) -> torch.Tensor:
    """One call: x (or what `swiglu` or `norm` = (residual, norm weight, stream out, eps) forms
    from it on the way in) times weight transposed; its tiles pushed to `push` too."""
    m = x.shape[0]
    n, k = weight.shape
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"skinny_matmul takes 1 to {MAX_ROWS} rows, got {m}")
    if x.dtype != weight.dtype or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("skinny_matmul: x and weight of one dtype, rows contiguous")
    if config is None:
        config = plan(n, k, num_sms(x.device), split)
    rows = row_tile(m, config)
    slices, k_per_split = _slices(n, k, config, rows)
    parts, counters = _workspace(x.device)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if norm is None:  # the norm's arguments unused; its constexprs fixed, so K compiles nothing new
        residual, norm_weight, stream, eps = x, x, x, 0.0
        chunk = chunks = 1
    else:
        residual, norm_weight, stream, eps = norm
        chunk = min(triton.next_power_of_2(k), _NORM_CHUNK)
        chunks = triton.cdiv(k, chunk)
    grid = (triton.cdiv(n, config.block_n), slices)
    stage = x  # unused but where a padded call stages its post-norm's stream
    if norm is not None and rows > 1:
        if grid[0] * slices * k > _STAGE_ELEMENTS:
            raise ValueError(
                f"rms_norm_add_matmul: {grid[0] * slices} programs of a {k}-wide row exceed the "
                f"{_STAGE_ELEMENTS} elements of scratch; take a cut of fewer programs"
            )
        stage = _stage(x.device, x.dtype)
    if push is None:  # unused, constexprs fixed
        words = (counters, counters, 0, 0, 0)
        push_constants = dict(WORLD=1, PEER_PROGRAMS=1, PACK=1)
    else:
        words, push_constants = push.args(), push.constants()
    _matmul_kernel[grid](
        x, x.stride(0), weight, weight.stride(0), y, y.stride(0),
        parts, counters,
        residual, residual.stride(0), norm_weight, stream, stream.stride(0), eps, stage,
        m, n, k, k_per_split, slices, *words,
        SPLIT_K=slices > 1, ROWS=rows, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        IEEE=x.dtype == torch.float32, SWIGLU=swiglu, NORM=norm is not None,
        NORM_CHUNK=chunk, NORM_CHUNKS=chunks, PUSH_WORDS=push is not None, **push_constants,
        num_warps=config.num_warps, num_stages=stages(config, x.element_size()),
        **pdl_options(x.device),
    )  # fmt: skip
    return y
