"""The SwiGLU feed-forward block: down(silu(gate(x)) * up(x)), gate and up fused in one GEMM."""

from __future__ import annotations

import torch
from torch import nn

from workers.layers import fused
from workers.layers.activation import SiluAndMul
from workers.layers.linear import MergedColumnParallelLinear, RowParallelLinear


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2)
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden] -> gate_up [T, 2 * I / tp] -> [T, I / tp] -> [T, hidden]
        return self.down(self.gate_up_proj(x))

    def down(self, gate_up: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """The block from gate_up's output on: the activation and down_proj (`reduce=False`:
        this rank's partial sum, see RowParallelLinear)."""
        down = self.down_proj
        if down.int4 is None:  # a decode batch: the activation inside down's matmul, if it can
            out = fused.swiglu_linear(gate_up, down.weight, down.partial_push(gate_up, reduce))
            if out is not None:
                return down.finish(out, reduce)
        return down(self.act(gate_up), reduce)
