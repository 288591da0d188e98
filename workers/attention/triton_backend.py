"""The GPU attention backend: our Triton kernels over the paged slab.

Each layer stores the step's new K/V into their slots (unless a fused prologue already has), then
attends. A step whose sequences all have one new token runs the split-K decode kernel; any other
step runs the varlen prefill kernel over every sequence (it handles one-token sequences too), so
mixed batches are correct while the common steps take the kernel made for them.
"""

from __future__ import annotations

import torch

from kernels.decode_attention import decode_attention
from kernels.kv_store import store_kv
from kernels.prefill_attention import prefill_attention
from workers.attention.base import AttentionBackend, AttentionMetadata


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
