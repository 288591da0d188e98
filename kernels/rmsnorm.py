"""RMSNorm of each row in fp32, alone or fused with the residual add on either side of it.

    rms_norm(x) = x / sqrt(mean(x^2) + eps) * weight

(Zhang and Sennrich 2019, "Root Mean Square Layer Normalization"), computed in fp32 and rounded
once to x's dtype, as `F.rms_norm(x.float(), ..., weight.float(), eps).to(x.dtype)`. A residual
add next to the norm is one more pass over the row in PyTorch; here it happens while the row is
in registers, on the side each model family needs:

    pre-norm (Llama):   s = x + residual, rounded to the dtype as PyTorch's `x + residual` is;
                        residual <- s (in place); out = rms_norm(s)
    post-norm (Olmo 2): out = residual + rms_norm(x), the norm rounded to the dtype before the add

One program per row (token): the whole row is one power-of-two tile masked past the hidden size
(hidden sizes up to 8192 keep it in registers), read once, reduced, scaled and written. With
programmatic dependent launch (kernels/launch.py) the weight, which no kernel writes, is read
before the wait for the kernel before; after it, the row and the residual are loaded together,
so the wait is followed by one round trip to L2, not two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import pdl_options, wait_for_previous


@triton.jit
def rms_normalise(x, weight, eps, HIDDEN, dtype: tl.constexpr):
    """A row x (fp32, zero past HIDDEN) normalised, scaled by weight (fp32), rounded to dtype."""
    mean_square = tl.sum(x * x, axis=0) / HIDDEN
    return (x * tl.rsqrt(mean_square + eps) * weight).to(dtype)


@triton.jit
def add_rounded(a, b, dtype: tl.constexpr):
    """a + b summed in fp32 and rounded once to dtype: what PyTorch's add in that dtype gives."""
    return (a.to(tl.float32) + b.to(tl.float32)).to(dtype)


def norm_warps(block: int) -> int:
    """Warps for a row tile of `block` elements (the reduction order depends on it)."""
    return min(max(block // 512, 1), 8)


@triton.jit
def _kernel(
    x_ptr, stride_x_row,
    residual_ptr, stride_residual_row,
    out_ptr, stride_out_row,
    weight_ptr, eps,
    HIDDEN,
    ADD_BEFORE: tl.constexpr, ADD_AFTER: tl.constexpr,
    BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    dtype = out_ptr.dtype.element_ty
    # the norm's weight (no kernel writes it) is read while the kernel before finishes
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    wait_for_previous(PDL)

    # -- load the row and the residual, both in flight at once (and add it before the norm) --
    x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD_BEFORE or ADD_AFTER:
        residual_row = residual_ptr + row * stride_residual_row + cols
        residual = tl.load(residual_row, mask=mask, other=0.0)
    if ADD_BEFORE:
        # the sum of two dtype values rounded once: what PyTorch's add in that dtype gives
        x = add_rounded(x, residual, dtype)
        tl.store(residual_row, x, mask=mask)
        x = x.to(tl.float32)

    # -- normalise in fp32 --
    out = rms_normalise(x, weight, eps, HIDDEN, dtype)

    # -- epilogue: add the residual after the norm --
    if ADD_AFTER:
        out = add_rounded(residual, out, dtype)
    tl.store(out_ptr + row * stride_out_row + cols, out, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm(x) of x [T, hidden] with weight [hidden], in x's dtype."""
    return _launch(x, None, weight, eps, add_before=False)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-norm: s = x + residual (both [T, hidden]) is written into `residual`; returns
    (rms_norm(s), residual)."""
    return _launch(x, residual, weight, eps, add_before=True), residual


def rms_norm_add(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """Post-norm: residual + rms_norm(x), both [T, hidden], as a new tensor."""
    return _launch(x, residual, weight, eps, add_before=False)


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    add_before: bool,
) -> torch.Tensor:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x: expected [T, hidden] with contiguous rows, got {tuple(x.shape)}")
    num_rows, hidden = x.shape
    if weight.shape != (hidden,) or not weight.is_contiguous():
        raise ValueError(f"weight: expected contiguous [{hidden}], got {tuple(weight.shape)}")
    if residual is not None and (
        residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1
    ):
        raise ValueError(
            f"residual: expected {tuple(x.shape)} {x.dtype} with contiguous rows, "
            f"got {tuple(residual.shape)} {residual.dtype}"
        )
    out = torch.empty_like(x)
    if num_rows == 0:
        return out
    block = triton.next_power_of_2(hidden)
    _kernel[(num_rows,)](
        x, x.stride(0),
        residual, 0 if residual is None else residual.stride(0),
        out, out.stride(0),
        weight, eps,
        hidden,
        ADD_BEFORE=add_before, ADD_AFTER=residual is not None and not add_before,
        BLOCK=block,
        num_warps=norm_warps(block), **pdl_options(x.device),
    )  # fmt: skip
    return out
