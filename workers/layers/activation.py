"""SwiGLU's activation: SiLU of the gate half times the up half.

On CUDA one Triton kernel (`kernels/activation.py`) computes it in fp32 and rounds once; the
PyTorch code is the path elsewhere and the kernel's reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.layers.fused import use_triton


class SiluAndMul(nn.Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        # gate_up: [T, 2 * I] -> [T, I]
        if use_triton(gate_up):
            from kernels.activation import silu_and_mul

            return silu_and_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
