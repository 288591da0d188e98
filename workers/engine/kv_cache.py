"""The paged KV slab.

One tensor per layer, allocated once, holding this shard's K/V heads:

    kv_cache[layer]: [2, num_blocks, num_kv_heads, block_size, head_dim]
                      K/V  block id   head          slot in block

A token at position p of a sequence lives in block block_table[p // block_size] at offset
p % block_size; its slot is block_id * block_size + offset (`slot_mapping`). One (block, head) is a
contiguous [block_size, head_dim] tile, so a kernel reads it in one burst for all the query heads
that share that K/V head.
"""

from __future__ import annotations

import torch


def allocate_kv_slab(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[torch.Tensor]:
    shape = (2, num_blocks, num_kv_heads, block_size, head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]


def kv_block_bytes(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes one block takes over all layers (K and V)."""
    element = torch.empty((), dtype=dtype).element_size()
    return num_layers * 2 * block_size * num_kv_heads * head_dim * element
