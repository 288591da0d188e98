"""Whether a layer runs its fused Triton kernel (`kernels/`) or its PyTorch code.

CUDA tensors take the kernels; other tensors take the PyTorch code, which is also the reference
the kernels are tested against. `FORCE_TRITON` overrides the choice: tests set it to True to run
the kernels on CPU through Triton's interpreter, or to False for the PyTorch path on a GPU. The
environment variable AFS_FORCE_TRITON (1 or 0) sets it at import, so tensor-parallel ranks
spawned as processes of their own make the same choice.
AFS_SKINNY_MATMUL=1 makes the linear layers and the LM head multiply decode batches (up to 16
rows) with `kernels/skinny_matmul.py` instead of cuBLAS, on the same terms; off by default (on the
H200 cuBLAS still reads every decode projection but the LM head faster: benchmarks/BENCHMARKS.md).
Layers import a kernel module only on the Triton path: Triton is not installed everywhere the
engine runs (only on Linux x86-64).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

FORCE_TRITON: bool | None = {"1": True, "0": False}.get(os.environ.get("AFS_FORCE_TRITON", ""))


def use_triton(x: torch.Tensor) -> bool:
    """True where the layers' fused kernels run on x: on CUDA, unless forced either way."""
    return x.is_cuda if FORCE_TRITON is None else FORCE_TRITON


SKINNY_MATMUL = os.environ.get("AFS_SKINNY_MATMUL") == "1"


def _skinny_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        SKINNY_MATMUL
        and use_triton(x)
        and x.dim() == 2
        and 1 <= x.shape[0] <= 16
        and x.dtype == weight.dtype
        and x.stride(1) == 1
        and weight.stride(1) == 1
    )


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T: a decode batch (2-D, up to 16 rows) through the skinny matmul kernel where
    AFS_SKINNY_MATMUL=1 and the Triton path applies, anything else through F.linear."""
    if _skinny_applies(x, weight):
        from kernels.skinny_matmul import skinny_matmul

        return skinny_matmul(x, weight)
    return F.linear(x, weight)


def swiglu_linear(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """(silu(gate) * up) W^T from gate_up [T, 2K] in one skinny matmul launch, or None where that
    kernel does not apply (the caller runs the activation and its matmul apart)."""
    if not _skinny_applies(gate_up, weight) or gate_up.shape[1] != 2 * weight.shape[1]:
        return None
    from kernels.skinny_matmul import skinny_matmul

    return skinny_matmul(gate_up, weight, swiglu=True)
