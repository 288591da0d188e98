"""Causal prefill attention over flattened variable-length sequences, a paged prefix and new K/V.

One step's new tokens are flattened: sequence i owns rows query_start_loc[i]:query_start_loc[i+1]
of q, k and v. Its keys and values are its cached prefix, in the paged slab behind
block_tables[i], followed by this step's own k and v rows:

    key position   0 ............. prefix_len ............. seq_len - 1
                   |<-- slab (paged) -->|<-- k, v rows (contiguous) -->|

Query row j of sequence i sits at position prefix_len + j and attends to every key at or before
it: the whole prefix, and new keys 0..j (causal within the step).

Algorithm (FlashAttention, Dao et al. 2022; FlashAttention-2, Dao 2023): one program owns a tile
of BLOCK_M query rows of one sequence and one query head, keeps them in registers and streams the
keys and values in tiles of BLOCK_N tokens through an online softmax in fp32 that carries the
running row maximum and row sum and rescales the unnormalised accumulator; the division by the row
sum happens once, in the epilogue. log2(e) is folded into the softmax scale so every exponential
is an exp2.

The two key ranges are read differently. Prefix tiles are gathered page by page through the block
table (PagedAttention, Kwon et al. 2023): a tile spans BLOCK_N / block_size pages scattered in the
slab. The step's own keys are rows of contiguous k and v, read as rectangles through tensor
descriptors (on Hopper the TMA engine copies them into shared memory asynchronously, so the loop's
loads overlap its products); q is read the same way. Prefill of a fresh prompt, the costly case,
touches the slab not at all (the store of the new K/V happens beside it).

Each range is split where masking starts: whole prefix tiles need no mask and the prefix's last
partial tile a length mask; new-key tiles before the query tile's first row need no mask, the
diagonal tiles a causal one. Nothing past the tile's last row is read.

Grid: (num_heads, num_seqs, cdiv(max_query_len, BLOCK_M)) with the query tiles in reverse order,
so the heaviest tiles (the last rows of the longest prompts see the most keys) start first and the
short ones fill the tail. Programs past a sequence's own query length return at once. One query
head per program keeps each tile a full [BLOCK_M, D] @ [D, BLOCK_N] product for every GQA ratio;
prefill is compute-bound, so the group's shared K/V tiles come from L2 rather than HBM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.paged_checks import check_paged_attention

LOG2E = 1.4426950408889634


def _set_tile_shapes(nargs: dict) -> None:
    """Autotune pre-hook: the descriptors' boxes follow the config's tile sizes."""
    nargs["q_desc"].block_shape = [nargs["BLOCK_M"], nargs["HEAD_DIM"]]
    nargs["k_desc"].block_shape = [nargs["BLOCK_N"], nargs["HEAD_DIM"]]
    nargs["v_desc"].block_shape = [nargs["BLOCK_N"], nargs["HEAD_DIM"]]


# Tile configs the autotuned variant tries (benchmarks/kernel_profile.py sweeps them); BLOCK_N
# spans whole 16-token pages.
_CUDA_CONFIGS = [
    triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n},
        num_warps=warps,
        num_stages=stages,
        pre_hook=_set_tile_shapes,
    )
    for block_m, block_n, warps, stages in [
        (128, 128, 8, 3),
        (128, 128, 4, 3),
        (128, 64, 8, 3),
        (128, 64, 8, 4),
        (128, 64, 8, 5),
        (64, 128, 4, 3),
        (64, 64, 4, 3),
    ]
]
# What the engine launches on CUDA, per head dim, from that sweep on the H200 (bf16): 128-row
# query tiles with 8 warps (two warpgroups of 64 rows each); key tiles of 128 tokens for D = 128
# and of 64 for D = 64, three stages of K/V in flight. Short prompts take 64-row tiles so that a
# tile is not mostly padding. Fixed rather than autotuned at run time, so that no request waits
# for a tuning pass and every tensor-parallel rank runs the same code.
_LONG_CONFIGS = {
    128: {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
    64: {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
}
_SHORT_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
# Half of the softmax exponentials on the FMA units (see `_online_softmax_step`); 16-bit inputs
# only, whose P is rounded far more coarsely than the cubic's error.
EXP2_SPLIT = False
# One small config for the Triton interpreter (CPU tests): a key tile spans two 16-token pages.
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


@triton.jit
def _exp2_on_fma(x):
    """2**x for x <= 0 without the special-function unit: 2**floor(x) * p(frac(x)), p a cubic
    fitted to 2**f on [0, 1) (relative error 1.7e-4, under the bf16/fp16 rounding of P), the
    power of two added to p's exponent bits. Below -126 the result is 0."""
    clamped = tl.maximum(x, -127.0)  # -inf has no floor
    j = tl.floor(clamped)
    f = clamped - j  # [0, 1)
    p = 1.0 + f * (0.6950361666798205 + f * (0.2283082455426112 + f * 0.07632546461943034))
    scaled = (p.to(tl.int32, bitcast=True) + (j.to(tl.int32) << 23)).to(tl.float32, bitcast=True)
    return tl.where(x >= -126.0, scaled, 0.0)


