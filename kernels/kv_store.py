"""Scatter each new token's K and V into its slot of the paged KV slab.

The slab of one layer is `[2, num_blocks, num_kv_heads, block_size, head_dim]` (PagedAttention,
Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with
PagedAttention"). Token t goes to slot `slot_mapping[t]`, that is block `slot // block_size` at
offset `slot % block_size`:

    kv_cache[0, slot // block_size, :, slot % block_size, :] = k[t]   # [KVH, D]
    kv_cache[1, slot // block_size, :, slot % block_size, :] = v[t]

One program moves one token, all of its K/V heads at once (a [KVH, D] tile each for K and V).
A negative slot marks a padding row (the unused rows of a captured CUDA graph): its program
stores nothing. Values are cast to the slab's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.paged_checks import check_kv_slab


@triton.jit
def store_slot(
    cache_ptr, stride_cache_kv, stride_cache_block, stride_cache_head, stride_cache_slot,
    slot, heads, dims, k, v, mask,
    BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    """k and v ([heads, dims] tiles) into `slot` of the slab, cast to its dtype, where `mask`."""
    tile = (
        cache_ptr
        + (slot // BLOCK_SIZE) * stride_cache_block
        + heads[:, None] * stride_cache_head
        + (slot % BLOCK_SIZE) * stride_cache_slot
        + dims[None, :]
    )  # pointers into K; V is one stride_cache_kv further
    cache_dtype = cache_ptr.dtype.element_ty
    tl.store(tile, k.to(cache_dtype), mask=mask)
    tl.store(tile + stride_cache_kv, v.to(cache_dtype), mask=mask)


@triton.jit
def _kernel(
    k_ptr, v_ptr, stride_k_token, stride_k_head, stride_v_token, stride_v_head,
    cache_ptr, stride_cache_kv, stride_cache_block, stride_cache_head, stride_cache_slot,
    slot_mapping_ptr,
    NUM_KV_HEADS, HEAD_DIM,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_HEADS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)

    # -- locate the slot --
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_HEADS)
    dims = tl.arange(0, BLOCK_D)
    # padding rows (slot < 0) store no head; the power-of-two padding of the tile stores nothing
    heads_to_store = tl.where(slot >= 0, NUM_KV_HEADS, 0)
    mask = (heads[:, None] < heads_to_store) & (dims[None, :] < HEAD_DIM)

    # -- load k and v --
    k = tl.load(
        k_ptr + token * stride_k_token + heads[:, None] * stride_k_head + dims[None, :], mask=mask
    )  # [BLOCK_HEADS, BLOCK_D]
    v = tl.load(
        v_ptr + token * stride_v_token + heads[:, None] * stride_v_head + dims[None, :], mask=mask
    )

    # -- store into the slab --
    store_slot(
        cache_ptr, stride_cache_kv, stride_cache_block, stride_cache_head, stride_cache_slot,
        slot, heads, dims, k, v, mask, BLOCK_SIZE,
    )  # fmt: skip


def store_kv(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k and v ([T, KVH, D]) into `kv_cache` ([2, NB, KVH, BS, D]) at `slot_mapping` ([T]).

    Rows whose slot is negative are skipped.
    """
    if k.shape != v.shape or k.dim() != 3:
        raise ValueError(f"k and v: expected equal [T, KVH, D] shapes, got {k.shape}, {v.shape}")
    num_tokens, num_kv_heads, head_dim = k.shape
    check_kv_slab(kv_cache, num_kv_heads, head_dim, "k")
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"slot_mapping: expected [{num_tokens}] int32/int64, "
            f"got {tuple(slot_mapping.shape)} {slot_mapping.dtype}"
        )
    if k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("k, v: head_dim must be contiguous")
    if num_tokens == 0:
        return
    _kernel[(num_tokens,)](
        k, v, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache, kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        slot_mapping,
        num_kv_heads, head_dim,
        BLOCK_SIZE=kv_cache.shape[3],
        BLOCK_HEADS=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )  # fmt: skip
