"""The fused RMSNorm, SwiGLU and attention-prologue kernels against the layers' PyTorch code.

Tolerances (atol = rtol): fp32 1e-5 (only the order of the fp32 sums differs). fp16 and bf16: a
kernel and its reference both compute in fp32 and round once, so they differ by at most an ulp
where the fp32 results straddle a rounding boundary: 2e-3 (fp16), 1.6e-2 (bf16). The prologue's
reference rounds the normalised q/k and rotates in the activation dtype while the kernel stays in
fp32: a few ulps, 4e-3 (fp16), 3e-2 (bf16).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from checkpoints import make_checkpoint
from paged import PagedSequences

import kernels.activation
import kernels.rmsnorm
import kernels.rope
from kernels.activation import silu_and_mul
from kernels.rmsnorm import add_rms_norm, rms_norm, rms_norm_add
from kernels.rope import qk_sum_squares, rotary_qkv
from workers.attention import build_attention_metadata, get_backend, triton_backend
from workers.layers import fused
from workers.layers.norm import ShardedRMSNorm
from workers.layers.rotary import RotaryEmbedding, apply_rotary
from workers.weights.loader import load_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu),
]
ONE_ROUNDING = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FEW_ULPS = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close(got, want, tolerance):
    assert got.dtype == want.dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)


def reference_rms_norm(x, weight):
    return F.rms_norm(x.float(), weight.shape, weight.float(), EPS).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("hidden", [64, 200, 8192])  # 200: a row that is not a power of two
def test_rms_norm_and_its_residual_adds(dtype, num_tokens, hidden):
    x = torch.randn(num_tokens, hidden, device=DEVICE).to(dtype)
    residual = torch.randn(num_tokens, hidden, device=DEVICE).to(dtype)
    weight = (1 + 0.5 * torch.randn(hidden, device=DEVICE)).to(dtype)
    tolerance = ONE_ROUNDING[dtype]

    assert_close(rms_norm(x, weight, EPS), reference_rms_norm(x, weight), tolerance)

    # post-norm (Olmo 2): residual + norm(x), both inputs left as they were
    before = residual.clone()
    got = rms_norm_add(x, residual, weight, EPS)
    assert_close(got, residual + reference_rms_norm(x, weight), 2 * tolerance)
    assert torch.equal(residual, before)

    # pre-norm (Llama): the residual becomes x + residual, rounded as PyTorch's add rounds it
    stream = x + residual
    normed, new_residual = add_rms_norm(x, residual, weight, EPS)
    assert new_residual.data_ptr() == residual.data_ptr()
    assert torch.equal(residual, stream)
    assert_close(normed, reference_rms_norm(stream, weight), tolerance)


def test_rms_norm_rejects_a_mismatched_residual():
    x = torch.zeros(3, 64, device=DEVICE)
    with pytest.raises(ValueError, match="residual"):
        rms_norm_add(x, torch.zeros(3, 32, device=DEVICE), torch.ones(64, device=DEVICE), EPS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("intermediate", [64, 200, 3000])  # 3000: three column blocks, ragged
def test_silu_and_mul(dtype, num_tokens, intermediate):
    gate_up = (2 * torch.randn(num_tokens, 2 * intermediate, device=DEVICE)).to(dtype)
    gate, up = gate_up.float().chunk(2, dim=-1)
    got = silu_and_mul(gate_up)
    assert_close(got, (F.silu(gate) * up).to(dtype), ONE_ROUNDING[dtype])


ROPE_SHAPES = [
    pytest.param(4, 4, 64, id="mha-d64"),
    pytest.param(8, 2, 128, id="gqa4-d128"),
    pytest.param(6, 2, 64, id="gqa3-d64"),
]
BLOCK_SIZE, NUM_BLOCKS, MAX_POSITION = 16, 8, 512


def reference_prologue(qkv, num_heads, num_kv_heads, rotary, positions, q_norm, k_norm):
    """The model's PyTorch path: QK-norm in fp32 rounded to the dtype, then RoPE in the dtype."""
    head_dim = rotary.cos_cache.shape[1]
    q, k, v = qkv.split([num_heads * head_dim] + [num_kv_heads * head_dim] * 2, dim=-1)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    qk = torch.cat((q, k), dim=-1).view(qkv.shape[0], -1, head_dim)
    qk = apply_rotary(qk, rotary(positions, qkv.dtype).cos_sin)
    return *qk.split([num_heads, num_kv_heads], dim=1), v.view(qkv.shape[0], num_kv_heads, -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", ROPE_SHAPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("qk_norm", [True, False], ids=["olmo2-qk-norm", "llama"])
def test_rotary_qkv_and_kv_store(dtype, num_heads, num_kv_heads, head_dim, num_tokens, qk_norm):
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=DEVICE)
    qkv = qkv.to(dtype)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), device=DEVICE)
    rotary = RotaryEmbedding(head_dim, MAX_POSITION, 10000.0).to(DEVICE)
    q_norm = k_norm = None
    if qk_norm:
        q_norm = ShardedRMSNorm(num_heads * head_dim, num_heads * head_dim, 0, 1, EPS)
        k_norm = ShardedRMSNorm(num_kv_heads * head_dim, num_kv_heads * head_dim, 0, 1, EPS)
        for norm in (q_norm, k_norm):
            norm.to(device=DEVICE, dtype=dtype)
            with torch.no_grad():
                norm.weight.copy_(1 + 0.2 * torch.randn(norm.width))
    # distinct slots scattered over the slab, every third row padding (slot -1)
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, device=DEVICE)[:num_tokens]
    slots[1::3] = -1
    slab = torch.full(
        (2, NUM_BLOCKS, num_kv_heads, BLOCK_SIZE, head_dim), float("nan"), device=DEVICE
    ).to(dtype)
    norm_weights = {}
    if qk_norm:
        norm_weights = dict(q_norm_weight=q_norm.weight, k_norm_weight=k_norm.weight, eps=EPS)

    q, k, v = rotary_qkv(
        qkv,
        num_heads,
        num_kv_heads,
        positions,
        rotary.cos_cache,
        rotary.sin_cache,
        **norm_weights,
        kv_cache=slab,
        slot_mapping=slots,
    )

    want_q, want_k, want_v = reference_prologue(
        qkv, num_heads, num_kv_heads, rotary, positions, q_norm, k_norm
    )
    assert q.shape == (num_tokens, num_heads, head_dim)
    assert k.shape == v.shape == (num_tokens, num_kv_heads, head_dim)
    assert_close(q, want_q, FEW_ULPS[dtype])
    assert_close(k, want_k, FEW_ULPS[dtype])
    assert torch.equal(v, want_v)
    # the slab holds exactly the returned k and v at the real slots and is NaN everywhere else
    expected = torch.full_like(slab, float("nan"))
    real = slots >= 0
    blocks, offsets = slots[real] // BLOCK_SIZE, slots[real] % BLOCK_SIZE
    expected[0, blocks, :, offsets] = k[real]
    expected[1, blocks, :, offsets] = v[real]
    torch.testing.assert_close(slab, expected, atol=0, rtol=0, equal_nan=True)

    # without a slab: the same q and k
    q_only, k_only, _ = rotary_qkv(
        qkv, num_heads, num_kv_heads, positions, rotary.cos_cache, rotary.sin_cache, **norm_weights
    )
    assert torch.equal(q_only, q) and torch.equal(k_only, k)


