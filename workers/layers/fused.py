"""Whether a layer runs its fused Triton kernel (`kernels/`) or its PyTorch code.

CUDA tensors take the kernels; other tensors take the PyTorch code, which is also the reference
the kernels are tested against. `FORCE_TRITON` overrides the choice: tests set it to True to run
the kernels on CPU through Triton's interpreter, or to False for the PyTorch path on a GPU. The
environment variable AFS_FORCE_TRITON (1 or 0) sets it at import, so tensor-parallel ranks
spawned as processes of their own make the same choice.
Decode batches (up to 64 rows) multiply with `kernels/skinny_matmul.py` instead of cuBLAS where
that kernel was measured faster on this GPU for the weight's shape (its table of measured configs,
kernels/skinny_matmul_configs.json); AFS_SKINNY_MATMUL=1 sends every decode batch through it,
AFS_SKINNY_MATMUL=0 none. A one-row decode step on one rank forms Olmo 2's post-norm inside the
next projection's skinny matmul (`rms_norm_add_linear`) where that pays, as measured.
Layers import a kernel module only on the Triton path: Triton is not installed everywhere the
engine runs (only on Linux x86-64).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from workers.distributed import PUSHED_ATTRIBUTE

if TYPE_CHECKING:
    from kernels.skinny_matmul import Config

FORCE_TRITON: bool | None = {"1": True, "0": False}.get(os.environ.get("AFS_FORCE_TRITON", ""))


def use_triton(x: torch.Tensor) -> bool:
    """True where the layers' fused kernels run on x: on CUDA, unless forced either way."""
    return x.is_cuda if FORCE_TRITON is None else FORCE_TRITON


SKINNY_MATMUL: bool | None = {"1": True, "0": False}.get(os.environ.get("AFS_SKINNY_MATMUL", ""))
"""True: every decode batch through the skinny matmul; False: none; None: measured shapes only."""


def _skinny_fits(x: torch.Tensor, weight: torch.Tensor, swiglu: bool) -> bool:
    """The skinny matmul can take this call: a decode batch of one dtype with contiguous rows,
    on the Triton path and not turned off."""
    if (
        SKINNY_MATMUL is False
        or not use_triton(x)
        or x.dim() != 2
        or x.dtype != weight.dtype
        or x.stride(1) != 1
        or weight.stride(1) != 1
        or x.shape[1] != weight.shape[1] * (2 if swiglu else 1)
    ):
        return False
    from kernels.skinny_matmul import MAX_ROWS

    return 1 <= x.shape[0] <= MAX_ROWS


def _skinny(x: torch.Tensor, weight: torch.Tensor, swiglu: bool, push=None) -> torch.Tensor | None:
    """x (or, with `swiglu`, silu(gate) * up of x) times weight transposed through the skinny
    matmul where it applies (see above), or None. `push` (a kernels.peer_collectives
    WordsTarget): the product is a row-parallel partial sum, pushed as it is written."""
    if not _skinny_fits(x, weight, swiglu):
        return None
    from kernels.skinny_matmul import measured_config, skinny_matmul

    config = measured_config(x, weight, swiglu)
    if config is None and not SKINNY_MATMUL:
        return None
    out = skinny_matmul(x, weight, swiglu=swiglu, config=config, push=push)
    if push is not None:
        setattr(out, PUSHED_ATTRIBUTE, True)
    return out


FUSED_POST_NORM = os.environ.get("AFS_FUSED_POST_NORM", "1")
"""Where a one-row decode step forms a post-norm's stream inside the next projection's skinny
matmul: "1" where `post_norm_route` says, "all" wherever a config is measured for the plain call
(the `tl.dot` cuts too, which stage the stream before their loop), "0" nowhere (the norm's own
kernel)."""
if FUSED_POST_NORM not in ("0", "1", "all"):
    raise ValueError(f"AFS_FUSED_POST_NORM: 0, 1 or all, got {FUSED_POST_NORM!r}")


def post_norm_route(x: torch.Tensor, weight: torch.Tensor) -> tuple[bool, Config | None]:
    """(whether the skinny matmul takes x's post-norm inside its call with weight, its config).
    It does for a one-row decode step where a config was measured for the call with the norm
    inside (its table entry "... norm", which benchmarks/post_norm_gpu.py --sweep writes), or
    where the plain call's measured config runs on the CUDA cores (`fma`: the stream is formed
    tile by tile in registers), or with AFS_FUSED_POST_NORM=all where any plain config is
    measured (a `tl.dot` cut stages the stream once before its loop), or everywhere with
    AFS_SKINNY_MATMUL=1. Only one row: every program reads all of the
    row for its norm, which a wider batch would pay for many times over."""
    if FUSED_POST_NORM == "0" or not _skinny_fits(x, weight, swiglu=False) or x.shape[0] != 1:
        return False, None
    from kernels.skinny_matmul import measured_config

    config = measured_config(x, weight, norm=True)
    if config is not None:
        return True, config
    plain = measured_config(x, weight)
    if plain is not None and (plain.fma or FUSED_POST_NORM == "all"):
        return True, plain
    return bool(SKINNY_MATMUL), None


def rms_norm_add_linear(
    x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
    """(stream, stream W^T) with stream = residual + rms_norm(x), in one skinny matmul launch
    where `post_norm_route` sends it, or None."""
    takes, config = post_norm_route(x, weight)
    if not takes:
        return None
    from kernels.skinny_matmul import rms_norm_add_matmul

    return rms_norm_add_matmul(x, residual, norm_weight, eps, weight, config=config)


def linear(x: torch.Tensor, weight: torch.Tensor, push=None) -> torch.Tensor:
    """x W^T: a decode batch (2-D, up to 64 rows) through the skinny matmul kernel where it
    applies (see above), anything else through F.linear. `push`: see `_skinny`; the product
    says whether it was pushed by its workers.distributed.PUSHED_ATTRIBUTE."""
    out = _skinny(x, weight, swiglu=False, push=push)
    return F.linear(x, weight) if out is None else out


def swiglu_linear(gate_up: torch.Tensor, weight: torch.Tensor, push=None) -> torch.Tensor | None:
    """(silu(gate) * up) W^T from gate_up [T, 2K] in one skinny matmul launch, or None where that
    kernel does not apply (the caller runs the activation and its matmul apart)."""
    return _skinny(gate_up, weight, swiglu=True, push=push)
