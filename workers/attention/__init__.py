"""Attention backends behind one interface: `torch_ref` everywhere, `triton` on CUDA."""

from __future__ import annotations

from workers.attention.base import AttentionBackend, AttentionMetadata, build_attention_metadata

BACKENDS = ("auto", "torch_ref", "triton")


def get_backend(name: str = "auto", device: str = "cpu") -> AttentionBackend:
    """`torch_ref`, `triton` (our kernels; CUDA, or the Triton interpreter on CPU), or `auto`:
    triton on CUDA, torch_ref elsewhere."""
    if name == "auto":
        name = "triton" if device == "cuda" else "torch_ref"
    if name == "torch_ref":
        from workers.attention.torch_ref import TorchRefBackend

        return TorchRefBackend()
    if name == "triton":
        from workers.attention.triton_backend import TritonBackend

        return TritonBackend()
    raise ValueError(f"attention backend: {name!r} is not known; choose one of {BACKENDS}")


__all__ = ["AttentionBackend", "AttentionMetadata", "build_attention_metadata", "get_backend"]
