"""The reference attention against PyTorch's SDPA on contiguous tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.attention import build_attention_metadata
from workers.attention.torch_ref import TorchRefBackend
from workers.engine.kv_cache import allocate_kv_slab


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2)])
def test_chunks_over_cached_prefix_match_sdpa(num_heads, num_kv_heads):
    block_size, head_dim, num_blocks = 4, 8, 40
    generator = torch.Generator().manual_seed(0)
    lengths = [1, 7, 13]  # total tokens per sequence
    cached = [0, 4, 6]  # of which already in the slab (6 ends mid-block)
    slab = allocate_kv_slab(
        1, num_blocks, block_size, num_kv_heads, head_dim, torch.float32, "cpu"
    )[0]
    blocks = torch.randperm(num_blocks, generator=generator).tolist()
    tables = [[blocks.pop() for _ in range(-(-n // block_size))] for n in lengths]
    full = [
        (
            torch.randn(n, num_heads, head_dim, generator=generator),
            torch.randn(n, num_kv_heads, head_dim, generator=generator),
            torch.randn(n, num_kv_heads, head_dim, generator=generator),
        )
        for n in lengths
    ]
    backend = TorchRefBackend()
    scale = head_dim**-0.5
    # first the cached part of each sequence, then the rest, as two steps
    for step in range(2):
        spans = [(0, c) if step == 0 else (c, n) for c, n in zip(cached, lengths, strict=True)]
        meta = build_attention_metadata(
            tables, [s for s, _ in spans], [e - s for s, e in spans], block_size
        )
        q = torch.cat([f[0][s:e] for f, (s, e) in zip(full, spans, strict=True)])
        k = torch.cat([f[1][s:e] for f, (s, e) in zip(full, spans, strict=True)])
        v = torch.cat([f[2][s:e] for f, (s, e) in zip(full, spans, strict=True)])
        out = backend.forward(q, k, v, slab, meta, scale)
    rows = 0
    for (q, k, v), c, n in zip(full, cached, lengths, strict=True):
        group = num_heads // num_kv_heads
        expected = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.repeat_interleave(group, 1).transpose(0, 1),
            v.repeat_interleave(group, 1).transpose(0, 1),
            is_causal=False,
            attn_mask=torch.ones(n, n, dtype=torch.bool).tril(),
        ).transpose(0, 1)[c:]
        torch.testing.assert_close(out[rows : rows + n - c], expected, atol=1e-5, rtol=1e-5)
        rows += n - c


def test_metadata_refuses_a_table_too_short():
    with pytest.raises(ValueError, match="cannot hold 9 tokens"):
        build_attention_metadata([[0, 1]], [4], [5], block_size=4)
