"""Split-K (flash-decoding) paged attention for one query token per sequence.

    out[b, h] = softmax(scale * q[b, h] . K[b, h // G]^T) V[b, h // G],   G = H // KVH

where K and V of sequence b are its first seq_lens[b] tokens, scattered over the slab blocks listed
in block_tables[b] (PagedAttention: Kwon et al. 2023, "Efficient Memory Management for Large
Language Model Serving with PagedAttention"). The slab is `[2, num_blocks, KVH, BS, D]`, so one
(block, KV head) is a contiguous [BS, D] tile.

Decode has one query row per sequence, so parallelising over (batch, heads) alone leaves most of
a GPU idle when the batch is small and the context long. Flash-Decoding (Dao, Haziza, Massa, Sizov
2023, "Flash-Decoding for long-context inference") also splits the context:

One launch, grid (B, KVH, num_splits): each program owns one KV head and a contiguous run of that
sequence's key tiles (BLOCK_N tokens, several whole blocks; the tiles are divided evenly among the
splits per sequence). A sequence shorter than the grid is sized for uses only as many splits as
it has runs of tiles: the others leave at once (a graph's grid is fixed by the longest context its
block tables can hold, so at a short context most of its programs would otherwise redo the
prologue, bump the counter and be merged for nothing). It loads the G query
heads that share the KV head once, then streams its tiles, gathering each tile's blocks through
the block table (several [BS, D] loads in flight per iteration: one block at a time leaves HBM
waiting on latency) and reading each K and V element exactly once for all G heads, with the
online softmax of FlashAttention (Dao et al. 2022) in fp32, rescaling only the accumulator and
normalising once at the end (FlashAttention-2, Dao 2023). With one split that is the output.
Otherwise it writes its normalised partial output [B, H, splits, D] and its log-sum-exp
[B, H, splits] (base 2; -inf for an empty split) and bumps its (sequence, KV head)'s counter
(acq_rel, GPU scope); the program that brings it to the splits used merges the partials of the G
heads, with weights exp2(lse_s - max_s lse_s) divided by their sum (the exact softmax over the
whole context; in split order, whichever program came last), and sets the counter back to zero. No
second launch: at batch 1 a step has one launch fewer per layer. A sequence of length 0 (a
padding row) gets zeros.

The G query heads of a KV head are the rows of a tile padded to a power of two of at least 16, so
both products (q K^T: [G, D] x [D, BLOCK_N]; P V: [G, BLOCK_N] x [BLOCK_N, D]) are `tl.dot`s on the
tensor
cores. With G = 1 (no GQA) 15 of 16 rows are padding: they are masked on load and store, so they
move no bytes, and decode is bound by reading K/V from memory, not by these small products. The
alternative (elementwise broadcast-and-sum for small G) would hold a [G, BLOCK_N, D] product in
registers and is a second code path; one path serves every GQA ratio.

num_splits heuristic: when B * KVH programs already give every SM (132 on the H200)
`PROGRAMS_PER_SM` of them one split is enough (several resident programs per SM keep more loads
in flight); otherwise split until they do, keeping at least one tile per split of the longest
sequence so that the extra partial-output traffic stays small next to the K/V read, and at most
`_MAX_SPLITS`. The longest sequence is bounded by the width of block_tables, which the host knows
without a device sync (and which a captured CUDA graph keeps fixed).

Key tiles are BLOCK_N = 64 tokens, or `SMALL_TILE` = 32 when the call has at most one (sequence,
KV head) for every 8 SMs (Olmo 2 1B at batch 1: 16): at a few hundred tokens of context such a
call has only a few dozen programs of work, and halving each one's tile halves the read on its
critical path (measured on the H200 at batch 1: 1B faster with 32, 7B's 32 KV heads with 64).
A call of 64-token tiles with at most one (sequence, KV head) per SM runs `SMALL_WARPS` = 8
warps, not 4 (7B at batch 1: 254.7 against 252.4 tok/s end to end; 2 and 16 were slower). Such
a call also splits a sequence fewer ways (`FEW_SPLITS`; AFS_ATTN_FEW_SPLITS=0 turns it off): up
to 3 splits of one tile each, and past 6 tiles at least 2 tiles a split, since every split redoes
the prologue and joins the merge. 7B at batch 1 over a 128-token prompt and 256 new tokens (2 to
6 tiles) ran at 255.8 and 255.4 tok/s with at most 3 splits against 253.3 and 252.8 with one
tile a split, on two machines; at least 2 tiles a split at any length was slower (252.1), as was
at least 3 (250.0). Past 6 tiles the rule is not measured.

With the prologue inside, a program reads what no kernel of its step writes before it waits for the
projection (programmatic dependent launch, kernels/launch.py): the sequence's length, its first key
tile's block ids, that tile's K and V (the tokens before the new one, stored by earlier steps; the
new one is this kernel's to store), the new token's position with its rows of the cos and sin
tables, and its heads' QK-norm weights. The step's inputs are copied in before its first kernel, so
all of it is there. At batch 1 a split holds one tile, so its whole K/V read overlaps the
projection's tail, and after the wait only the prologue's reads of the projection (in L2) remain on
its critical path; they are all issued before the first is used (the rows of this KV head's heads,
and the chunks of q and k the full-width norm sums, a chunk of each at once). Chunks of all of 7B's
q and k (32 heads, not 16) were slower end to end (250.5 against 252.9 tok/s at batch 1).
AFS_ATTN_EARLY=0 reads everything after the wait.

The kernel after this one (the output projection) is let launch only once a program's K/V reads
are done, not at its start: launched early, its programs would prefetch their weights into L2
while this kernel, bound by latency rather than bandwidth, still waits on its loads, and (this
kernel itself launched early, during the QKV projection) while that projection still streams its
weight. Where the QK-norm's sums come from a kernel of their own (Olmo 2 under tensor
parallelism: their all-reduce runs between the projection and this kernel), the second does not
hold, and the memory sits idle while that kernel waits for the other ranks and this one for its
loads: the next kernel launches at a program's start, and its prefetch fills that time (7B at
tp = 2, batch 1: 402.4 against 394.7 tok/s; AFS_ATTN_LAUNCH_EARLY=1 or 0 decides it for every
call with the prologue inside).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.kv_store import store_slot
from kernels.launch import (
    device_buffers,
    last_to_arrive,
    launch_next,
    num_sms,
    pdl_options,
    rearm,
    wait_for_previous_launching,
)
from kernels.paged_checks import check_paged_attention
from kernels.rope import (
    check_prologue,
    norm_weights,
    qk_tiles,
    rope_row,
    rotate,
    sum_squares_qk,
)

_MAX_SPLITS = 64
# Pass 1's launch: key tile (tokens, whole blocks), warps, pipeline stages, and how many programs
# per SM the split heuristic aims for. Module-level so that a benchmark can sweep them.
TILE_CONFIG = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
PROGRAMS_PER_SM = 4
SMALL_TILE = 32  # key tile of a call with at most one (sequence, KV head) for every 8 SMs
# warps of a call with at most one (sequence, KV head) per SM that keeps the full key tile
SMALL_WARPS = int(os.environ.get("AFS_ATTN_SMALL_WARPS", "8"))
# such a call splits a sequence at most 3 ways, or at least 2 tiles a split past that
FEW_SPLITS = os.environ.get("AFS_ATTN_FEW_SPLITS", "1") != "0"
# with the prologue inside: the first key tile read before the wait for the projection
EARLY = os.environ.get("AFS_ATTN_EARLY", "1") != "0"
# the next kernel let launch at a program's start instead of once its K/V reads are done: where
# the QK-norm's sums come from a kernel of their own (unset: None, then; 1: always; 0: never)
LAUNCH_EARLY = {"1": True, "0": False}.get(os.environ.get("AFS_ATTN_LAUNCH_EARLY", ""))
_LOG2E = 1.4426950408889634


@triton.jit
def _new_token(
    row, eps, squares_ptr, Q_WIDTH, K_WIDTH,
    cos, signed_sin, q_w, q_w_rolled, k_w, k_w_rolled,
    batch, q_offsets, q_rolled, in_group, k_offsets, k_rolled, num_heads, num_kv_heads,
    HEAD_DIM: tl.constexpr, BLOCK_HEADS: tl.constexpr,
    QK_NORM: tl.constexpr, SQUARES_GIVEN: tl.constexpr,
):  # fmt: skip
    """The attention prologue (kernels/rope.py's, through its helpers) for one KV head of one
    token, from its fused projection `row`, its position's `rope_row` and its heads' QK-norm
    weights (q's and k's, each at the rolled dims as well, read beforehand): its G query
    heads [GROUP_PAD, D] and its key [1, D] normalised (full width) and rotated, each rounded to
    the activation dtype as the prologue stores them, and its value [1, D]. Every load of the
    row is issued before the first is used: one round trip to L2 where one chunk holds q."""
    k_row = row + num_heads * HEAD_DIM
    q_x = tl.load(row + q_offsets, mask=in_group[:, None], other=0.0)
    q_x_rolled = tl.load(row + q_rolled, mask=in_group[:, None], other=0.0)
    k_x = tl.load(k_row + k_offsets)
    k_x_rolled = tl.load(k_row + k_rolled)
    v = tl.load(k_row + num_kv_heads * HEAD_DIM + k_offsets)
    q_inv_rms = 1.0
    k_inv_rms = 1.0
    if QK_NORM:
        if SQUARES_GIVEN:  # every rank's sums, all-reduced before
            q_inv_rms = tl.rsqrt(tl.load(squares_ptr + batch * 2) / Q_WIDTH + eps)
            k_inv_rms = tl.rsqrt(tl.load(squares_ptr + batch * 2 + 1) / K_WIDTH + eps)
        else:
            q_total, k_total = sum_squares_qk(
                row, k_row, num_heads, num_kv_heads, HEAD_DIM, HEAD_DIM, BLOCK_HEADS
            )
            q_inv_rms = tl.rsqrt(q_total / (num_heads * HEAD_DIM) + eps)
            k_inv_rms = tl.rsqrt(k_total / (num_kv_heads * HEAD_DIM) + eps)
    dtype = row.dtype.element_ty
    q = rotate(q_x, q_x_rolled, q_w, q_w_rolled, q_inv_rms, cos, signed_sin, QK_NORM).to(dtype)
    k = rotate(k_x, k_x_rolled, k_w, k_w_rolled, k_inv_rms, cos, signed_sin, QK_NORM).to(dtype)
    return q, k, v


@triton.jit
def _kernel(
    q_ptr, stride_q_batch, stride_q_head,
    q_norm_ptr, k_norm_ptr, eps, squares_ptr, Q_WIDTH, K_WIDTH,
    positions_ptr, cos_ptr, sin_ptr, slot_mapping_ptr,
    cache_ptr, stride_cache_kv, stride_cache_block, stride_cache_head, stride_cache_slot,
    block_tables_ptr, stride_table_batch,
    seq_lens_ptr,
    partial_out_ptr, lse_ptr, count_ptr,
    out_ptr, stride_out_batch, stride_out_head,
    qk_scale, num_splits,
    GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PROLOGUE: tl.constexpr, QK_NORM: tl.constexpr, SQUARES_GIVEN: tl.constexpr,
    BLOCK_HEADS: tl.constexpr, EARLY: tl.constexpr, FEW_SPLITS: tl.constexpr,
    LAUNCH_EARLY: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One (sequence, KV head, split) over its run of key tiles; the last split of a (sequence,
    KV head) to finish merges them all. With PROLOGUE, q_ptr is the fused projection
    [B, (H + 2 KVH) D] of the new tokens, not yet normalised, rotated or stored (see
    `decode_attention_qkv`)."""
    batch = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    num_heads = num_kv_heads * GROUP_SIZE
    if not EARLY:
        # the next kernel (the output projection) launches once this one's K/V reads are done,
        # so that its weight prefetch does not crowd them (with LAUNCH_EARLY, now)
        wait_for_previous_launching(LAUNCH_EARLY, PDL)

    # -- this split's tiles of BLOCK_N tokens (with PROLOGUE, of the tokens before the new one) --
    seq_len = tl.load(seq_lens_ptr + batch)
    if PROLOGUE:
        cached = tl.maximum(seq_len - 1, 0)
    else:
        cached = seq_len
    num_tiles = tl.cdiv(cached, BLOCK_N)
    splits = num_splits
    if FEW_SPLITS:
        # a call of few (sequence, KV head)s: up to 3 splits of one tile, and past 6 tiles at
        # least 2 tiles a split (each split redoes the prologue and joins the merge)
        splits = tl.minimum(num_splits, tl.maximum(3, tl.cdiv(num_tiles, 2)))
    tiles_per_split = tl.maximum(tl.cdiv(num_tiles, splits), 1)
    # the splits this sequence fills: a captured graph sizes num_splits for the longest context
    # its block tables hold, so at a short one most would be empty; they leave now, and the
    # used ones count and merge among themselves
    used_splits = tl.maximum(tl.cdiv(num_tiles, tiles_per_split), 1)
    if split >= used_splits:
        return
    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, num_tiles)
    dims = tl.arange(0, HEAD_DIM)
    head_base = cache_ptr + kv_head * stride_cache_head
    table = block_tables_ptr + batch * stride_table_batch
    group = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP_SIZE + group  # [GROUP_PAD] query heads of this KV head
    in_group = group < GROUP_SIZE
    if PROLOGUE:
        # the new token's position, its rows of the cos and sin tables, and the QK-norm's
        # weights of this KV head's heads (q's and k's, each at the rolled dims as well)
        position = tl.load(positions_ptr + batch).to(tl.int64) * HEAD_DIM
        cos, signed_sin, rolled = rope_row(cos_ptr, sin_ptr, position, dims, HEAD_DIM)
        q_offsets = heads[:, None] * HEAD_DIM + dims[None, :]
        q_rolled = heads[:, None] * HEAD_DIM + rolled[None, :]
        k_head = kv_head + tl.arange(0, 1)  # [1]
        k_offsets = k_head[:, None] * HEAD_DIM + dims[None, :]
        k_rolled = k_head[:, None] * HEAD_DIM + rolled[None, :]
        q_w, q_w_rolled = norm_weights(q_norm_ptr, q_offsets, q_rolled, in_group[:, None], QK_NORM)
        k_w, k_w_rolled = norm_weights(
            k_norm_ptr, k_offsets, k_rolled, (dims < HEAD_DIM)[None, :], QK_NORM
        )
    if EARLY:
        # the cached tokens' K/V (no kernel of this step writes them: the new token is this
        # kernel's to store), the step's tables (copied in before the step's first kernel) and
        # the rope rows above are read before the wait for the projection, so they are in
        # flight while it finishes
        k_first, v_first, valid_first = _load_tile(
            head_base, table, first_tile, last_tile, cached, dims, stride_cache_kv,
            stride_cache_block, stride_cache_slot, BLOCK_SIZE, BLOCK_N,
        )  # fmt: skip
        wait_for_previous_launching(LAUNCH_EARLY, PDL)

    # -- q --
    if PROLOGUE:
        # this KV head's share of the prologue, done by each of its splits (the rows are in L2);
        # split 0 stores the new key and value, which no program of this launch reads
        q, k_new, v_new = _new_token(
            q_ptr + batch * stride_q_batch, eps, squares_ptr, Q_WIDTH, K_WIDTH,
            cos, signed_sin, q_w, q_w_rolled, k_w, k_w_rolled,
            batch, q_offsets, q_rolled, in_group, k_offsets, k_rolled, num_heads, num_kv_heads,
            HEAD_DIM, BLOCK_HEADS, QK_NORM, SQUARES_GIVEN,
        )  # fmt: skip
        slot = tl.load(slot_mapping_ptr + batch).to(tl.int64)
        stored_dims = tl.where((split == 0) & (slot >= 0), HEAD_DIM, 0)
        store = (dims < stored_dims)[None, :]
        store_slot(
            cache_ptr, stride_cache_kv, stride_cache_block, stride_cache_head, stride_cache_slot,
            tl.maximum(slot, 0), kv_head + tl.arange(0, 1), dims, k_new, v_new, store, BLOCK_SIZE,
        )  # fmt: skip
    else:
        q = tl.load(
            q_ptr + batch * stride_q_batch + heads[:, None] * stride_q_head + dims[None, :],
            mask=in_group[:, None],
            other=0.0,
        )  # [GROUP_PAD, D]

    # -- online softmax --
    # running max m (base 2), running sum l and unnormalised output acc of each query head
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    loop_start = first_tile
    if EARLY:
        if first_tile < last_tile:
            m, l, acc = _attend_tile(
                q, k_first, v_first, valid_first, m, l, acc, qk_scale, DOT_PRECISION
            )
        loop_start = first_tile + 1
    for tile in range(loop_start, last_tile):
        k, v, valid = _load_tile(
            head_base, table, tile, last_tile, cached, dims, stride_cache_kv,
            stride_cache_block, stride_cache_slot, BLOCK_SIZE, BLOCK_N,
        )  # fmt: skip
        m, l, acc = _attend_tile(q, k, v, valid, m, l, acc, qk_scale, DOT_PRECISION)
    if not LAUNCH_EARLY:
        launch_next(PDL)  # the K/V reads are done
    if PROLOGUE:
        # -- the new token, from registers, in the last split (a padding row has none) --
        if (split == used_splits - 1) & (seq_len > 0):
            k_f = k_new.to(cache_ptr.dtype.element_ty).to(tl.float32)
            v_f = v_new.to(cache_ptr.dtype.element_ty).to(tl.float32)
            score = tl.sum(q.to(tl.float32) * k_f, axis=1) * qk_scale  # [G]
            m_new = tl.maximum(m, score)
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(score - m_new)
            l = l * alpha + p
            # p rounded as the tiles' P V product rounds it
            p_v = p.to(cache_ptr.dtype.element_ty).to(tl.float32)
            acc = acc * alpha[:, None] + p_v[:, None] * v_f
            m = m_new

    # -- epilogue --
    nonempty = l > 0.0
    out = acc / tl.where(nonempty, l, 1.0)[:, None]
    if used_splits == 1:  # the whole context here: the output, no partials
        out_rows = out_ptr + batch * stride_out_batch + heads[:, None] * stride_out_head
        tl.store(out_rows + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=in_group[:, None])
    else:
        # -- publish this split's partial; the last split of this KV head merges them --
        lse = tl.where(nonempty, m + tl.log2(tl.where(nonempty, l, 1.0)), float("-inf"))
        row = (batch * num_heads + heads) * num_splits + split  # [G] rows of [B, H, splits]
        tl.store(lse_ptr + row, lse, mask=in_group)
        tl.store(
            partial_out_ptr + row[:, None] * HEAD_DIM + dims[None, :], out, mask=in_group[:, None]
        )
        counter = count_ptr + batch * tl.num_programs(1) + kv_head
        if last_to_arrive(counter, used_splits):
            for g in tl.static_range(GROUP_SIZE):
                _merge_splits(
                    partial_out_ptr, lse_ptr, out_ptr, stride_out_batch, stride_out_head,
                    batch, kv_head * GROUP_SIZE + g, num_heads, num_splits, used_splits,
                    SPLITS_PAD, HEAD_DIM,
                )  # fmt: skip
            rearm(counter)