@pytest.mark.parametrize(
    "num_heads,num_kv_heads", [(4, 2), (4, 1)], ids=["split-kv", "kv-replicated"]
)
def test_rotary_qkv_with_the_norm_sharded_over_two_ranks(num_heads, num_kv_heads):
    """Each rank's heads, normalised with the squares summed over both ranks (the k squares of a
    replicated k head halved), equal that rank's heads of the unsharded prologue."""
    head_dim, num_tokens, tp = 16, 5, 2
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=DEVICE)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), device=DEVICE)
    rotary = RotaryEmbedding(head_dim, MAX_POSITION, 10000.0).to(DEVICE)
    q_weight = 1 + 0.2 * torch.randn(num_heads * head_dim, device=DEVICE)
    k_weight = 1 + 0.2 * torch.randn(num_kv_heads * head_dim, device=DEVICE)
    tables = (rotary.cos_cache, rotary.sin_cache)
    want_q, want_k, _ = rotary_qkv(
        qkv, num_heads, num_kv_heads, positions, *tables, q_weight, k_weight, EPS
    )
    q, k, v = qkv.split([num_heads * head_dim] + [num_kv_heads * head_dim] * 2, dim=-1)
    rank_heads, rank_kv_heads = num_heads // tp, max(num_kv_heads // tp, 1)
    replicas = tp // num_kv_heads if num_kv_heads < tp else 1
    shards, squares = [], 0
    for rank in range(tp):
        q_cols = slice(rank * rank_heads * head_dim, (rank + 1) * rank_heads * head_dim)
        kv_rank = rank // replicas
        kv_cols = slice(
            kv_rank * rank_kv_heads * head_dim, (kv_rank + 1) * rank_kv_heads * head_dim
        )
        shard = torch.cat((q[:, q_cols], k[:, kv_cols], v[:, kv_cols]), dim=-1).contiguous()
        shards.append((shard, q_weight[q_cols], k_weight[kv_cols], kv_rank))
        squares = squares + qk_sum_squares(shard, rank_heads, rank_kv_heads, head_dim, 1 / replicas)
    widths = (num_heads * head_dim, num_kv_heads * head_dim)
    for rank, (shard, q_part, k_part, kv_rank) in enumerate(shards):
        got_q, got_k, _ = rotary_qkv(
            shard, rank_heads, rank_kv_heads, positions, *tables, q_part, k_part, EPS,
            qk_squares=squares, norm_widths=widths,
        )  # fmt: skip
        heads = slice(rank * rank_heads, (rank + 1) * rank_heads)
        kv_heads = slice(kv_rank * rank_kv_heads, (kv_rank + 1) * rank_kv_heads)
        assert_close(got_q, want_q[:, heads], FEW_ULPS[torch.float32])
        assert_close(got_k, want_k[:, kv_heads], FEW_ULPS[torch.float32])
    with pytest.raises(ValueError, match="qk_squares"):
        rotary_qkv(shards[0][0], rank_heads, rank_kv_heads, positions, *tables,
                   qk_squares=squares, norm_widths=widths)  # fmt: skip


