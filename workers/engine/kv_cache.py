"""The paged KV slab, its block pool and the prefix cache.

One tensor per layer, allocated once, holding this shard's K/V heads:

    kv_cache[layer]: [2, num_blocks, num_kv_heads, block_size, head_dim]
                      K/V  block id   head          slot in block

A token at position p of a sequence lives in block block_table[p // block_size] at offset
p % block_size; its slot is block_id * block_size + offset (`slot_mapping`). One (block, head) is a
contiguous [block_size, head_dim] tile, so a kernel reads it in one burst for all the query heads
that share that K/V head.

Prefix cache: a full block is named by a chained hash of (its parent's hash, its token ids), so
equal hashes mean equal whole prefixes. Blocks are reference-counted. A block whose count drops to
zero joins the back of the free queue and keeps its hash: until it is handed out again (from the
front, least recently freed first) a request with the same prefix can take it back.

    request tokens:  |== block 0 ==|== block 1 ==|== block 2 ==|== blk 3 ==.....|
                     |<----- full blocks: hashed, cacheable ---->| partial: never cached
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from workers.engine.request import Request


def allocate_kv_slab(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[torch.Tensor]:
    shape = (2, num_blocks, num_kv_heads, block_size, head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]


def kv_block_bytes(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes one block takes over all layers (K and V)."""
    element = torch.empty((), dtype=dtype).element_size()
    return num_layers * 2 * block_size * num_kv_heads * head_dim * element


def hash_block(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """The chained hash of a full block: its parent's hash and its own token ids."""
    digest = hashlib.blake2b(parent or b"", digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


class BlockPool:
    """A fixed set of blocks: free ones in LRU order, cached ones findable by their hash."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks: must be at least 1, got {num_blocks}")
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, KVBlock] = OrderedDict(
            (block.block_id, block) for block in self.blocks
        )
        self.cached: dict[bytes, KVBlock] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def allocate(self, count: int) -> list[KVBlock]:
        """Take `count` blocks from the front of the free queue, evicting their cached hashes."""
        if count > len(self.free_queue):
            raise RuntimeError(f"asked for {count} blocks, {len(self.free_queue)} free")
        taken = []
        for _ in range(count):
            _, block = self.free_queue.popitem(last=False)
            if block.block_hash is not None:
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            taken.append(block)
        return taken

    def take_cached(self, blocks: Iterable[KVBlock]) -> None:
        """Add a reference to cache hits; free ones leave the free queue."""
        for block in blocks:
            if block.ref_count == 0:
                del self.free_queue[block.block_id]
            block.ref_count += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop a reference; blocks nobody holds join the back of the free queue, hash kept."""
        for block in blocks:
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block.block_id] = block

    def cache(self, block: KVBlock, block_hash: bytes) -> None:
        """Make a full block findable; a prefix computed twice keeps its first block."""
        if block_hash not in self.cached:
            self.cached[block_hash] = block
            block.block_hash = block_hash


class KVCacheManager:
    """Blocks per request: admission with prefix-cache hits, growth, freeing, hit-rate counters."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.request_blocks: dict[str, list[int]] = {}  # block ids in order: the block table
        self.num_hashed_blocks: dict[str, int] = {}
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def prefix_hit_rate(self) -> float:
        return (
            self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0
        )

    def block_table(self, request_id: str) -> list[int]:
        return list(self.request_blocks.get(request_id, ()))

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _update_hashes(self, request: Request) -> list[bytes]:
        hashes = request.block_hashes
        size = self.block_size
        for index in range(len(hashes), request.num_tokens // size):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, request.token_ids(index * size, (index + 1) * size)))
        return hashes

    def find_cached_prefix(self, request: Request) -> list[KVBlock]:
        """Cached blocks holding the longest prefix of the request; the last token stays out."""
        if not self.enable_prefix_caching or request.params.prompt_logprobs is not None:
            return []
        hashes = self._update_hashes(request)
        # the last token is always computed: its logits are needed to sample
        usable = (request.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in hashes[:usable]:
            block = self.pool.cached.get(block_hash)
            if block is None:
                break
            hits.append(block)
        self.prefix_query_tokens += request.num_tokens
        self.prefix_hit_tokens += len(hits) * self.block_size
        return hits

    def allocate_slots(
        self, request: Request, num_new_tokens: int, cached_prefix: Sequence[KVBlock] = ()
    ) -> bool:
        """Blocks for `num_new_tokens` more tokens after the computed (and cached) ones.

        False, changing nothing, when the free queue cannot supply them.
        """
        blocks = self.request_blocks.setdefault(request.request_id, [])
        total = request.num_computed_tokens + len(cached_prefix) * self.block_size + num_new_tokens
        needed = self.blocks_needed(total) - len(blocks) - len(cached_prefix)
        if needed > 0 or cached_prefix:
            # hits that sit in the free queue leave it when taken: they count against free space
            free_hits = sum(1 for block in cached_prefix if block.ref_count == 0)
            if needed > self.pool.num_free_blocks - free_hits:
                return False
            self.pool.take_cached(cached_prefix)
            added = [*cached_prefix, *self.pool.allocate(max(needed, 0))]
            blocks.extend(block.block_id for block in added)
        # (a decode step inside its last block needs neither; only a newly full block is hashed)
        hashed = self.num_hashed_blocks.get(request.request_id, 0)
        if self.enable_prefix_caching and total // self.block_size > hashed:
            self._cache_full_blocks(request, blocks, total)
        return True

    def _cache_full_blocks(self, request: Request, blocks: list[int], num_tokens: int) -> None:
        # blocks full once this step's tokens are written become findable now: a request
        # admitted later in the same step reads them after this step's K/V store
        hashes = self._update_hashes(request)
        start = self.num_hashed_blocks.get(request.request_id, 0)
        end = min(num_tokens // self.block_size, len(hashes))
        for index in range(start, end):
            self.pool.cache(self.pool.blocks[blocks[index]], hashes[index])
        self.num_hashed_blocks[request.request_id] = max(start, end)

    def free(self, request: Request) -> None:
        """Give back every block; the tail first into the free queue so that it is evicted first."""
        blocks = self.request_blocks.pop(request.request_id, [])
        self.num_hashed_blocks.pop(request.request_id, None)
        self.pool.free(self.pool.blocks[block_id] for block_id in reversed(blocks))
