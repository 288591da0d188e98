"""The attention backend interface and the metadata every backend reads.

One step's tokens are flattened: sequence i owns rows query_start_loc[i]:query_start_loc[i+1] of
q, k and v. Its K/V history lives in the paged slab through block_tables[i]; after this step it
holds seq_lens[i] tokens, the last (query_start_loc[i+1] - query_start_loc[i]) of them new.

    positions  0 ........ seq_len - query_len ........ seq_len - 1
               |<-- cached in the slab -->|<-- new this step -->|
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor
    """[T] int64: slab slot (block_id * block_size + offset) of each new token's K/V."""
    query_start_loc: torch.Tensor
    """[B + 1] int32: prefix sums of new tokens per sequence (cu_seqlens of the queries)."""
    seq_lens: torch.Tensor
    """[B] int32: tokens each sequence holds after this step, cached and new."""
    block_tables: torch.Tensor
    """[B, max_blocks] int32: slab blocks of each sequence in order; unused entries are 0."""
    max_query_len: int
    """Longest run of new tokens: sizes kernel grids without reading the device."""
    max_seq_len: int
    """Longest sequence: sizes kernel grids without reading the device."""
    query_start_loc_host: list[int]
    """query_start_loc on the host, for the reference path's per-sequence loop."""
    seq_lens_host: list[int]
    """seq_lens on the host, likewise."""
    derived: dict[str, Any] = field(default_factory=dict)
    """Per-step values a backend derives once and reuses in every layer (index tensors, masks)."""

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)


def build_attention_metadata(
    block_tables: Sequence[Sequence[int]],
    num_computed_tokens: Sequence[int],
    num_new_tokens: Sequence[int],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Metadata for sequences that had `num_computed_tokens` cached and add `num_new_tokens`."""
    slots: list[int] = []
    starts = [0]
    seq_lens: list[int] = []
    for table, computed, new in zip(block_tables, num_computed_tokens, num_new_tokens, strict=True):
        total = computed + new
        if total > len(table) * block_size:
            raise ValueError(f"block table of {len(table)} blocks cannot hold {total} tokens")
        slots.extend(
            table[p // block_size] * block_size + p % block_size for p in range(computed, total)
        )
        starts.append(starts[-1] + new)
        seq_lens.append(total)
    width = max((len(t) for t in block_tables), default=0)
    padded = [list(t) + [0] * (width - len(t)) for t in block_tables]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device).reshape(-1, width),
        max_query_len=max(num_new_tokens, default=0),
        max_seq_len=max(seq_lens, default=0),
        query_start_loc_host=starts,
        seq_lens_host=seq_lens,
    )


class AttentionBackend:
    """Stores new K/V in their slots, then attends over each sequence's cached prefix and itself."""

    name = "base"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_stored: bool = False,
    ) -> torch.Tensor:
        """q [T, H, D], k and v [T, KVH, D], kv_cache [2, blocks, KVH, BS, D] -> [T, H, D].

        kv_stored: the caller has already written k and v into their slots (a fused prologue).
        """
        raise NotImplementedError

    def decode_qkv(
        self,
        qkv: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        rope_args: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        norm_args: dict,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor | None:
        """A decode step from the fused projection qkv [T, (H + 2 KVH) D], the attention
        prologue (QK-norm with `norm_args`, RoPE at `rope_args` = positions, cos, sin tables, the
        K/V store) included -> [T, H, D]; None where the backend has no such path (the caller
        runs the prologue, then `forward`)."""
        return None
