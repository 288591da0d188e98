"""The reference attention: plain PyTorch over the paged KV slab, in fp32.

It is the definition every faster backend is tested against, so it favours obviousness over speed:
prompt chunks attend one sequence at a time; one-token (decode) rows attend together, their
blocks gathered into one padded tensor and the padding masked, because a per-sequence loop over a
large decode batch would dominate a CPU step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.attention.base import AttentionBackend, AttentionMetadata


def store_kv(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
) -> None:
    """Write each new token's K/V ([T, KVH, D]) into its slot of the slab."""
    if "store" not in meta.derived:
        block_size = kv_cache.shape[3]
        meta.derived["store"] = (meta.slot_mapping // block_size, meta.slot_mapping % block_size)
    blocks, offsets = meta.derived["store"]
    kv_cache[0, blocks, :, offsets] = k.to(kv_cache.dtype)
    kv_cache[1, blocks, :, offsets] = v.to(kv_cache.dtype)


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """One sequence's K and V in order: [2, KVH, seq_len, D]."""
    block_size = kv_cache.shape[3]
    num_blocks = -(-seq_len // block_size)
    blocks = kv_cache[:, block_table[:num_blocks].long()]  # [2, n, KVH, BS, D]
    two, n, kv_heads, _, head_dim = blocks.shape
    return blocks.permute(0, 2, 1, 3, 4).reshape(two, kv_heads, n * block_size, head_dim)[
        :, :, :seq_len
    ]


class TorchRefBackend(AttentionBackend):
    name = "torch_ref"

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
        if not kv_stored:
            store_kv(k, v, kv_cache, meta)
        num_heads, kv_heads = q.shape[1], kv_cache.shape[2]
        out = torch.empty_like(q)
        starts = meta.query_start_loc_host
        if "decode" not in meta.derived:
            meta.derived["decode"] = _decode_plan(meta, kv_cache.shape[3], q.device)
        if meta.derived["decode"] is not None:
            self._decode(q, kv_cache, meta.derived["decode"], out, scale)
        for i, seq_len in enumerate(meta.seq_lens_host):
            start, end = starts[i], starts[i + 1]
            query_len = end - start
            if query_len <= 1:
                continue
            keys, values = gather_kv(kv_cache, meta.block_tables[i], seq_len).float()
            keys = keys.repeat_interleave(num_heads // kv_heads, dim=0)  # [H, S, D]
            values = values.repeat_interleave(num_heads // kv_heads, dim=0)
            queries = q[start:end].float().transpose(0, 1)  # [H, L, D]
            scores = queries @ keys.transpose(1, 2) * scale  # [H, L, S]
            # query j sits at position seq_len - query_len + j and sees keys up to it
            query_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)
            future = torch.arange(seq_len, device=q.device)[None, :] > query_pos[:, None]
            probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
            out[start:end] = (probs @ values).transpose(0, 1).to(q.dtype)  # [L, H, D]
        return out

    def _decode(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        plan: _DecodePlan,
        out: torch.Tensor,
        scale: float,
    ) -> None:
        """Rows with one query token: all sequences at once over their padded, gathered blocks."""
        num_heads, kv_heads, _, head_dim = q.shape[1], *kv_cache.shape[2:]
        batch = plan.rows.shape[0]
        kv = kv_cache[:, plan.block_tables]  # [2, B, nb, KVH, BS, D]
        kv = kv.permute(0, 1, 3, 2, 4, 5).reshape(2, batch, kv_heads, -1, head_dim).float()
        queries = q[plan.rows].float().view(batch, kv_heads, -1, head_dim)  # [B, KVH, G, D]
        # softmax(q k^T * scale, masked past each length) v, the G query heads of a KV head together
        attended = F.scaled_dot_product_attention(
            queries, kv[0], kv[1], attn_mask=plan.valid, scale=scale
        )  # [B, KVH, G, D]
        out[plan.rows] = attended.reshape(batch, num_heads, head_dim).to(out.dtype)


@dataclass
class _DecodePlan:
    rows: torch.Tensor
    """[B] rows of q that are one-token sequences."""
    block_tables: torch.Tensor
    """[B, nb] their blocks, padded to the longest."""
    valid: torch.Tensor
    """[B, 1, 1, nb * block_size] True up to each sequence's length, False on the padding."""


def _decode_plan(
    meta: AttentionMetadata, block_size: int, device: torch.device
) -> _DecodePlan | None:
    starts = meta.query_start_loc_host
    seqs = [i for i in range(meta.num_seqs) if starts[i + 1] - starts[i] == 1]
    if not seqs:
        return None
    seq_lens = [meta.seq_lens_host[i] for i in seqs]
    num_blocks = -(-max(seq_lens) // block_size)
    index = torch.tensor(seqs, device=device)
    lengths = torch.tensor(seq_lens, device=device)
    valid = torch.arange(num_blocks * block_size, device=device)[None, :] < lengths[:, None]
    return _DecodePlan(
        rows=torch.tensor([starts[i] for i in seqs], device=device),
        block_tables=meta.block_tables[index, :num_blocks].long(),
        valid=valid[:, None, None, :],
    )
