"""Causal prefill attention over flattened variable-length sequences and the paged KV slab.

One step's new tokens are flattened: sequence i owns rows query_start_loc[i]:query_start_loc[i+1]
of q. Its keys and values, the cached prefix and this step's tokens alike (a store kernel has
already written the new ones), live in the paged slab and are read through block_tables[i]:

    key position   0 ............. seq_len - query_len ............. seq_len - 1
                   |<-- cached prefix -->|<-- new tokens (the query rows) -->|

Query row j of sequence i sits at position seq_len - query_len + j and attends to every key at or
before it: causal with an offset.

Algorithm (FlashAttention, Dao et al. 2022; FlashAttention-2, Dao 2023): one program owns a tile
of BLOCK_M query rows of one sequence and one query head, keeps them in registers and streams the
sequence's keys and values in tiles of BLOCK_N tokens. Each key tile's page ids are gathered from
the block table (PagedAttention, Kwon et al. 2023), so a tile spans BLOCK_N / block_size pages
scattered anywhere in the slab. An online softmax in fp32 carries the running row maximum and row
sum and rescales the unnormalised output accumulator; the division by the row sum happens once, in
the epilogue (the FlashAttention-2 ordering). log2(e) is folded into the softmax scale so that
every exponential is an exp2.

Key tiles come in two ranges: [0, first row's position], which every row of the query tile sees
whole (no mask), then the diagonal and the sequence tail, masked causally. The loop stops at the
last key the tile's last row can see: nothing past the causal limit is read.

Grid: (cdiv(max_query_len, BLOCK_M), num_seqs, num_heads); programs past a sequence's own query
length return at once. One query head per program, rather than a GQA group, keeps each tile a plain
[BLOCK_M, D] @ [D, BLOCK_N] product at full BLOCK_M for every GQA ratio and gives num_heads-fold
parallelism to a single long prompt. Prefill tiles are compute-bound, so the group's shared K/V
tiles, read once per query head, come from L2 rather than costing HBM bandwidth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Configs tried on CUDA; BLOCK_N spans whole 16-token pages.
_CUDA_CONFIGS = [
    triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
    for block_m, block_n, warps, stages in [
        (128, 64, 8, 3),
        (128, 32, 4, 3),
        (64, 64, 4, 3),
        (64, 32, 4, 4),
        (128, 128, 8, 2),
    ]
]
# One small config for the Triton interpreter (CPU tests): a key tile spans two 16-token pages.
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


@triton.jit
def _attend_key_range(
    acc,
    row_sum,
    row_max,
    q,
    query_pos,
    kv_cache_ptr,
    block_table_ptr,
    kv_head,
    stride_kv,
    stride_block,
    stride_head,
    stride_slot,
    seq_len,
    key_start,
    key_end,
    qk_scale,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Fold key tiles [key_start, key_end) into the running softmax state of one query tile."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(key_start, key_end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_seq = offs_n < seq_len
        # -- gather the tile's pages --
        page = tl.load(block_table_ptr + offs_n // BLOCK_SIZE, mask=in_seq, other=0)
        token_offs = (
            page.to(tl.int64) * stride_block
            + kv_head * stride_head
            + (offs_n % BLOCK_SIZE) * stride_slot
        )  # [BLOCK_N]
        # -- scores --
        k = tl.load(
            kv_cache_ptr + token_offs[None, :] + offs_d[:, None], mask=in_seq[None, :], other=0.0
        )  # [HEAD_DIM, BLOCK_N]
        qk = tl.dot(q, k, input_precision="ieee") * qk_scale  # [BLOCK_M, BLOCK_N]
        if MASKED:
            # rows past the query are never stored; keys past seq_len lie past every stored row
            qk = tl.where(offs_n[None, :] <= query_pos[:, None], qk, float("-inf"))
        # -- online softmax --
        tile_max = tl.maximum(row_max, tl.max(qk, 1))  # finite: key 0 is in the first tile
        p = tl.math.exp2(qk - tile_max[:, None])  # [BLOCK_M, BLOCK_N]
        alpha = tl.math.exp2(row_max - tile_max)  # rescales what earlier tiles summed
        row_sum = row_sum * alpha + tl.sum(p, 1)
        row_max = tile_max
        v = tl.load(
            kv_cache_ptr + stride_kv + token_offs[:, None] + offs_d[None, :],
            mask=in_seq[:, None],
            other=0.0,
        )  # [BLOCK_N, HEAD_DIM]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    return acc, row_sum, row_max


@triton.jit
def _kernel(
    out_ptr,
    q_ptr,
    kv_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    stride_q_token,
    stride_q_head,
    stride_out_token,
    stride_out_head,
    stride_kv,
    stride_block,
    stride_head,
    stride_slot,
    stride_table,
    qk_scale,
    NUM_QUERIES_PER_KV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    m_block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    if m_block * BLOCK_M >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    kv_head = head // NUM_QUERIES_PER_KV
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_table

    # -- load q --
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_in_query = offs_m < query_len
    rows = (query_start + offs_m).to(tl.int64)  # [BLOCK_M]
    q = tl.load(
        q_ptr + rows[:, None] * stride_q_token + head * stride_q_head + offs_d[None, :],
        mask=row_in_query[:, None],
        other=0.0,
    )  # [BLOCK_M, HEAD_DIM]
    query_pos = seq_len - query_len + offs_m  # [BLOCK_M]

    # -- online softmax --
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    first_pos = seq_len - query_len + m_block * BLOCK_M
    # whole tiles at or before the first row's position are visible to every row: no mask
    unmasked_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    # the last row sees up to its own position: later keys are never read
    key_end = tl.minimum(first_pos + BLOCK_M, seq_len)
    acc, row_sum, row_max = _attend_key_range(
        acc, row_sum, row_max,
        q, query_pos,
        kv_cache_ptr, block_table_ptr, kv_head,
        stride_kv, stride_block, stride_head, stride_slot,
        seq_len, 0, unmasked_end, qk_scale,
        BLOCK_SIZE, HEAD_DIM, BLOCK_N, MASKED=False,
    )  # fmt: skip
    acc, row_sum, row_max = _attend_key_range(
        acc, row_sum, row_max,
        q, query_pos,
        kv_cache_ptr, block_table_ptr, kv_head,
        stride_kv, stride_block, stride_head, stride_slot,
        seq_len, unmasked_end, key_end, qk_scale,
        BLOCK_SIZE, HEAD_DIM, BLOCK_N, MASKED=True,
    )  # fmt: skip

    # -- epilogue --
    acc = acc / row_sum[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_out_token + head * stride_out_head + offs_d[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_in_query[:, None],
    )


_tuned_kernel = triton.autotune(configs=_CUDA_CONFIGS, key=["HEAD_DIM", "NUM_QUERIES_PER_KV"])(
    _kernel
)


def prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    max_query_len: int,
) -> torch.Tensor:
    """Causal attention of each sequence's new rows over its paged K/V; writes and returns out.

    q [T, H, D]; kv_cache [2, num_blocks, KVH, block_size, D] already holding the new tokens' K/V;
    block_tables [B, max_blocks] int32; query_start_loc [B + 1] int32; seq_lens [B] int32 (tokens
    after this step); out [T, H, D]; max_query_len the longest run of new tokens (sizes the grid).
    """
    if q.dim() != 3:
        raise ValueError(f"q: expected [T, H, D], got shape {tuple(q.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[4] != head_dim:
        raise ValueError(
            f"kv_cache: expected [2, num_blocks, KVH, block_size, {head_dim}], "
            f"got shape {tuple(kv_cache.shape)}"
        )
    num_kv_heads, block_size = kv_cache.shape[2], kv_cache.shape[3]
    if num_heads % num_kv_heads:
        raise ValueError(f"q: {num_heads} heads is not a multiple of {num_kv_heads} KV heads")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"q: head_dim must be a power of two of at least 16, got {head_dim}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q: dtype must be float16, bfloat16 or float32, got {q.dtype}")
    if kv_cache.dtype != q.dtype or out.dtype != q.dtype:
        raise ValueError(f"kv_cache, out: dtype must match q ({q.dtype})")
    if out.shape != q.shape:
        raise ValueError(f"out: expected shape {tuple(q.shape)}, got {tuple(out.shape)}")
    if q.stride(-1) != 1 or out.stride(-1) != 1 or not kv_cache.is_contiguous():
        raise ValueError("q, out: head_dim must be contiguous; kv_cache must be contiguous")
    num_seqs = seq_lens.shape[0]
    for name, tensor, shape in (
        ("block_tables", block_tables, (num_seqs, block_tables.shape[-1])),
        ("query_start_loc", query_start_loc, (num_seqs + 1,)),
        ("seq_lens", seq_lens, (num_seqs,)),
    ):
        if tensor.dtype != torch.int32 or tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name}: expected int32 {shape}, got {tensor.dtype} {tuple(tensor.shape)}"
            )
    if any(t.device != q.device for t in (kv_cache, block_tables, query_start_loc, seq_lens, out)):
        raise ValueError(f"all tensors must be on q's device ({q.device})")
    if max_query_len < 0 or max_query_len > num_tokens:
        raise ValueError(f"max_query_len: must be in [0, {num_tokens}], got {max_query_len}")
    if num_seqs == 0 or max_query_len == 0:
        return out

    def grid(meta):
        return (triton.cdiv(max_query_len, meta["BLOCK_M"]), num_seqs, num_heads)

    kernel, config = (_tuned_kernel, {}) if q.is_cuda else (_kernel, _INTERPRETER_CONFIG)
    kernel[grid](
        out, q, kv_cache,
        block_tables, query_start_loc, seq_lens,
        q.stride(0), q.stride(1),
        out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0),
        scale * LOG2E,
        NUM_QUERIES_PER_KV=num_heads // num_kv_heads,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        **config,
    )  # fmt: skip
    return out
