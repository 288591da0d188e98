"""What attention layers read during one forward: metadata, KV slab and backend.

The runner sets it around each forward with `forward_context(...)`; nesting is refused because a
forward inside a forward would silently read the outer step's slots and block tables.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from workers.attention.base import AttentionBackend, AttentionMetadata


@dataclass
class ForwardContext:
    attn_metadata: AttentionMetadata
    """Where each new token's K/V goes and what each sequence attends to."""
    kv_caches: list[torch.Tensor]
    """One KV slab tensor per layer (layout in `workers/engine/kv_cache.py`)."""
    backend: AttentionBackend
    """The attention implementation every layer calls."""


_CURRENT: ForwardContext | None = None


@contextmanager
def forward_context(context: ForwardContext) -> Iterator[ForwardContext]:
    global _CURRENT
    if _CURRENT is not None:
        raise RuntimeError("forward_context: already inside a forward; nesting is not allowed")
    _CURRENT = context
    try:
        yield context
    finally:
        _CURRENT = None


def get_forward_context() -> ForwardContext:
    if _CURRENT is None:
        raise RuntimeError("attention called outside forward_context(...): no KV slab or metadata")
    return _CURRENT
