"""Start reading a weight into L2 before the matmul that needs it: the decode step's idle DRAM time.

At batch 1 a decode step alternates between weight-streaming matmuls, which keep DRAM busy, and
small kernels (QK-norm and RoPE, attention, norms, the activation) that barely touch it. Each of
those gaps is time the next matmul's weight could already be on its way. `l2_prefetch(weight,
max_bytes)` is one small kernel, put on the stream ahead of those small kernels: its programs,
spread over many SMs, ask for the weight's 128-byte lines (`prefetch.global.L2`, a hint that
fills L2 and no register) and end; the reads go on while the small kernels run, and the matmul finds those lines in L2.
Only the first `max_bytes` of the weight (its first rows) are asked for, so what was fetched is
still in the 50 MB L2 when the matmul reads it.

Under programmatic dependent launch (kernels/launch.py) the kernel lets the next one launch at
once and issues its prefetches while the kernel before it is still running; it then waits for
that kernel, so the stream's order is kept (the kernel after it waits on it). It writes nothing.
A hint only: on a CPU, an older GPU or under the interpreter it is not launched at all.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.launch import hopper_or_later, pdl_options

_LINES = 1024
"""128-byte lines one program asks for (128 KiB: eight a thread), so many SMs share the asking."""
BUDGET = int(float(os.environ.get("AFS_L2_PREFETCH_MB", "0")) * (1 << 20))
"""Bytes of each upcoming weight to ask for (AFS_L2_PREFETCH_MB; 0: none)."""


@triton.jit
def _prefetch_kernel(byte_ptr, nbytes, LINES: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    line = tl.program_id(0) * LINES + tl.arange(0, LINES)
    start = line.to(tl.int64) * 128
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
        "=r,l,r",
        [byte_ptr + start, (start < nbytes).to(tl.int32)],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )
    if PDL:
        tl.extra.cuda.gdc_wait()


def l2_prefetch(weight: torch.Tensor, max_bytes: int) -> None:
    """Ask L2 for the first `max_bytes` of `weight` (contiguous), whole lines; no-op
    where the hint cannot be given (not a Hopper or later GPU, or the interpreter)."""
    if max_bytes <= 0 or not hopper_or_later(weight.device) or os.environ.get("TRITON_INTERPRET"):
        return
    if not weight.is_contiguous():
        raise ValueError("l2_prefetch takes a contiguous tensor")
    nbytes = min(weight.numel() * weight.element_size(), max_bytes)
    if nbytes == 0:
        return
    grid = (triton.cdiv(nbytes, 128 * _LINES),)
    _prefetch_kernel[grid](
        weight.view(-1).view(torch.uint8), nbytes, LINES=_LINES, num_warps=4,
        **pdl_options(weight.device),
    )  # fmt: skip
