"""The GPU attention backend: our Triton kernels over the paged slab.

Each layer stores the step's new K/V into their slots (unless a fused prologue already has), then
attends. A step whose sequences all have one new token runs the split-K decode kernel; any other
step runs the varlen prefill kernel over every sequence (it handles one-token sequences too), so
mixed batches are correct while the common steps take the kernel made for them. A decode step
from a fused QKV projection (`decode_qkv`) runs the attention prologue inside the decode kernel:
one launch from the projection to the attention output. Each KV head's programs redo the
full-width QK-norm's sums over the token's row, so that path is taken for batches of up to
`PROLOGUE_MAX_BATCH` sequences (AFS_DECODE_PROLOGUE_MAX_BATCH, default 16; 0 turns it off),
where a launch saved should outweigh the rows read again from L2. On the H200 it measured as fast
or faster than the prologue apart at batch 1 (1B, 7B, 7B at tp = 2).
"""

from __future__ import annotations

import os

import torch

from kernels.decode_attention import decode_attention, decode_attention_qkv
from kernels.kv_store import store_kv
from kernels.prefill_attention import prefill_attention
from workers.attention.base import AttentionBackend, AttentionMetadata

PROLOGUE_MAX_BATCH = int(os.environ.get("AFS_DECODE_PROLOGUE_MAX_BATCH", "16"))


class TritonBackend(AttentionBackend):
    name = "triton"
    supports_padded_decode = True
    """Decode rows with slot -1 and length 0 (padding) store nothing and attend to nothing."""

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
        # q: [T, H, D]; k, v: [T, KVH, D]; kv_cache: [2, blocks, KVH, block_size, D]
        if not kv_stored:
            store_kv(k, v, kv_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        if meta.max_query_len == 1:  # one row per sequence: rows are sequences, in order
            return decode_attention(q, kv_cache, meta.block_tables, meta.seq_lens, scale, out)
        return prefill_attention(
            q,
            k,
            v,
            kv_cache,
            meta.block_tables,
            meta.query_start_loc,
            meta.seq_lens,
            scale,
            out,
            meta.max_query_len,
        )

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
        """A decode step (one new token a sequence) of at most PROLOGUE_MAX_BATCH sequences: the
        prologue and attention in one kernel; None for any other step."""
        if meta.max_query_len != 1 or qkv.shape[0] > PROLOGUE_MAX_BATCH:
            return None
        positions, cos_cache, sin_cache = rope_args
        head_dim = cos_cache.shape[1]
        out = torch.empty(qkv.shape[0], num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
        return decode_attention_qkv(
            qkv, num_heads, num_kv_heads, positions, cos_cache, sin_cache, kv_cache,
            meta.slot_mapping, meta.block_tables, meta.seq_lens, scale, out, **norm_args,
        )  # fmt: skip