def test_rotary_qkv_rejects_a_wrong_width():
    rotary = RotaryEmbedding(64, 16, 10000.0).to(DEVICE)
    qkv = torch.zeros(3, 7 * 64, device=DEVICE)
    positions = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="qkv"):
        rotary_qkv(qkv, 4, 2, positions, rotary.cos_cache, rotary.sin_cache)


@pytest.mark.parametrize("backend_name", ["torch_ref", "triton"])
def test_backends_do_not_store_kv_stored_by_the_caller(backend_name):
    # a decode step of two sequences: attention reads keys and values from the slab only
    num_heads, num_kv_heads, head_dim = 4, 2, 64
    tables, computed = [[3, 1], [0]], [20, 6]
    meta = build_attention_metadata(tables, computed, [1, 1], BLOCK_SIZE, DEVICE)
    slab = torch.randn(2, 4, num_kv_heads, BLOCK_SIZE, head_dim, device=DEVICE)
    before = slab.clone()
    q = torch.randn(2, num_heads, head_dim, device=DEVICE)
    k, v = torch.zeros(2, 2, num_kv_heads, head_dim, device=DEVICE)
    backend = get_backend(backend_name, DEVICE)

    got = backend.forward(q, k, v, slab, meta, head_dim**-0.5, kv_stored=True)

    assert torch.equal(slab, before)
    # the same as letting the backend store the slab's own entries at those slots
    slots = meta.slot_mapping
    stored_k = slab[0, slots // BLOCK_SIZE, :, slots % BLOCK_SIZE]
    stored_v = slab[1, slots // BLOCK_SIZE, :, slots % BLOCK_SIZE]
    want = backend.forward(q, stored_k, stored_v, slab.clone(), meta, head_dim**-0.5)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


MODELS = {
    "olmo2-gqa": ("Olmo2", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama-gqa": ("Llama", dict(num_attention_heads=4, num_key_value_heads=2)),
}
KERNEL_MODULES = {
    "rms_norm": kernels.rmsnorm,
    "add_rms_norm": kernels.rmsnorm,
    "rms_norm_add": kernels.rmsnorm,
    "silu_and_mul": kernels.activation,
    "rotary_qkv": kernels.rope,
    "decode_attention_qkv": triton_backend,  # looked up there
}
KERNELS_USED = {
    # rms_norm: Olmo 2's last, Llama's first; rotary_qkv: the prompts (decode steps: the decode
    # kernel does the prologue)
    "Olmo2": {"rms_norm", "rms_norm_add", "silu_and_mul", "rotary_qkv", "decode_attention_qkv"},
    "Llama": {"rms_norm", "add_rms_norm", "silu_and_mul", "rotary_qkv", "decode_attention_qkv"},
}


def record_calls(monkeypatch, called: set[str]) -> None:
    """Each kernel wrapper adds its name to `called` when a layer calls it."""
    for name, module in KERNEL_MODULES.items():
        kernel = getattr(module, name)

        def recorded(*args, _kernel=kernel, _name=name, **kwargs):
            called.add(_name)
            return _kernel(*args, **kwargs)

        monkeypatch.setattr(module, name, recorded)


@pytest.mark.skipif(DEVICE != "cpu", reason="forces the kernels on CPU tensors")
@pytest.mark.parametrize("prologue_max_batch", [16, 0], ids=["prologue-inside", "prologue-apart"])
@pytest.mark.parametrize("case", sorted(MODELS))
def test_model_with_fused_kernels_matches_pytorch_path(
    tmp_path, monkeypatch, case, prologue_max_batch
):
    """Prompts, then decode steps, teacher-forced: logits of both paths agree to fp32 rounding;
    decode steps take the prologue inside the decode kernel, or apart when told to."""
    pytest.importorskip("transformers")
    monkeypatch.setattr(triton_backend, "PROLOGUE_MAX_BATCH", prologue_max_batch)
    family, overrides = MODELS[case]
    make_checkpoint(tmp_path, family, overrides)
    model = load_model(str(tmp_path), dtype="float32").model
    prompts = [torch.randint(0, 320, (n,)).tolist() for n in (5, 17)]
    reference, ours = PagedSequences(model), PagedSequences(model, backend="triton")
    tables_ref, tables_ours = [[] for _ in prompts], [[] for _ in prompts]
    called: set[str] = set()
    record_calls(monkeypatch, called)
    computed, new_tokens = [0, 0], prompts
    for _ in range(3):
        want = reference.forward(tables_ref, computed, new_tokens)
        monkeypatch.setattr(fused, "FORCE_TRITON", True)
        got = ours.forward(tables_ours, computed, new_tokens)
        monkeypatch.setattr(fused, "FORCE_TRITON", None)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        ends = torch.tensor([len(t) for t in new_tokens]).cumsum(0) - 1
        computed = [c + len(t) for c, t in zip(computed, new_tokens, strict=True)]
        new_tokens = [[t] for t in want[ends].argmax(-1).tolist()]
    assert called == KERNELS_USED[family] - (
        {"decode_attention_qkv"} if not prologue_max_batch else set()
    )
    for ours_layer, reference_layer in zip(ours.slab, reference.slab, strict=True):
        torch.testing.assert_close(ours_layer, reference_layer, atol=1e-5, rtol=0)