@triton.jit
def _load_tile(
    head_base, table, tile, last_tile, cached, dims, stride_cache_kv, stride_cache_block,
    stride_cache_slot, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """K and V [BLOCK_N, D] of one key tile of a KV head, gathered from its BLOCK_N / BLOCK_SIZE
    blocks (each a contiguous [BS, D]), and which of its tokens are in the context (none when
    tile is past last_tile)."""
    tokens = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    # the last tile may end mid-block; one at or past last_tile has no token
    valid = tokens < tl.minimum(cached, last_tile * BLOCK_N)
    block = tl.load(table + tokens // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    offsets = block * stride_cache_block + (tokens % BLOCK_SIZE) * stride_cache_slot
    tile_ptrs = head_base + offsets[:, None] + dims[None, :]  # [BLOCK_N, D]
    k = tl.load(tile_ptrs, mask=valid[:, None], other=0.0)
    v = tl.load(tile_ptrs + stride_cache_kv, mask=valid[:, None], other=0.0)
    return k, v, valid


@triton.jit
def _attend_tile(q, k, v, valid, m, l, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """The online softmax's step over one key tile that holds at least one valid token: the
    running max m (base 2), sum l and unnormalised output acc of each query head, updated."""
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [G, BLOCK_N]
    scores = tl.where(valid[None, :], scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))  # finite: the tile has a valid token
    alpha = tl.exp2(m - m_new)  # rescales what was summed under the old max
    p = tl.exp2(scores - m_new[:, None])  # [G, BLOCK_N]
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l, acc


@triton.jit
def _merge_splits(
    partial_out_ptr, lse_ptr, out_ptr, stride_out_batch, stride_out_head,
    batch, head, num_heads, num_splits, used_splits,
    SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """One (sequence, query head): its first `used_splits` splits' partial outputs (rows of
    `num_splits`) merged by their log-sum-exps."""
    # -- load the splits (.cg: from L2, where the other programs' stores are) --
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    row = (batch * num_heads + head) * num_splits + splits  # [SPLITS_PAD]
    in_range = splits < used_splits
    lse = tl.load(lse_ptr + row, mask=in_range, other=float("-inf"), cache_modifier=".cg")
    partial = tl.load(
        partial_out_ptr + row[:, None] * HEAD_DIM + dims[None, :],
        mask=in_range[:, None],
        other=0.0,
        cache_modifier=".cg",
    )  # [SPLITS_PAD, D]

    # -- rescale and sum --
    # empty splits have lse -inf and weight 0; if all are empty (length 0) the output is 0
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp2(lse - lse_max)  # [SPLITS_PAD]
    total = tl.sum(weights, axis=0)
    out = tl.sum(weights[:, None] * partial, axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(
        out_ptr + batch * stride_out_batch + head * stride_out_head + dims,
        out.to(out_ptr.dtype.element_ty),
    )


_COUNTERS = 1 << 16


def _counters(device: torch.device) -> torch.Tensor:
    """This device's split counters, one per (sequence, KV head) (zeroed once; each call leaves
    its counters at 0)."""
    return device_buffers(
        "decode_attention",
        device,
        lambda: (torch.zeros(_COUNTERS, dtype=torch.int32, device=device),),
    )[0]


def choose_num_splits(
    batch: int, num_kv_heads: int, max_tokens: int, num_sms: int, tile_tokens: int
) -> int:
    """Splits per sequence so that pass 1 keeps every SM busy without splits under one tile."""
    programs = batch * num_kv_heads
    to_fill = triton.cdiv(PROGRAMS_PER_SM * num_sms, max(programs, 1))
    worth_splitting = triton.cdiv(max_tokens, tile_tokens)
    return max(1, min(to_fill, worth_splitting, _MAX_SPLITS))


def decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of q ([B, H, D], one token per sequence) over the paged slab; writes `out`.

    kv_cache [2, NB, KVH, BS, D] in q's dtype, block_tables [B, max_blocks] int32, seq_lens [B]
    int32. `num_splits` defaults to the heuristic in the module docstring.
    """
    num_kv_heads, block_size = check_paged_attention(q, kv_cache, out, block_tables, seq_lens)
    if q.stride(2) != 1:
        raise ValueError("q: head_dim must be contiguous")
    return _launch(
        q, q.stride(1), _NO_PROLOGUE_ARGS, _NO_PROLOGUE, kv_cache, block_tables, seq_lens, scale,
        out, num_splits,
    )  # fmt: skip


def decode_attention_qkv(
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    qk_squares: torch.Tensor | None = None,
    norm_widths: tuple[int, int] | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """The attention prologue and decode attention in one launch: from each sequence's fused
    projection qkv [B, (H + 2 KVH) D] of its one new token, the QK-norm, RoPE and K/V store of
    `kernels.rope.rotary_qkv` (same arguments) and the attention of `decode_attention` over the
    tokens already in the slab plus the new one (taken from registers, not read back); writes
    `out` [B, H, D]. Every KV head's splits redo its share of the prologue (q's and k's rows are
    read from L2 again; the full-width norm sums the whole row in each), so no kernel runs
    between the QKV projection and attention.
    """
    head_dim = cos_cache.shape[1]
    qk_norm, squares_given, widths = check_prologue(
        qkv, num_heads, num_kv_heads, positions, cos_cache, sin_cache,
        q_norm_weight, k_norm_weight, qk_squares, norm_widths, kv_cache, slot_mapping,
    )  # fmt: skip
    batch = qkv.shape[0]
    q = qkv.view(batch, -1, head_dim)[:, :num_heads]  # [B, H, D]: what the checks see of q
    check_paged_attention(q, kv_cache, out, block_tables, seq_lens)
    prologue_args = (
        q_norm_weight, k_norm_weight, eps, qk_squares, *widths,
        positions, cos_cache, sin_cache, slot_mapping,
    )  # fmt: skip
    prologue = dict(
        PROLOGUE=True, QK_NORM=qk_norm, SQUARES_GIVEN=squares_given,
        BLOCK_HEADS=qk_tiles(num_heads, num_kv_heads, head_dim)[1], EARLY=EARLY,
        LAUNCH_EARLY=squares_given if LAUNCH_EARLY is None else LAUNCH_EARLY,
    )  # fmt: skip
    return _launch(
        qkv, 0, prologue_args, prologue, kv_cache, block_tables, seq_lens, scale, out, num_splits
    )


# the prologue's arguments and constexprs of a launch without it
_NO_PROLOGUE_ARGS = (None, None, 0.0, None, 1, 1, None, None, None, None)
_NO_PROLOGUE = dict(
    PROLOGUE=False, QK_NORM=False, SQUARES_GIVEN=False, BLOCK_HEADS=1, EARLY=False,
    LAUNCH_EARLY=False,
)  # fmt: skip


def _launch(
    q: torch.Tensor,
    stride_q_head: int,
    prologue_args: tuple,
    prologue: dict,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    num_splits: int | None,
) -> torch.Tensor:
    batch, num_heads, head_dim = out.shape
    num_kv_heads, block_size = kv_cache.shape[2], kv_cache.shape[3]
    if seq_lens.shape[0] != batch:
        raise ValueError(f"seq_lens: expected [{batch}] (one per row of q), got {seq_lens.shape}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(
            f"kv_cache: block_size must be a power of two of at least 16, got {block_size}"
        )
    config = {**TILE_CONFIG}
    few_splits = False
    if batch * num_kv_heads <= num_sms(q.device) // 8:
        config["BLOCK_N"] = min(config["BLOCK_N"], SMALL_TILE)
    elif batch * num_kv_heads <= num_sms(q.device):
        config["num_warps"] = SMALL_WARPS
        few_splits = FEW_SPLITS
    tile_tokens = max(config["BLOCK_N"], block_size)
    config["BLOCK_N"] = tile_tokens
    if num_splits is None:
        num_splits = choose_num_splits(
            batch,
            num_kv_heads,
            block_tables.shape[1] * block_size,
            num_sms(q.device),
            tile_tokens,
        )
    if num_splits < 1:
        raise ValueError(f"num_splits: must be at least 1, got {num_splits}")
    if batch * num_kv_heads > _COUNTERS:
        raise ValueError(f"decode_attention: at most {_COUNTERS} sequences x KV heads a call")
    if batch == 0:
        return out

    group_size = num_heads // num_kv_heads
    partial_out = torch.empty(
        (batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
    )
    lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
    _kernel[(batch, num_kv_heads, num_splits)](
        q, q.stride(0), stride_q_head,
        *prologue_args,
        kv_cache, kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables, block_tables.stride(0),
        seq_lens,
        partial_out, lse, _counters(q.device),
        out, out.stride(0), out.stride(1),
        scale * _LOG2E, num_splits,
        GROUP_SIZE=group_size, GROUP_PAD=max(16, triton.next_power_of_2(group_size)),
        SPLITS_PAD=triton.next_power_of_2(num_splits),
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        **config,
        # fp32 products in full precision (TF32 would miss the fp32 tolerance); ignored otherwise
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **prologue, FEW_SPLITS=few_splits,
        **pdl_options(q.device),
    )  # fmt: skip
    return out
