"""Rotary position embedding (RoPE), NeoX/HF layout: `rotate_half` over the two halves of a head.

cos/sin are tabulated once in fp32 for every position up to the model's context and indexed by
each token's position, so the flattened batch needs no per-sequence offsets. One table serves the
whole model: the stack makes one `RotaryStep` per forward and every layer applies it, the PyTorch
path through its cos/sin rows in the activation dtype (looked up on first use), the fused Triton
prologue (`kernels/rope.py`) by reading the fp32 tables at the positions itself.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def rope_inverse_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None = None
) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    original_context = float(scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = original_context / low_freq_factor
    high_freq_wavelen = original_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        max_position: int,
        theta: float,
        scaling: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        inv_freq = rope_inverse_frequencies(head_dim, theta, scaling)  # [D/2]
        positions = torch.arange(max_position, dtype=torch.int64).float()
        freqs = torch.outer(positions, inv_freq)  # [P, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.register_buffer("cos_cache", angles.cos(), persistent=False)
        self.register_buffer("sin_cache", angles.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryStep:
        """The rotation of the step's positions ([T]) for activations of `dtype`."""
        return RotaryStep(positions, self.cos_cache, self.sin_cache, dtype)


@dataclass
class RotaryStep:
    positions: torch.Tensor
    """[T] position of each token."""
    cos_cache: torch.Tensor
    """[P, D] fp32 cos of every position (the model's table)."""
    sin_cache: torch.Tensor
    """[P, D] fp32 sin, likewise."""
    dtype: torch.dtype
    """The activation dtype."""

    @functools.cached_property
    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin of the positions, each [T, 1, D] in the activation dtype.

        rotate_half(x) * sin == roll(x, D/2) * (sin with its first half negated), one op fewer.
        """
        half = self.cos_cache.shape[-1] // 2
        cos = self.cos_cache[self.positions]  # [T, D]
        sin = self.sin_cache[self.positions]
        signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        return cos.unsqueeze(1).to(self.dtype), signed_sin.unsqueeze(1).to(self.dtype)


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    # x: [T, heads, D]; cos, signed sin: [T, 1, D]
    cos, signed_sin = rope
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
