"""`kernels.kv_store.store_kv` against the reference's `store_kv`: bit-exact, padding untouched."""

from __future__ import annotations

import pytest
import torch

from kernels.kv_store import store_kv
from workers.attention import build_attention_metadata, torch_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_SIZE = 16


@pytest.mark.parametrize(
    "input_dtype,cache_dtype",
    [
        pytest.param(torch.float32, torch.float32, id="fp32"),
        pytest.param(torch.float16, torch.float16, id="fp16"),
        pytest.param(torch.float32, torch.float16, id="fp32-to-fp16"),  # cast on store
        pytest.param(torch.bfloat16, torch.bfloat16, id="bf16", marks=pytest.mark.gpu),
    ],
)
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 64), (3, 128)])
def test_store_kv_matches_reference(input_dtype, cache_dtype, num_kv_heads, head_dim):
    num_blocks = 12
    # three sequences: new tokens from a fresh prompt, a decode step, a chunk crossing a block edge
    order = torch.randperm(num_blocks).tolist()
    tables = [order[0:2], order[2:3], order[3:6]]
    computed, new = [0, 9, 14], [20, 1, 25]
    meta = build_attention_metadata(tables, computed, new, BLOCK_SIZE, DEVICE)
    num_tokens = sum(new)
    # padding rows (slot -1) interleaved with the real ones, as a CUDA graph's unused rows
    num_padding = 5
    rows = torch.randperm(num_tokens + num_padding, device=DEVICE)
    real_rows = rows[:num_tokens].sort().values
    slot_mapping = torch.full((num_tokens + num_padding,), -1, dtype=torch.int64, device=DEVICE)
    slot_mapping[real_rows] = meta.slot_mapping
    shape = (num_tokens + num_padding, num_kv_heads, head_dim)
    k = torch.randn(shape, dtype=input_dtype, device=DEVICE)
    v = torch.randn(shape, dtype=input_dtype, device=DEVICE)
    slab = torch.randn(
        (2, num_blocks, num_kv_heads, BLOCK_SIZE, head_dim), dtype=cache_dtype, device=DEVICE
    )
    expected = slab.clone()
    torch_ref.store_kv(k[real_rows], v[real_rows], expected, meta)

    store_kv(k, v, slab, slot_mapping)

    assert torch.equal(slab, expected)


def test_store_kv_all_padding_changes_nothing():
    slab = torch.randn((2, 4, 2, BLOCK_SIZE, 64), device=DEVICE)
    before = slab.clone()
    k = torch.randn((3, 2, 64), device=DEVICE)
    store_kv(k, k, slab, torch.full((3,), -1, dtype=torch.int64, device=DEVICE))
    assert torch.equal(slab, before)


def test_store_kv_rejects_mismatched_heads():
    slab = torch.zeros((2, 4, 2, BLOCK_SIZE, 64), device=DEVICE)
    k = torch.zeros((3, 4, 64), device=DEVICE)
    with pytest.raises(ValueError, match="kv_cache"):
        store_kv(k, k, slab, torch.zeros(3, dtype=torch.int64, device=DEVICE))
