"""Weight-only int4 for linear layers on CPU: round-to-nearest, asymmetric, groups of 32.

Each group of `group_size` consecutive input weights of one output row keeps a scale and a zero:

    w ~= (q - 8) * scale + zero,   q in 0..15,   scale = (max - min) / 15,   zero = min + 8 * scale

so q = round((w - min) / scale). Activations enter the GEMM in bf16 (PyTorch's packed-int4 CPU
kernel takes them so) and leave in the layer's dtype. A GGUF Q4_1 tensor (q * d + m per 32 weights,
its min and max attained) requantizes to its own q, so the embedded model keeps its 4-bit weights
instead of running them dequantized to fp32. GPUs get their own dequant-GEMM kernels.
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZATIONS = ("none", "int4")


class Int4WeightOnly:
    """A [N, K] weight packed to int4 with per-group scales and zeros; `__call__` multiplies."""

    def __init__(self, weight: torch.Tensor, group_size: int = 32) -> None:
        rows, cols = weight.shape
        if weight.device.type != "cpu":
            raise ValueError("quantization: int4 runs on CPU only for now; use --quantization none")
        if cols % group_size:
            raise ValueError(
                f"quantization: {cols} input features are not a multiple of {group_size}"
            )
        groups = weight.detach().float().reshape(rows, cols // group_size, group_size)
        low, high = groups.amin(-1), groups.amax(-1)  # [N, G]
        scale = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
        q = (
            ((groups - low[..., None]) / scale[..., None])
            .round()
            .to(torch.int32)
            .reshape(rows, cols)
        )
        self.out_features, self.in_features, self.group_size = rows, cols, group_size
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        zero = low + 8 * scale
        self.scales_and_zeros = torch.stack([scale.T, zero.T], dim=-1).to(
            torch.bfloat16
        )  # [G, N, 2]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, K] -> [T, N]
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch._weight_int4pack_mm_for_cpu(
            flat, self.packed, self.group_size, self.scales_and_zeros
        )
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def quantize_linears_(model: nn.Module, method: str, group_size: int = 32) -> int:
    """Quantize every linear layer's weight in place (not the embedding or the LM head)."""
    if method not in QUANTIZATIONS:
        raise ValueError(
            f"quantization: {method!r} is not supported; choose one of {QUANTIZATIONS}"
        )
    if method == "none":
        return 0
    count = 0
    for module in model.modules():
        if hasattr(module, "quantize_int4_"):
            module.quantize_int4_(group_size)
            count += 1
    return count
