"""`kernels.decode_attention` against plain fp32 PyTorch over the same paged slab.

Tolerances (max abs error, outputs are O(1)): fp32 1e-4, fp16 2e-3, bf16 2e-2 (GPU only: the
interpreter's bf16 `tl.dot` is wrong). Outputs are NaN-poisoned before each run, so a row the
kernel never writes fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels.decode_attention import choose_num_splits, decode_attention
from kernels.kv_store import store_kv
from workers.attention import build_attention_metadata, get_backend
from workers.attention.torch_ref import gather_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_SIZE = 16
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu),
]
# one token, mid-block, one full block, one past a block edge, long and ending mid-block
RAGGED_LENGTHS = [1, 15, 16, 17, 133]


def _paged_inputs(seq_lens, num_heads, num_kv_heads, head_dim, dtype, spare_blocks=3):
    """q, a random slab whose blocks are handed out in a random order, block tables, lengths."""
    blocks_per_seq = [math.ceil(n / BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    order = torch.randperm(num_blocks).tolist()
    width = max(blocks_per_seq)
    tables = torch.zeros((len(seq_lens), width), dtype=torch.int32)  # unused entries 0
    for i, count in enumerate(blocks_per_seq):
        tables[i, :count] = torch.tensor([order.pop() for _ in range(count)])
    slab = torch.randn((2, num_blocks, num_kv_heads, BLOCK_SIZE, head_dim), dtype=dtype)
    q = torch.randn((len(seq_lens), num_heads, head_dim), dtype=dtype)
    lengths = torch.tensor(seq_lens, dtype=torch.int32)
    return q.to(DEVICE), slab.to(DEVICE), tables.to(DEVICE), lengths.to(DEVICE)


def _reference(q, slab, tables, seq_lens, scale):
    """softmax(scale q K^T) V per sequence, fp32, each query head on its KV head."""
    num_heads, num_kv_heads = q.shape[1], slab.shape[2]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for i, seq_len in enumerate(seq_lens.tolist()):
        keys, values = gather_kv(slab, tables[i], seq_len).float()  # [KVH, S, D] each
        keys = keys.repeat_interleave(num_heads // num_kv_heads, dim=0)  # [H, S, D]
        values = values.repeat_interleave(num_heads // num_kv_heads, dim=0)
        scores = torch.einsum("hd,hsd->hs", q[i].float(), keys) * scale  # [H, S]
        out[i] = torch.einsum("hs,hsd->hd", scores.softmax(dim=-1), values)
    return out


def _run(q, slab, tables, lengths, num_splits=None):
    out = torch.full_like(q, float("nan"))
    scale = q.shape[-1] ** -0.5
    result = decode_attention(q, slab, tables, lengths, scale, out, num_splits=num_splits)
    assert result is out
    return out, _reference(q, slab, tables, lengths, scale)


def _assert_close(got, want, dtype):
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim",
    [(2, 2, 64), (8, 2, 128), (8, 1, 64)],
    ids=["mha-d64", "gqa4-d128", "gqa8-d64"],
)
def test_ragged_batch_matches_reference(dtype, num_heads, num_kv_heads, head_dim):
    q, slab, tables, lengths = _paged_inputs(
        RAGGED_LENGTHS, num_heads, num_kv_heads, head_dim, dtype
    )
    out, want = _run(q, slab, tables, lengths)
    _assert_close(out, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 3, 16], ids=lambda n: f"splits{n}")
def test_num_splits_matches_reference(dtype, num_splits):
    # 9 blocks for the long sequence: 3 splits end mid-sequence, 16 leaves splits empty
    q, slab, tables, lengths = _paged_inputs([140, 1, 33], 4, 1, 128, dtype)
    out, want = _run(q, slab, tables, lengths, num_splits=num_splits)
    _assert_close(out, want, dtype)


@pytest.mark.parametrize("num_splits", [3, 16], ids=lambda n: f"splits{n}")
def test_the_last_split_merges_and_calls_repeat_exactly(num_splits):
    """No second launch: the last split of each (sequence, KV head) merges them and sets its
    counter back to zero, so a second call (as a graph replay) gives the same bits."""
    from kernels.decode_attention import _counters

    q, slab, tables, lengths = _paged_inputs([140, 1, 33, 64], 8, 2, 64, torch.float32)
    first, want = _run(q, slab, tables, lengths, num_splits=num_splits)
    _assert_close(first, want, torch.float32)
    assert not _counters(q.device).any()
    second, _ = _run(q, slab, tables, lengths, num_splits=num_splits)
    assert torch.equal(first, second)


def test_splits_past_a_sequences_tiles_leave_it_as_it_was():
    """A graph sizes its splits for the widest block table: a short sequence uses as many as it
    has key tiles and the rest leave at once, so its output is what a launch of exactly that many
    splits gives (to fp32 rounding: the merge's sum may group its terms otherwise), up to the
    largest grid, 64 splits."""
    q, slab, tables, lengths = _paged_inputs([140, 1, 33], 4, 2, 64, torch.float32)
    tiles, want = _run(q, slab, tables, lengths, num_splits=3)  # 140 tokens: 3 runs of tiles
    for wide in (16, 64):
        got, _ = _run(q, slab, tables, lengths, num_splits=wide)
        torch.testing.assert_close(got, tiles, atol=1e-6, rtol=0)
    _assert_close(tiles, want, torch.float32)


def test_a_call_of_few_sequence_heads_splits_fewer_ways(monkeypatch):
    """A call of at most one (sequence, KV head) per SM with 64-token tiles (7B at batch 1)
    splits a sequence at most 3 ways, or at least 2 tiles a split past 6 tiles: every tile still
    counted once, whatever the length (1 to 15 tiles here, against a grid of 16 splits), and the
    merge grouped otherwise than with one tile a split (AFS_ATTN_FEW_SPLITS=0)."""
    import kernels.decode_attention as attention

    # 6 sequences x 4 KV heads: above 132 // 8, at most 132
    q, slab, tables, lengths = _paged_inputs([1, 65, 130, 200, 390, 900], 4, 4, 32, torch.float32)
    outs = {}
    for few in (True, False):
        monkeypatch.setattr(attention, "FEW_SPLITS", few)
        outs[few], want = _run(q, slab, tables, lengths, num_splits=16)
        _assert_close(outs[few], want, torch.float32)
        assert not attention._counters(q.device).any()
    # one or two tiles: one tile a split either way, the same bits
    assert torch.equal(outs[True][:2], outs[False][:2])
    assert not torch.equal(outs[True][3:], outs[False][3:])


def test_empty_sequence_gives_zeros():
    # a padding row of length 0 (CUDA-graph batch padding) must not produce NaN
    q, slab, tables, lengths = _paged_inputs([20, 1], 2, 1, 64, torch.float32)
    lengths[1] = 0
    out = torch.full_like(q, float("nan"))
    decode_attention(q, slab, tables, lengths, 0.125, out, num_splits=2)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isfinite(out[0]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_then_decode_matches_torch_ref_backend(dtype):
    # one decode step through both kernels against the reference backend's own forward
    num_heads, num_kv_heads, head_dim = 4, 2, 64
    computed = [0, 16, 40]
    num_blocks = 10
    order = torch.randperm(num_blocks).tolist()
    tables = [[order.pop() for _ in range(math.ceil((n + 1) / BLOCK_SIZE))] for n in computed]
    meta = build_attention_metadata(tables, computed, [1, 1, 1], BLOCK_SIZE, DEVICE)
    slab = torch.randn((2, num_blocks, num_kv_heads, BLOCK_SIZE, head_dim), dtype=dtype)
    slab = slab.to(DEVICE)
    q = torch.randn((3, num_heads, head_dim), dtype=dtype, device=DEVICE)
    k = torch.randn((3, num_kv_heads, head_dim), dtype=dtype, device=DEVICE)
    v = torch.randn((3, num_kv_heads, head_dim), dtype=dtype, device=DEVICE)
    reference_slab = slab.clone()
    want = get_backend("torch_ref").forward(q, k, v, reference_slab, meta, 0.125)

    store_kv(k, v, slab, meta.slot_mapping)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, slab, meta.block_tables, meta.seq_lens, 0.125, out)

    assert torch.equal(slab, reference_slab)
    _assert_close(out, want.float(), dtype)


def test_num_splits_heuristic():
    def splits(batch, num_kv_heads, max_tokens):
        return choose_num_splits(batch, num_kv_heads, max_tokens, num_sms=132, tile_tokens=64)

    # small batch, long context: split until the 132 SMs have 4 programs each
    assert splits(batch=1, num_kv_heads=8, max_tokens=4096) == 64
    assert splits(batch=1, num_kv_heads=32, max_tokens=4096) == 17
    # short context: never less than a 64-token tile a split
    assert splits(batch=1, num_kv_heads=8, max_tokens=128) == 2
    assert splits(batch=1, num_kv_heads=8, max_tokens=16) == 1
    # the batch alone fills the GPU
    assert splits(batch=64, num_kv_heads=8, max_tokens=4096) == 2
    assert splits(batch=64, num_kv_heads=32, max_tokens=4096) == 1
    # a single sequence with a single head is capped
    assert splits(batch=1, num_kv_heads=1, max_tokens=65536) == 64


def test_rejects_cache_of_another_dtype():
    q, slab, tables, lengths = _paged_inputs([5], 2, 1, 64, torch.float32)
    with pytest.raises(ValueError, match="kv_cache"):
        decode_attention(q, slab.half(), tables, lengths, 0.125, torch.empty_like(q))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [True, False], ids=["olmo2-qk-norm", "llama"])
@pytest.mark.parametrize("num_splits", [None, 1, 3, 16], ids=lambda n: f"splits{n}")
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 2), (4, 4)], ids=["gqa4", "mha"])
def test_prologue_inside_is_the_prologue_then_attention(
    dtype, qk_norm, num_splits, num_heads, num_kv_heads
):
    """decode_attention_qkv from raw projections: the slab gets rotary_qkv's keys and values and
    the output is decode_attention's after rotary_qkv, though the new token's key and value never
    go through the slab (its slot starts as NaN); a padding row (slot -1, length 0) gets zeros and
    stores nothing."""
    from kernels.decode_attention import decode_attention_qkv
    from kernels.rope import qk_sum_squares, rotary_qkv
    from workers.layers.rotary import RotaryEmbedding

    head_dim, lengths = 32, [140, 1, 33, 0]
    _, slab, tables, seq_lens = _paged_inputs(lengths, num_heads, num_kv_heads, head_dim, dtype)
    batch = len(lengths)
    gen = torch.Generator().manual_seed(num_heads + (num_splits or 0))
    qkv = torch.randn(batch, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    qkv = qkv.to(DEVICE, dtype)
    positions = (seq_lens - 1).clamp(min=0).long()
    slots = torch.full((batch,), -1, dtype=torch.long, device=DEVICE)
    for i, n in enumerate(lengths):
        if n:
            slots[i] = tables[i, (n - 1) // BLOCK_SIZE].long() * BLOCK_SIZE + (n - 1) % BLOCK_SIZE
            slab[:, tables[i, (n - 1) // BLOCK_SIZE], :, (n - 1) % BLOCK_SIZE] = float("nan")
    rotary = RotaryEmbedding(head_dim, 256, 10000.0).to(DEVICE)
    tables_fp32 = (rotary.cos_cache, rotary.sin_cache)
    norm = {}
    if qk_norm:
        weights = [
            1 + 0.2 * torch.randn(n * head_dim, generator=gen) for n in (num_heads, num_kv_heads)
        ]
        norm = dict(
            q_norm_weight=weights[0].to(DEVICE, dtype),
            k_norm_weight=weights[1].to(DEVICE, dtype),
            eps=1e-6,
        )
    scale = head_dim**-0.5

    want_slab = slab.clone()
    q, _, _ = rotary_qkv(qkv, num_heads, num_kv_heads, positions, *tables_fp32, **norm,
                         kv_cache=want_slab, slot_mapping=slots)  # fmt: skip
    want = decode_attention(q, want_slab, tables, seq_lens, scale, torch.empty_like(q), num_splits)

    got_slab = slab.clone()
    out = torch.full((batch, num_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    got = decode_attention_qkv(
        qkv, num_heads, num_kv_heads, positions, *tables_fp32, got_slab, slots, tables, seq_lens,
        scale, out, **norm, num_splits=num_splits,
    )  # fmt: skip
    assert got is out
    few_ulps = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got_slab, want_slab, atol=few_ulps, rtol=0, equal_nan=True)
    _assert_close(got, want.float(), dtype)
    assert not got[3].any()  # the padding row

    if qk_norm:  # the sums of squares given (as the ranks' all-reduce gives them): the same
        squares = qk_sum_squares(qkv, num_heads, num_kv_heads, head_dim)
        given = decode_attention_qkv(
            qkv, num_heads, num_kv_heads, positions, *tables_fp32, slab.clone(), slots, tables,
            seq_lens, scale, torch.empty_like(out), **norm, qk_squares=squares,
            norm_widths=(num_heads * head_dim, num_kv_heads * head_dim), num_splits=num_splits,
        )  # fmt: skip
        torch.testing.assert_close(given, got, atol=few_ulps, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 3], ids=lambda n: f"splits{n}")
def test_first_tile_read_before_the_wait_changes_nothing(monkeypatch, dtype, num_splits):
    """The prologue's launch with its first key tile and rope rows read before the wait for the
    projection, and with everything read after it: the same output and slab, bit for bit (one
    order of arithmetic, only the loads moved), over a long sequence, a one-token one (no cached
    tile), one within a tile and a padding row."""
    import kernels.decode_attention as attention

    num_heads, num_kv_heads, head_dim, lengths = 4, 2, 32, [140, 1, 33, 0]
    _, slab, tables, seq_lens = _paged_inputs(lengths, num_heads, num_kv_heads, head_dim, dtype)
    gen = torch.Generator().manual_seed(7)
    qkv = torch.randn(len(lengths), (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    qkv = qkv.to(DEVICE, dtype)
    positions = (seq_lens - 1).clamp(min=0).long()
    slots = torch.full((len(lengths),), -1, dtype=torch.long, device=DEVICE)
    for i, n in enumerate(lengths):
        if n:
            slots[i] = tables[i, (n - 1) // BLOCK_SIZE].long() * BLOCK_SIZE + (n - 1) % BLOCK_SIZE
    from workers.layers.rotary import RotaryEmbedding

    rotary = RotaryEmbedding(head_dim, 256, 10000.0).to(DEVICE)
    norm = dict(
        q_norm_weight=torch.rand(num_heads * head_dim, generator=gen).to(DEVICE, dtype) + 0.5,
        k_norm_weight=torch.rand(num_kv_heads * head_dim, generator=gen).to(DEVICE, dtype) + 0.5,
        eps=1e-6,
    )
    results = []
    for early in (True, False):
        monkeypatch.setattr(attention, "EARLY", early)
        got_slab = slab.clone()
        out = torch.full(
            (len(lengths), num_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE
        )
        attention.decode_attention_qkv(
            qkv, num_heads, num_kv_heads, positions, rotary.cos_cache, rotary.sin_cache,
            got_slab, slots, tables, seq_lens, head_dim**-0.5, out, **norm,
            num_splits=num_splits,
        )  # fmt: skip
        results.append((out, got_slab))
    (early_out, early_slab), (late_out, late_slab) = results
    assert torch.equal(early_out, late_out) and not early_out[:3].isnan().any()
    assert torch.equal(early_slab, late_slab)


def test_prologue_inside_refuses_bad_input():
    from kernels.decode_attention import decode_attention_qkv
    from workers.layers.rotary import RotaryEmbedding

    _, slab, tables, seq_lens = _paged_inputs([5, 9], 4, 2, 32, torch.float32)
    rotary = RotaryEmbedding(32, 64, 10000.0).to(DEVICE)
    qkv = torch.randn(2, 8 * 32, device=DEVICE)
    args = (torch.zeros(2, dtype=torch.long, device=DEVICE), rotary.cos_cache, rotary.sin_cache)
    out = torch.empty(2, 4, 32, device=DEVICE)
    slots = torch.zeros(2, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="qkv"):
        decode_attention_qkv(qkv[:, :-32], 4, 2, *args, slab, slots, tables, seq_lens, 1.0, out)
    with pytest.raises(ValueError, match="slot_mapping"):
        decode_attention_qkv(qkv, 4, 2, *args, slab, slots[:1], tables, seq_lens, 1.0, out)
    with pytest.raises(ValueError, match="out"):
        decode_attention_qkv(qkv, 4, 2, *args, slab, slots, tables, seq_lens, 1.0, out[:, :2])
