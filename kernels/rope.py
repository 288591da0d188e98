"""The attention prologue in one pass: QK-norm (optional), rotary embedding, K/V store (optional).

From each token's fused projection `qkv[t] = [q | k | v]` ([(H + 2 KVH) D]):

    q <- rms_norm(q) over all H * D features, weight q_norm     (Olmo 2's QK-norm; Llama has none)
    k <- rms_norm(k) over all KVH * D features, weight k_norm
    q, k <- x * cos + rotate_half(x) * sin, per head           (RoPE: Su et al. 2021, "RoFormer")
    kv_cache[0, slot // BS, :, slot % BS] = k;  kv_cache[1, slot // BS, :, slot % BS] = v

RoPE uses the NeoX/HF layout: rotate_half(x)[d] = -x[d + D/2] for d < D/2 and x[d - D/2] after,
so out[d] = x[d] * cos[d] + x[(d + D/2) mod D] * signed_sin[d], with sin negated on the first half;
the kernel loads each head a second time at the rolled offsets instead of shuffling registers.
cos and sin are rows of the model's fp32 tables [P, D] at the token's position. The slab store is
`kernels/kv_store.py`'s (layout `[2, num_blocks, KVH, BS, D]`, values cast to the slab's dtype, a
negative slot stores nothing).

Under tensor parallelism a rank holds some of the heads, and the norm spans every rank's: then
`qk_sum_squares` gives each token's sum of squares of this rank's q and k ([T, 2] fp32), the
caller sums those over the ranks (kernels/peer_collectives.py does both in one kernel), and the
prologue normalises with the sums it is given (and the full widths) instead of its own.

Grid (T, 2): program (t, 0) does token t's H query heads, program (t, 1) its KVH key heads and,
when storing, its keys and values into the slab. The norm spans all heads of q (or k), so a
program walks its heads in chunks of BLOCK_HEADS twice: once summing squares, once normalising,
rotating and storing (the second read of the row hits the cache).

Precision: everything is fp32 until the single rounding on store. The PyTorch path rounds the
normalised q and k to the activation dtype and rotates in that dtype with cos/sin rounded to it,
so the two agree to ~1e-6 in fp32 and to a few ulps in fp16/bf16. The stored k is the returned k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.kv_store import store_slot
from kernels.launch import pdl_options, wait_for_previous
from kernels.paged_checks import check_kv_slab

_TILE_ELEMENTS = 2048  # heads per chunk: as many as fit this many elements


@triton.jit
def _head_squares(row, head, num_heads, dims, HEAD_DIM: tl.constexpr):
    """The squares (fp32) of the heads `head` ([BLOCK_HEADS]) of `row`, zero past num_heads."""
    mask = (head[:, None] < num_heads) & (dims < HEAD_DIM)[None, :]
    x = tl.load(row + head[:, None] * HEAD_DIM + dims[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    return x * x


@triton.jit
def sum_squares(row, num_heads, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_HEADS: tl.constexpr):  # fmt: skip
    """The sum of squares of `num_heads` heads of HEAD_DIM values from `row`, in fp32."""
    heads = tl.arange(0, BLOCK_HEADS)
    dims = tl.arange(0, BLOCK_D)
    squares = tl.zeros([BLOCK_HEADS, BLOCK_D], dtype=tl.float32)
    for head_start in range(0, num_heads, BLOCK_HEADS):
        squares += _head_squares(row, head_start + heads, num_heads, dims, HEAD_DIM)
    return tl.sum(tl.sum(squares, axis=1), axis=0)


@triton.jit
def sum_squares_qk(q_row, k_row, num_heads, num_kv_heads, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_HEADS: tl.constexpr):  # fmt: skip
    """`sum_squares` of q's heads and of k's, each summed in the same order as there, with a
    chunk of each loaded in the same step (both in flight at once)."""
    heads = tl.arange(0, BLOCK_HEADS)
    dims = tl.arange(0, BLOCK_D)
    q_squares = tl.zeros([BLOCK_HEADS, BLOCK_D], dtype=tl.float32)
    k_squares = tl.zeros([BLOCK_HEADS, BLOCK_D], dtype=tl.float32)
    for head_start in range(0, tl.maximum(num_heads, num_kv_heads), BLOCK_HEADS):
        q_squares += _head_squares(q_row, head_start + heads, num_heads, dims, HEAD_DIM)
        k_squares += _head_squares(k_row, head_start + heads, num_kv_heads, dims, HEAD_DIM)
    q_total = tl.sum(tl.sum(q_squares, axis=1), axis=0)
    return q_total, tl.sum(tl.sum(k_squares, axis=1), axis=0)


@triton.jit
def rope_row(cos_ptr, sin_ptr, row_offset, dims, HEAD_DIM: tl.constexpr):
    """One position's cos and signed sin (rows of the tables at `row_offset`; zero for dims past
    HEAD_DIM) and the rolled dims: out[d] = x[d] * cos[d] + x[rolled[d]] * signed_sin[d]."""
    dim_mask = dims < HEAD_DIM
    cos = tl.load(cos_ptr + row_offset + dims, mask=dim_mask, other=0.0)
    sin = tl.load(sin_ptr + row_offset + dims, mask=dim_mask, other=0.0)
    return cos, tl.where(dims < HEAD_DIM // 2, -sin, sin), (dims + HEAD_DIM // 2) % HEAD_DIM


@triton.jit
def norm_rotate(row, offsets, rolled_offsets, mask, norm_ptr, inv_rms, cos, signed_sin,
                QK_NORM: tl.constexpr):  # fmt: skip
    """Heads of `row` at `offsets` ([heads, dims]) in fp32: with QK_NORM times inv_rms and the
    norm weight at the same offsets, then rotated (their rolled copies read at
    `rolled_offsets`); zero where not `mask`."""
    x = tl.load(row + offsets, mask=mask, other=0.0)
    x_rolled = tl.load(row + rolled_offsets, mask=mask, other=0.0)
    weight, weight_rolled = norm_weights(norm_ptr, offsets, rolled_offsets, mask, QK_NORM)
    return rotate(x, x_rolled, weight, weight_rolled, inv_rms, cos, signed_sin, QK_NORM)


@triton.jit
def norm_weights(norm_ptr, offsets, rolled_offsets, mask, QK_NORM: tl.constexpr):
    """The QK-norm's weight at `offsets` and at `rolled_offsets` in fp32 (1.0 without QK_NORM)."""
    if QK_NORM:
        weight = tl.load(norm_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        weight_rolled = tl.load(norm_ptr + rolled_offsets, mask=mask, other=0.0).to(tl.float32)
    else:
        weight = 1.0
        weight_rolled = 1.0
    return weight, weight_rolled


@triton.jit
def rotate(x, x_rolled, weight, weight_rolled, inv_rms, cos, signed_sin, QK_NORM: tl.constexpr):
    """`norm_rotate` of heads already loaded (x and their rolled copies) with their norm weights."""
    x = x.to(tl.float32)
    x_rolled = x_rolled.to(tl.float32)
    if QK_NORM:
        x = x * inv_rms * weight
        x_rolled = x_rolled * inv_rms * weight_rolled
    return x * cos[None, :] + x_rolled * signed_sin[None, :]


@triton.jit
def _squares_kernel(
    qkv_ptr, stride_qkv_token, squares_ptr, k_scale,
    NUM_HEADS, NUM_KV_HEADS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HEADS: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    is_k = tl.program_id(1) == 1
    first_head = tl.where(is_k, NUM_HEADS, 0)
    num_heads = tl.where(is_k, NUM_KV_HEADS, NUM_HEADS)
    row = qkv_ptr + token * stride_qkv_token + first_head * HEAD_DIM
    total = sum_squares(row, num_heads, HEAD_DIM, BLOCK_D, BLOCK_HEADS)
    tl.store(squares_ptr + token * 2 + tl.program_id(1), total * tl.where(is_k, k_scale, 1.0))


@triton.jit
def _kernel(
    qkv_ptr, stride_qkv_token,
    qk_ptr, stride_qk_token,
    q_norm_ptr, k_norm_ptr, eps,
    squares_ptr, Q_WIDTH, K_WIDTH,
    positions_ptr, cos_ptr, sin_ptr, stride_table_position,
    cache_ptr, stride_cache_kv, stride_cache_block, stride_cache_head, stride_cache_slot,
    slot_mapping_ptr,
    NUM_HEADS, NUM_KV_HEADS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HEADS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    QK_NORM: tl.constexpr, SQUARES_GIVEN: tl.constexpr, STORE_KV: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    wait_for_previous(PDL)
    token = tl.program_id(0).to(tl.int64)
    is_k = tl.program_id(1) == 1  # else q
    # this program's heads: the first NUM_HEADS (q) or the next NUM_KV_HEADS (k) of the row
    first_head = tl.where(is_k, NUM_HEADS, 0)
    num_heads = tl.where(is_k, NUM_KV_HEADS, NUM_HEADS)
    row = qkv_ptr + token * stride_qkv_token + first_head * HEAD_DIM
    heads = tl.arange(0, BLOCK_HEADS)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM

    # -- sum of squares over all heads of the part (or over every rank's, given) --
    norm_ptr = q_norm_ptr  # the part's norm weight
    inv_rms = 1.0
    if QK_NORM:
        if is_k:
            norm_ptr = k_norm_ptr
        if SQUARES_GIVEN:
            total = tl.load(squares_ptr + token * 2 + tl.program_id(1))
            inv_rms = tl.rsqrt(total / tl.where(is_k, K_WIDTH, Q_WIDTH) + eps)
        else:
            total = sum_squares(row, num_heads, HEAD_DIM, BLOCK_D, BLOCK_HEADS)
            inv_rms = tl.rsqrt(total / (num_heads * HEAD_DIM) + eps)

    # -- cos and signed sin at the token's position --
    position = tl.load(positions_ptr + token).to(tl.int64)
    cos, signed_sin, rolled = rope_row(
        cos_ptr, sin_ptr, position * stride_table_position, dims, HEAD_DIM
    )

    if STORE_KV:
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        # only k programs store, and a padding row (slot < 0) stores nothing
        store_heads = tl.where(is_k & (slot >= 0), NUM_KV_HEADS, 0)

    for head_start in range(0, num_heads, BLOCK_HEADS):
        head = head_start + heads
        mask = (head[:, None] < num_heads) & dim_mask[None, :]
        offsets = head[:, None] * HEAD_DIM + dims[None, :]  # [BLOCK_HEADS, BLOCK_D]
        rolled_offsets = head[:, None] * HEAD_DIM + rolled[None, :]

        # -- QK-norm (one weight vector for q, another for k), rotate, store q or k --
        out = norm_rotate(
            row, offsets, rolled_offsets, mask, norm_ptr, inv_rms, cos, signed_sin, QK_NORM
        ).to(qk_ptr.dtype.element_ty)
        out_offsets = (first_head + head)[:, None] * HEAD_DIM + dims[None, :]
        tl.store(qk_ptr + token * stride_qk_token + out_offsets, out, mask=mask)

        # -- k and v into the slab --
        if STORE_KV:
            store_mask = (head[:, None] < store_heads) & dim_mask[None, :]
            v = tl.load(row + NUM_KV_HEADS * HEAD_DIM + offsets, mask=store_mask)
            store_slot(
                cache_ptr, stride_cache_kv, stride_cache_block, stride_cache_head,
                stride_cache_slot, slot, head, dims, out, v, store_mask, BLOCK_SIZE,
            )  # fmt: skip


def rotary_qkv(
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    kv_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    qk_squares: torch.Tensor | None = None,
    norm_widths: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [T, H, D], k [T, KVH, D] and v [T, KVH, D] from qkv [T, (H + 2 KVH) D].

    q and k are rotated at `positions` ([T]) with cos_cache, sin_cache ([P, D], fp32), after the
    full-width QK-norm when q_norm_weight ([H * D]) and k_norm_weight ([KVH * D]) are given. v is a
    view of qkv. With kv_cache ([2, NB, KVH, BS, D]), k and v are also stored at `slot_mapping`
    ([T]), negative slots skipped.

    A sharded norm passes `qk_squares` ([T, 2] fp32: each token's sum of squares of q and of k
    over every rank's heads) and `norm_widths` (q's and k's full widths), used instead of this
    rank's own sums.
    """
    head_dim = cos_cache.shape[1]
    qk_norm, squares_given, widths = check_prologue(
        qkv, num_heads, num_kv_heads, positions, cos_cache, sin_cache,
        q_norm_weight, k_norm_weight, qk_squares, norm_widths, kv_cache, slot_mapping,
    )  # fmt: skip
    num_tokens = qkv.shape[0]
    store_kv = kv_cache is not None
    qk = torch.empty(
        (num_tokens, num_heads + num_kv_heads, head_dim), dtype=qkv.dtype, device=qkv.device
    )
    q, k = qk.split([num_heads, num_kv_heads], dim=1)
    v = qkv[:, (num_heads + num_kv_heads) * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    if num_tokens == 0:
        return q, k, v
    block_d, block_heads = qk_tiles(num_heads, num_kv_heads, head_dim)
    _kernel[(num_tokens, 2)](
        qkv, qkv.stride(0),
        qk, qk.stride(0),
        q_norm_weight, k_norm_weight, eps,
        qk_squares, *widths,
        positions, cos_cache, sin_cache, cos_cache.stride(0),
        kv_cache,
        *(kv_cache.stride()[:4] if store_kv else (0, 0, 0, 0)),
        slot_mapping,
        num_heads, num_kv_heads,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_HEADS=block_heads,
        BLOCK_SIZE=kv_cache.shape[3] if store_kv else 1,
        QK_NORM=qk_norm, SQUARES_GIVEN=squares_given, STORE_KV=store_kv,
        **pdl_options(qkv.device),
    )  # fmt: skip
    return q, k, v


def check_prologue(
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    qk_squares: torch.Tensor | None,
    norm_widths: tuple[int, int] | None,
    kv_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
) -> tuple[bool, bool, tuple[int, int]]:
    """Clear errors for the prologue's inputs (see `rotary_qkv`); (QK-norm, sums given, the
    norm widths the kernels take: `norm_widths` with the sums, else unused ones)."""
    head_dim = cos_cache.shape[1]
    check_qkv(qkv, num_heads, num_kv_heads, head_dim)
    if head_dim % 2:
        raise ValueError(f"qkv: RoPE needs an even head dim, got {head_dim}")
    num_tokens = qkv.shape[0]
    if (
        sin_cache.shape != cos_cache.shape
        or cos_cache.dtype != torch.float32
        or sin_cache.dtype != torch.float32
        or not (cos_cache.is_contiguous() and sin_cache.is_contiguous())
    ):
        raise ValueError("cos_cache, sin_cache: expected contiguous fp32 tables of equal shape")
    if positions.shape != (num_tokens,):
        raise ValueError(f"positions: expected [{num_tokens}], got {tuple(positions.shape)}")
    qk_norm = q_norm_weight is not None
    if qk_norm and (
        k_norm_weight is None
        or q_norm_weight.shape != (num_heads * head_dim,)
        or k_norm_weight.shape != (num_kv_heads * head_dim,)
    ):
        raise ValueError(
            f"q_norm_weight, k_norm_weight: expected [{num_heads * head_dim}] and "
            f"[{num_kv_heads * head_dim}] together"
        )
    if not qk_norm and k_norm_weight is not None:
        raise ValueError("k_norm_weight without q_norm_weight")
    squares_given = qk_squares is not None
    if squares_given and (
        not qk_norm
        or norm_widths is None
        or qk_squares.shape != (num_tokens, 2)
        or qk_squares.dtype != torch.float32
        or not qk_squares.is_contiguous()
    ):
        raise ValueError(
            f"qk_squares: expected contiguous fp32 [{num_tokens}, 2] with the norm weights and "
            "norm_widths"
        )
    if kv_cache is not None:
        check_kv_slab(kv_cache, num_kv_heads, head_dim, "qkv")
        if slot_mapping is None or slot_mapping.shape != (num_tokens,):
            raise ValueError(f"slot_mapping: expected [{num_tokens}] with kv_cache")
    return qk_norm, squares_given, norm_widths if squares_given else (1, 1)


def check_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """A clear error unless qkv is a contiguous [T, (H + 2 KVH) D]."""
    if qkv.dim() != 2 or not qkv.is_contiguous():
        raise ValueError(f"qkv: expected contiguous [T, (H + 2 KVH) D], got {tuple(qkv.shape)}")
    if qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"qkv: width {qkv.shape[1]} is not ({num_heads} + 2 * {num_kv_heads}) "
                         f"heads of dim {head_dim}")  # fmt: skip


def qk_tiles(num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(head_dim)
    block_heads = min(
        triton.next_power_of_2(max(num_heads, num_kv_heads)), max(_TILE_ELEMENTS // block_d, 1)
    )
    return block_d, block_heads


def qk_sum_squares(
    qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, k_scale: float = 1.0
) -> torch.Tensor:
    """Each token's sum of squares of its q heads and of its k heads (the latter times k_scale),
    in fp32, as the prologue's own norm sums them: [T, 2] from qkv [T, (H + 2 KVH) D]."""
    check_qkv(qkv, num_heads, num_kv_heads, head_dim)
    squares = torch.empty(qkv.shape[0], 2, dtype=torch.float32, device=qkv.device)
    if qkv.shape[0] == 0:
        return squares
    block_d, block_heads = qk_tiles(num_heads, num_kv_heads, head_dim)
    _squares_kernel[(qkv.shape[0], 2)](
        qkv, qkv.stride(0), squares, k_scale,
        num_heads, num_kv_heads,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_HEADS=block_heads,
    )  # fmt: skip
    return squares
