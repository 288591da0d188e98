"""The SwiGLU feed-forward block: down(silu(gate(x)) * up(x)), gate and up fused in one GEMM."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from workers.layers import fused
from workers.layers.activation import SiluAndMul
from workers.layers.linear import MergedColumnParallelLinear, RowParallelLinear

if TYPE_CHECKING:
    from workers.layers.linear import PostNorm


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2)
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size)

    def forward(
        self, x: torch.Tensor, reduce: bool = True, post_norm: PostNorm | None = None
    ) -> torch.Tensor:
        # x: [T, hidden] -> gate_up [T, 2 * I / tp] -> [T, I / tp] -> [T, hidden]
        # (`reduce=False`: this rank's partial sum; `post_norm`: residual + norm of the sum; see
        # RowParallelLinear)
        gate_up = self.gate_up_proj(x)
        down = self.down_proj
        if down.int4 is None:  # a decode batch: the activation inside down's matmul, if it can
            if post_norm is not None:  # and the norm and add after it
                out = down.fused_norm_add(gate_up, *post_norm, swiglu=True)
                if out is not None:
                    return out
            out = fused.swiglu_linear(gate_up, down.weight)
            if out is not None:
                return down.finish(out, reduce, post_norm)
        return down(self.act(gate_up), reduce, post_norm)
