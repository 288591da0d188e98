"""Attention backends behind one interface: `torch_ref` everywhere, `triton` on CUDA."""

from __future__ import annotations

from workers.attention.base import AttentionBackend, AttentionMetadata, build_attention_metadata


def get_backend(name: str = "auto", device: str = "cpu") -> AttentionBackend:
    """`torch_ref`, or `auto` (the fastest backend available on the device)."""
    from workers.attention.torch_ref import TorchRefBackend

    if name in ("auto", "torch_ref"):
        return TorchRefBackend()
    raise ValueError(f"attention backend: {name!r} is not known; choose auto or torch_ref")


__all__ = ["AttentionBackend", "AttentionMetadata", "build_attention_metadata", "get_backend"]
