"""SwiGLU's activation: SiLU of the gate half of each row times its up half.

    out[t, i] = silu(gate_up[t, i]) * gate_up[t, I + i],   silu(g) = g * sigmoid(g)

(Shazeer 2020, "GLU Variants Improve Transformer"), computed in fp32 and rounded once to the input
dtype. PyTorch's `F.silu(gate) * up` is two kernels with an [T, I] intermediate between them; here
every input element is read once and every output written once.

Grid (T, cdiv(I, BLOCK)): each program takes BLOCK columns of one row, the gate and up halves of
the fused gate/up projection output at the same offsets in the two halves.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import pdl_options, wait_for_previous

_BLOCK = 1024


@triton.jit
def _kernel(
    gate_up_ptr, stride_gate_up_row,
    out_ptr, stride_out_row,
    INTERMEDIATE,
    BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_previous(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTERMEDIATE

    # -- load gate and up --
    gate_row = gate_up_ptr + row * stride_gate_up_row
    gate = tl.load(gate_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_row + INTERMEDIATE + cols, mask=mask, other=0.0).to(tl.float32)

    # -- silu(gate) * up in fp32 --
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_out_row + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up [T, 2 * I] (gate first), as [T, I] in gate_up's dtype."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(
            f"gate_up: expected [T, 2 * I] with contiguous rows, got {tuple(gate_up.shape)}"
        )
    num_rows, intermediate = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((num_rows, intermediate), dtype=gate_up.dtype, device=gate_up.device)
    if num_rows == 0:
        return out
    block = min(_BLOCK, triton.next_power_of_2(intermediate))
    _kernel[(num_rows, triton.cdiv(intermediate, block))](
        gate_up, gate_up.stride(0),
        out, out.stride(0),
        intermediate,
        BLOCK=block, **pdl_options(gate_up.device),
    )  # fmt: skip
    return out
