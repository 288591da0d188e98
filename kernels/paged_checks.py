"""The input checks the paged kernels' wrappers share: the attention kernels (decode, prefill)
and the writers into the KV slab (the store, the fused RoPE prologue)."""

from __future__ import annotations

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    out: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
) -> tuple[int, int]:
    """Raise ValueError naming the first bad argument; return (num_kv_heads, block_size).

    q and out [rows, H, D], out's head_dim contiguous; kv_cache [2, num_blocks, KVH, block_size, D]
    contiguous; one dtype (fp16, bf16 or fp32) for the three; D a power of two of at least 16 and
    H a multiple of KVH; block_tables [B, max_blocks] int32 with contiguous rows and seq_lens [B]
    int32, B = seq_lens' length; everything on q's device.
    """
    if q.dim() != 3:
        raise ValueError(f"q: expected [rows, H, D], got shape {tuple(q.shape)}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[4] != head_dim:
        raise ValueError(
            f"kv_cache: expected [2, num_blocks, KVH, block_size, {head_dim}], "
            f"got shape {tuple(kv_cache.shape)}"
        )
    num_kv_heads, block_size = kv_cache.shape[2], kv_cache.shape[3]
    if num_heads % num_kv_heads:
        raise ValueError(f"q: {num_heads} heads is not a multiple of {num_kv_heads} KV heads")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"q: head_dim must be a power of two of at least 16, got {head_dim}")
    if q.dtype not in DTYPES:
        raise ValueError(f"q: dtype must be float16, bfloat16 or float32, got {q.dtype}")
    if kv_cache.dtype != q.dtype or out.dtype != q.dtype:
        raise ValueError(
            f"kv_cache, out: dtype must match q ({q.dtype}), got {kv_cache.dtype}, {out.dtype}"
        )
    if out.shape != q.shape:
        raise ValueError(f"out: expected shape {tuple(q.shape)}, got {tuple(out.shape)}")
    if out.stride(-1) != 1 or not kv_cache.is_contiguous():
        raise ValueError("out: head_dim must be contiguous; kv_cache must be contiguous")
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    for name, tensor, shape in (
        ("seq_lens", seq_lens, (num_seqs,)),
        ("block_tables", block_tables, (num_seqs, block_tables.shape[-1])),
    ):
        if tensor.dtype != torch.int32 or tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name}: expected int32 {shape}, got {tensor.dtype} {tuple(tensor.shape)}"
            )
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables: rows must be contiguous")
    if any(t.device != q.device for t in (kv_cache, out, block_tables, seq_lens)):
        raise ValueError(f"all tensors must be on q's device ({q.device})")
    return num_kv_heads, block_size


def check_kv_slab(kv_cache: torch.Tensor, num_kv_heads: int, head_dim: int, source: str) -> None:
    """kv_cache must be a contiguous [2, NB, num_kv_heads, BS, head_dim] slab for what `source`
    (the argument named in the message) writes into it."""
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or not kv_cache.is_contiguous():
        raise ValueError(
            f"kv_cache: expected contiguous [2, NB, KVH, BS, D], got {tuple(kv_cache.shape)}"
        )
    if (kv_cache.shape[2], kv_cache.shape[4]) != (num_kv_heads, head_dim):
        raise ValueError(
            f"kv_cache: {kv_cache.shape[2]} heads of dim {kv_cache.shape[4]}, "
            f"{source} has {num_kv_heads} of dim {head_dim}"
        )
