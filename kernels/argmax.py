"""The index of each row's largest value (greedy decoding's draw) in one launch.

A decode step's greedy draw is an argmax over a vocabulary of ~100k logits per row. PyTorch's
reduction gives one row a single block of threads, which reads the row at a few hundred GB/s
(about 22 us for 100k fp32 logits on the H200, longer than the rest of a 1B step's work outside
its graph). Here each row is cut into chunks of BLOCK, one program each:

    grid = (rows, chunks)

Each program finds its chunk's winner and writes it to a workspace, then bumps its row's counter
(acq_rel, GPU scope); the program that brings the counter to `chunks` reduces the row's partials
in chunk order, writes the index and sets the counter back to zero for the next call.

The winner is torch.argmax's: the largest value, NaN above everything (as torch.argmax treats it),
and of equal values the first index. So the result is the same index torch.argmax gives.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import device_buffers, last_to_arrive, pdl_options, rearm, wait_for_previous

_BLOCK = 2048
_MAX_CHUNKS = 128  # rows of up to 256k values
_MAX_ROWS = 1024


@triton.jit
def _pick(rank, key, index):
    """(rank, key, index) of the winner among candidates: the highest rank (1 for NaN, 0 for a
    number, -1 for no value), then the largest key, then the smallest index."""
    best_rank = tl.max(rank, 0)
    in_rank = rank == best_rank
    best_key = tl.max(tl.where(in_rank, key, float("-inf")), 0)
    winner = in_rank & (key == best_key)
    best_index = tl.min(tl.where(winner, index, 2147483647), 0)
    return best_rank, best_key, best_index


@triton.jit
def _kernel(
    x_ptr, stride_x, out_ptr, rank_ptr, key_ptr, index_ptr, count_ptr, n, CHUNKS,
    BLOCK: tl.constexpr, MAX_CHUNKS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    wait_for_previous(PDL)
    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + offsets, mask=ok, other=0.0).to(tl.float32)
    nan = x != x
    rank = tl.where(ok, nan.to(tl.int32), -1)
    key = tl.where(nan | ~ok, float("-inf"), x)
    best_rank, best_key, best_index = _pick(rank, key, offsets)

    # -- publish this chunk's winner; the row's last program picks among them in chunk order --
    slot = row * MAX_CHUNKS + chunk
    tl.store(rank_ptr + slot, best_rank)
    tl.store(key_ptr + slot, best_key)
    tl.store(index_ptr + slot, best_index)
    if last_to_arrive(count_ptr + row, CHUNKS):
        chunks = tl.arange(0, MAX_CHUNKS)
        mine = row * MAX_CHUNKS + chunks
        present = chunks < CHUNKS
        ranks = tl.load(rank_ptr + mine, mask=present, other=-1, cache_modifier=".cg")
        keys = tl.load(key_ptr + mine, mask=present, other=float("-inf"), cache_modifier=".cg")
        indices = tl.load(index_ptr + mine, mask=present, other=2147483647, cache_modifier=".cg")
        _, _, winner = _pick(ranks, keys, indices)
        tl.store(out_ptr + row, winner.to(tl.int64))
        rearm(count_ptr + row)


def _workspace(device: torch.device) -> tuple[torch.Tensor, ...]:
    """Each row's chunk winners (rank, key, index) and counters (each call leaves them at 0)."""
    slots = _MAX_ROWS * _MAX_CHUNKS
    return device_buffers(
        "argmax",
        device,
        lambda: (
            torch.empty(slots, dtype=torch.int32, device=device),
            torch.empty(slots, dtype=torch.float32, device=device),
            torch.empty(slots, dtype=torch.int32, device=device),
            torch.zeros(_MAX_ROWS, dtype=torch.int32, device=device),
        ),
    )


def fits(x: torch.Tensor) -> bool:
    """Whether `argmax` takes x: 2-D, rows contiguous, within the workspace's rows and chunks."""
    return (
        x.dim() == 2
        and 1 <= x.shape[0] <= _MAX_ROWS
        and 1 <= x.shape[1] <= _BLOCK * _MAX_CHUNKS
        and x.stride(1) == 1
        and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    )


def argmax(x: torch.Tensor) -> torch.Tensor:
    """[R, V] values (fp32, fp16 or bf16; a column slice of a wider tensor is fine) to the
    [R] int64 indices torch.argmax(x, dim=-1) gives."""
    if not fits(x):
        raise ValueError(
            f"argmax takes [1..{_MAX_ROWS}, 1..{_BLOCK * _MAX_CHUNKS}] floats with contiguous "
            f"rows, got {tuple(x.shape)} {x.dtype} of strides {x.stride()}"
        )
    rows, n = x.shape
    chunks = triton.cdiv(n, _BLOCK)
    ranks, keys, indices, counters = _workspace(x.device)
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    _kernel[(rows, chunks)](
        x, x.stride(0), out, ranks, keys, indices, counters, n, chunks,
        BLOCK=_BLOCK, MAX_CHUNKS=_MAX_CHUNKS, num_warps=8, **pdl_options(x.device),
    )  # fmt: skip
    return out
