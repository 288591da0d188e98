"""Choosing a replica for a request: least loaded, with prefix-cache affinity.

A prompt's first full blocks (the same chained hash the KV cache uses) pick a preferred replica by
rendezvous hashing, so prompts that share a prefix land where that prefix is cached, and adding or
losing a replica moves only the prefixes that hashed to it. The preferred replica is taken unless
it is busier than the least loaded one by more than `slack` requests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

from workers.engine.kv_cache import hash_block


class Routable(Protocol):
    replica_id: str

    @property
    def load(self) -> int: ...


class Router:
    def __init__(self, block_size: int = 16, affinity_blocks: int = 4, slack: int = 4) -> None:
        self.block_size = block_size
        self.affinity_blocks = affinity_blocks
        self.slack = slack

    def prefix_key(self, prompt_token_ids: Sequence[int]) -> bytes | None:
        """Chained hash of up to `affinity_blocks` leading full blocks; None if there are none."""
        full = min(len(prompt_token_ids) // self.block_size, self.affinity_blocks)
        key = None
        for index in range(full):
            start = index * self.block_size
            key = hash_block(key, prompt_token_ids[start : start + self.block_size])
        return key

    def choose(self, replicas: Sequence[Routable], prompt_token_ids: Sequence[int]) -> Routable:
        if not replicas:
            raise ValueError("no replica to choose from")
        least = min(replicas, key=lambda r: r.load)
        key = self.prefix_key(prompt_token_ids)
        if key is None:
            return least
        preferred = max(replicas, key=lambda r: _score(key, r.replica_id))
        return preferred if preferred.load <= least.load + self.slack else least


def _score(key: bytes, replica_id: str) -> bytes:
    return hashlib.blake2b(key + replica_id.encode(), digest_size=8).digest()
