"""The varlen causal prefill kernel against the torch_ref backend over the same paged slab.

On CPU the kernel runs through the Triton interpreter (fp32 and fp16); on CUDA bf16 runs too.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kernels import prefill_attention as prefill_module
from kernels.prefill_attention import prefill_attention
from workers.attention.base import build_attention_metadata
from workers.attention.torch_ref import TorchRefBackend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_SIZE = 16
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}

# (cached tokens, new tokens) per sequence
MIXED_BATCH = [
    (0, 37),  # no cached prefix, ragged length
    (45, 7),  # prefix ends mid-block, chunk crosses a block boundary
    (32, 1),  # one token after a block-aligned prefix: its own key starts a new key tile
    (131, 4),  # long prefix, short chunk
    (0, 1),  # a one-token sequence alone
    (33, 70),  # long chunk over several query tiles; a tile's last row starts a key tile
]


def _run_case(
    seqs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
) -> None:
    computed = [c for c, _ in seqs]
    new = [n for _, n in seqs]
    blocks_per_seq = [-(-(c + n) // BLOCK_SIZE) for c, n in seqs]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks hold noise nobody may read
    scattered = torch.randperm(num_blocks).tolist()
    tables = []
    for count in blocks_per_seq:
        tables.append(scattered[:count])
        scattered = scattered[count:]
    meta = build_attention_metadata(tables, computed, new, BLOCK_SIZE, DEVICE)
    num_tokens = sum(new)

    # the whole slab is noise; the new tokens' slots hold other noise than their k and v rows,
    # so a kernel reading the new keys from the slab instead of k and v fails
    kv_cache = torch.randn(
        2, num_blocks, num_kv_heads, BLOCK_SIZE, head_dim, device=DEVICE, dtype=dtype
    )
    new_kv = torch.randn(2, num_tokens, num_kv_heads + 1, head_dim, device=DEVICE, dtype=dtype)
    new_k, new_v = new_kv[0, :, 1:], new_kv[1, :, 1:]  # [T, KVH, D] strided views
    # q is a strided view, as it is when split from a fused qkv projection
    qkv = torch.randn(num_tokens, num_heads + 2, head_dim, device=DEVICE, dtype=dtype)
    q = qkv[:, :num_heads]  # [T, H, D]
    out = torch.full_like(q, float("nan"))
    scale = head_dim**-0.5

    result = prefill_attention(
        q,
        new_k,
        new_v,
        kv_cache,
        meta.block_tables,
        meta.query_start_loc,
        meta.seq_lens,
        scale,
        out,
        meta.max_query_len,
    )

    # the reference stores k and v into its copy of the slab first
    slab = kv_cache.float()
    expected = TorchRefBackend().forward(q.float(), new_k.float(), new_v.float(), slab, meta, scale)
    assert result is out
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "dtype"),
    [
        (2, 2, 64, torch.float32),
        (8, 1, 128, torch.float32),
        (4, 1, 64, torch.float16),
        (2, 2, 128, torch.float16),
        pytest.param(8, 2, 128, torch.bfloat16, marks=pytest.mark.gpu),
        pytest.param(8, 1, 64, torch.bfloat16, marks=pytest.mark.gpu),
    ],
)
def test_mixed_batch_matches_reference(num_heads, num_kv_heads, head_dim, dtype):
    _run_case(MIXED_BATCH, num_heads, num_kv_heads, head_dim, dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA autotunes the tile shapes")
@pytest.mark.parametrize(("block_m", "block_n"), [(16, 64), (64, 16)])
def test_other_tile_shapes_match_reference(monkeypatch, block_m, block_n):
    # key tiles of four pages and of one; query tiles narrower and wider than key tiles
    config = {**prefill_module._INTERPRETER_CONFIG, "BLOCK_M": block_m, "BLOCK_N": block_n}
    monkeypatch.setattr(prefill_module, "_INTERPRETER_CONFIG", config)
    _run_case([(0, 33), (49, 18), (7, 1)], 4, 2, 64, torch.float32)


def test_rejects_bad_inputs():
    q = torch.zeros(4, 4, 64)
    k = v = torch.zeros(4, 2, 64)
    kv_cache = torch.zeros(2, 2, 2, BLOCK_SIZE, 64)
    tables = torch.zeros(1, 2, dtype=torch.int32)
    starts = torch.tensor([0, 4], dtype=torch.int32)
    seq_lens = torch.tensor([4], dtype=torch.int32)

    def call(q=q, k=k, v=v, kv_cache=kv_cache, seq_lens=seq_lens):
        prefill_attention(q, k, v, kv_cache, tables, starts, seq_lens, 1.0, q.clone(), 4)

    with pytest.raises(ValueError, match="seq_lens"):
        call(seq_lens=seq_lens.long())
    with pytest.raises(ValueError, match="KV heads"):
        call(q=q[:, :3])
    with pytest.raises(ValueError, match="kv_cache"):
        call(kv_cache=kv_cache.half())
    with pytest.raises(ValueError, match="k: expected shape"):
        call(k=k[:3])
    with pytest.raises(ValueError, match="dtype must match"):
        call(v=v.half())


@pytest.mark.parametrize(
    "dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
)
def test_exponentials_split_onto_the_fma_units(monkeypatch, dtype):
    monkeypatch.setattr(prefill_module, "EXP2_SPLIT", True)
    _run_case(MIXED_BATCH, 8, 2, 128, dtype)


@triton.jit
def _exp2_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(out_ptr + offsets, prefill_module._exp2_on_fma(tl.load(x_ptr + offsets)))


def test_exp2_on_fma_units_within_its_stated_error():
    x = torch.cat(
        [-torch.rand(1000, device=DEVICE) * 130, torch.tensor([0.0, -126.0, -127.5], device=DEVICE)]
    )
    x = torch.cat([x, torch.full((1024 - x.numel(),), float("-inf"), device=DEVICE)])
    out = torch.full_like(x, float("nan"))
    _exp2_kernel[(1,)](x, out, N=1024)
    want = torch.exp2(x.double())
    normal = x >= -126
    relative = ((out.double() - want) / want)[normal].abs().max()
    assert relative < 1.7e-4
    assert torch.equal(out[~normal], torch.zeros_like(out[~normal]))  # -inf and below -126: 0
