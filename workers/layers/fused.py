"""Whether a layer runs its fused Triton kernel (`kernels/`) or its PyTorch code.

CUDA tensors take the kernels; other tensors take the PyTorch code, which is also the reference
the kernels are tested against. `FORCE_TRITON` overrides the choice: tests set it to True to run
the kernels on CPU through Triton's interpreter, or to False for the PyTorch path on a GPU. The
environment variable AFS_FORCE_TRITON (1 or 0) sets it at import, so tensor-parallel ranks
spawned as processes of their own make the same choice.
Layers import a kernel module only on the Triton path: Triton is not installed everywhere the
engine runs (only on Linux x86-64).
"""

from __future__ import annotations

import os

import torch

FORCE_TRITON: bool | None = {"1": True, "0": False}.get(os.environ.get("AFS_FORCE_TRITON", ""))


def use_triton(x: torch.Tensor) -> bool:
    """True where the layers' fused kernels run on x: on CUDA, unless forced either way."""
    return x.is_cuda if FORCE_TRITON is None else FORCE_TRITON