@triton.jit
def _online_softmax_step(acc, row_sum, row_max, qk, v, qk_scale, EXP2_SPLIT: tl.constexpr):
    """Fold one tile of raw scores qk [BLOCK_M, BLOCK_N] (masked keys -inf) and its values.

    EXP2_SPLIT computes the odd columns' exponentials with FMAs (`_exp2_on_fma`) and the even
    ones on the special-function unit, whose 16 results per clock per SM otherwise take as long
    as the tile's two matrix products (FlashAttention-4's observation)."""
    block_m: tl.constexpr = qk.shape[0]
    block_n: tl.constexpr = qk.shape[1]
    tile_max = tl.maximum(row_max, tl.max(qk, 1) * qk_scale)  # finite: see the callers
    x = qk * qk_scale - tile_max[:, None]  # [BLOCK_M, BLOCK_N], <= 0
    if EXP2_SPLIT:
        even, odd = tl.split(tl.reshape(x, [block_m, block_n // 2, 2]))
        p = tl.reshape(tl.join(tl.math.exp2(even), _exp2_on_fma(odd)), [block_m, block_n])
    else:
        p = tl.math.exp2(x)
    alpha = tl.math.exp2(row_max - tile_max)  # rescales what earlier tiles summed
    row_sum = row_sum * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    return acc, row_sum, tile_max


@triton.jit
def _attend_cached(
    acc, row_sum, row_max,
    q,
    kv_cache_ptr, block_table_ptr, kv_head,
    stride_kv, stride_block, stride_head, stride_slot,
    key_start, key_end, prefix_len, qk_scale,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, EXP2_SPLIT: tl.constexpr,
):  # fmt: skip
    """Prefix keys [key_start, key_end) from the slab; MASKED drops keys at or past prefix_len."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(key_start, key_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_prefix = offs_n < prefix_len
        # -- gather the tile's pages --
        page = tl.load(block_table_ptr + offs_n // BLOCK_SIZE, mask=in_prefix, other=0)
        token_offs = (
            page.to(tl.int64) * stride_block
            + kv_head * stride_head
            + (offs_n % BLOCK_SIZE) * stride_slot
        )  # [BLOCK_N]
        k = tl.load(
            kv_cache_ptr + token_offs[None, :] + offs_d[:, None], mask=in_prefix[None, :], other=0.0
        )  # [HEAD_DIM, BLOCK_N]
        qk = tl.dot(q, k, input_precision="ieee")  # [BLOCK_M, BLOCK_N]
        if MASKED:
            qk = tl.where(in_prefix[None, :], qk, float("-inf"))
        v = tl.load(
            kv_cache_ptr + stride_kv + token_offs[:, None] + offs_d[None, :],
            mask=in_prefix[:, None],
            other=0.0,
        )  # [BLOCK_N, HEAD_DIM]
        acc, row_sum, row_max = _online_softmax_step(
            acc, row_sum, row_max, qk, v, qk_scale, EXP2_SPLIT
        )
    return acc, row_sum, row_max


@triton.jit
def _attend_new(
    acc, row_sum, row_max,
    q, query_index,
    k_desc, v_desc, query_start, kv_col,
    key_start, key_end, qk_scale,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, EXP2_SPLIT: tl.constexpr,
):  # fmt: skip
    """This step's keys [key_start, key_end) (indices among the new tokens) from k and v rows;
    MASKED applies the causal mask key <= query."""
    for start_n in tl.range(key_start, key_end, BLOCK_N):
        k = k_desc.load([query_start + start_n, kv_col])  # [BLOCK_N, HEAD_DIM]
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_M, BLOCK_N]
        if MASKED:
            # keys past the sequence's rows lie past every row that is stored
            offs_n = start_n + tl.arange(0, BLOCK_N)
            qk = tl.where(offs_n[None, :] <= query_index[:, None], qk, float("-inf"))
        v = v_desc.load([query_start + start_n, kv_col])  # [BLOCK_N, HEAD_DIM]
        acc, row_sum, row_max = _online_softmax_step(
            acc, row_sum, row_max, qk, v, qk_scale, EXP2_SPLIT
        )
    return acc, row_sum, row_max


@triton.jit
def _kernel(
    out_ptr, stride_out_token, stride_out_head,
    q_desc, k_desc, v_desc,
    kv_cache_ptr, stride_kv, stride_block, stride_head, stride_slot,
    block_tables_ptr, stride_table,
    query_start_loc_ptr, seq_lens_ptr,
    qk_scale, query_len_bucket,
    NUM_QUERIES_PER_KV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EXP2_SPLIT: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(0)
    seq = tl.program_id(1)
    m_block = tl.num_programs(2) - 1 - tl.program_id(2)  # the longest-running tiles first
    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    first_row = m_block * BLOCK_M
    if first_row >= query_len:
        return
    prefix_len = tl.load(seq_lens_ptr + seq) - query_len
    kv_head = head // NUM_QUERIES_PER_KV
    kv_col = kv_head * HEAD_DIM

    # -- load q --
    q = q_desc.load([query_start + first_row, head * HEAD_DIM])  # [BLOCK_M, HEAD_DIM]
    query_index = first_row + tl.arange(0, BLOCK_M)  # [BLOCK_M] rows among the new tokens

    # -- online softmax over the cached prefix: every row sees all of it --
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_table
    whole_tiles_end = prefix_len // BLOCK_N * BLOCK_N
    acc, row_sum, row_max = _attend_cached(
        acc, row_sum, row_max, q,
        kv_cache_ptr, block_table_ptr, kv_head,
        stride_kv, stride_block, stride_head, stride_slot,
        0, whole_tiles_end, prefix_len, qk_scale,
        BLOCK_SIZE, HEAD_DIM, BLOCK_N, MASKED=False, EXP2_SPLIT=EXP2_SPLIT,
    )  # fmt: skip
    acc, row_sum, row_max = _attend_cached(
        acc, row_sum, row_max, q,
        kv_cache_ptr, block_table_ptr, kv_head,
        stride_kv, stride_block, stride_head, stride_slot,
        whole_tiles_end, prefix_len, prefix_len, qk_scale,
        BLOCK_SIZE, HEAD_DIM, BLOCK_N, MASKED=True, EXP2_SPLIT=EXP2_SPLIT,
    )  # fmt: skip

    # -- then the step's own keys: unmasked below the diagonal, causal on it --
    diagonal_start = first_row // BLOCK_N * BLOCK_N
    acc, row_sum, row_max = _attend_new(
        acc, row_sum, row_max, q, query_index,
        k_desc, v_desc, query_start, kv_col,
        0, diagonal_start, qk_scale,
        BLOCK_N, MASKED=False, EXP2_SPLIT=EXP2_SPLIT,
    )  # fmt: skip
    acc, row_sum, row_max = _attend_new(
        acc, row_sum, row_max, q, query_index,
        k_desc, v_desc, query_start, kv_col,
        diagonal_start, tl.minimum(first_row + BLOCK_M, query_len), qk_scale,
        BLOCK_N, MASKED=True, EXP2_SPLIT=EXP2_SPLIT,
    )  # fmt: skip

    # -- epilogue --
    acc = acc / row_sum[:, None]
    rows = (query_start + query_index).to(tl.int64)  # [BLOCK_M]
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(
        out_ptr + rows[:, None] * stride_out_token + head * stride_out_head + offs_d[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=(query_index < query_len)[:, None],
    )


_tuned_kernel = triton.autotune(
    configs=_CUDA_CONFIGS, key=["HEAD_DIM", "NUM_QUERIES_PER_KV", "query_len_bucket"]
)(_kernel)


def _launch_config(q: torch.Tensor, max_query_len: int) -> dict:
    if not q.is_cuda:
        return _INTERPRETER_CONFIG
    if max_query_len <= 64 or q.shape[-1] not in _LONG_CONFIGS:
        return _SHORT_CONFIG
    return _LONG_CONFIGS[q.shape[-1]]


def _rows(x: torch.Tensor, block_rows: int) -> TensorDescriptor:
    """x [T, heads, D] as a descriptor over its [T, heads * D] rows (copied if not so laid out)."""
    num_tokens, heads, head_dim = x.shape
    aligned = (x.data_ptr() % 16 == 0) and (x.stride(0) * x.element_size() % 16 == 0)
    if x.stride(2) != 1 or x.stride(1) != head_dim or not aligned:
        x = x.contiguous()
    return TensorDescriptor(
        x, shape=[num_tokens, heads * head_dim], strides=[x.stride(0), 1],
        block_shape=[block_rows, head_dim],
    )  # fmt: skip


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    max_query_len: int,
    autotune: bool = False,
) -> torch.Tensor:
    """Causal attention of each sequence's new rows over its paged prefix and its own K/V.

    q [T, H, D]; k, v [T, KVH, D] this step's keys and values; kv_cache [2, num_blocks, KVH,
    block_size, D] holding every sequence's cached prefix; block_tables [B, max_blocks] int32;
    query_start_loc [B + 1] int32; seq_lens [B] int32 (tokens after this step); out [T, H, D];
    max_query_len the longest run of new tokens (sizes the grid). Writes and returns out.
    `autotune` (CUDA) tries every tile config once per head dim, GQA ratio and prompt-length
    power of two instead of the fixed choice.
    """
    num_kv_heads, block_size = check_paged_attention(q, kv_cache, out, block_tables, seq_lens)
    num_tokens, num_heads, head_dim = q.shape
    for name, tensor in (("k", k), ("v", v)):
        if tuple(tensor.shape) != (num_tokens, num_kv_heads, head_dim):
            raise ValueError(
                f"{name}: expected shape {(num_tokens, num_kv_heads, head_dim)}, "
                f"got {tuple(tensor.shape)}"
            )
        if tensor.dtype != q.dtype or tensor.device != q.device:
            raise ValueError(f"{name}: dtype must match q ({q.dtype}), on q's device")
    num_seqs = seq_lens.shape[0]
    if query_start_loc.dtype != torch.int32 or tuple(query_start_loc.shape) != (num_seqs + 1,):
        raise ValueError(
            f"query_start_loc: expected int32 {(num_seqs + 1,)}, "
            f"got {query_start_loc.dtype} {tuple(query_start_loc.shape)}"
        )
    if query_start_loc.device != q.device:
        raise ValueError(f"all tensors must be on q's device ({q.device})")
    if max_query_len < 0 or max_query_len > num_tokens:
        raise ValueError(f"max_query_len: must be in [0, {num_tokens}], got {max_query_len}")
    if num_seqs == 0 or max_query_len == 0:
        return out

    def grid(meta):
        return (num_heads, num_seqs, triton.cdiv(max_query_len, meta["BLOCK_M"]))

    kernel, config = _kernel, _launch_config(q, max_query_len)
    if autotune and q.is_cuda:
        kernel, config = _tuned_kernel, {}
    block_m, block_n = config.get("BLOCK_M", 16), config.get("BLOCK_N", 16)  # tuned: pre-hook
    kernel[grid](
        out, out.stride(0), out.stride(1),
        _rows(q, block_m), _rows(k, block_n), _rows(v, block_n),
        kv_cache, kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables, block_tables.stride(0),
        query_start_loc, seq_lens,
        scale * LOG2E, max(max_query_len, 1).bit_length(),  # tiles retuned per power of two
        NUM_QUERIES_PER_KV=num_heads // num_kv_heads,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        EXP2_SPLIT=EXP2_SPLIT and q.dtype != torch.float32,
        **config,
    )  # fmt: skip
    return out
