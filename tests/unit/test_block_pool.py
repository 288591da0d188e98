"""Block pool and prefix cache: exact block ids and free-queue order."""

from __future__ import annotations

from workers.engine.kv_cache import BlockPool, KVCacheManager, hash_block
from workers.engine.request import Request
from workers.engine.sampling_params import SamplingParams


def request(request_id: str, tokens: list[int], **params) -> Request:
    return Request(request_id, tokens, SamplingParams(**params), seed=0, arrival_index=0)


def free_order(pool: BlockPool) -> list[int]:
    return list(pool.free_queue)


def test_allocate_and_free_order():
    pool = BlockPool(6)
    assert [b.block_id for b in pool.allocate(2)] == [0, 1]
    third = pool.allocate(1)
    assert [b.block_id for b in third] == [2]
    assert free_order(pool) == [3, 4, 5]
    pool.free([pool.blocks[1], pool.blocks[0]])
    assert free_order(pool) == [3, 4, 5, 1, 0]
    assert [b.block_id for b in pool.allocate(4)] == [3, 4, 5, 1]
    assert free_order(pool) == [0]


def test_chained_hashes_depend_on_the_whole_prefix():
    first = hash_block(None, [1, 2, 3, 4])
    assert hash_block(None, [1, 2, 3, 4]) == first
    assert hash_block(first, [5, 6, 7, 8]) != hash_block(
        hash_block(None, [0, 2, 3, 4]), [5, 6, 7, 8]
    )


def test_prefix_hits_reference_counts_and_eviction():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    a = request("a", list(range(10)))  # blocks: [0..3] [4..7] [8 9]
    assert kv.find_cached_prefix(a) == []
    assert kv.allocate_slots(a, 10)
    assert kv.block_table("a") == [0, 1, 2]
    assert set(kv.pool.cached.values()) == {kv.pool.blocks[0], kv.pool.blocks[1]}

    b = request("b", list(range(8)) + [99, 98, 97])
    hits = kv.find_cached_prefix(b)
    assert [h.block_id for h in hits] == [0, 1]
    assert kv.allocate_slots(b, 3, hits)
    assert kv.block_table("b") == [0, 1, 3]
    assert [blk.ref_count for blk in kv.pool.blocks] == [2, 2, 1, 1, 0, 0]
    assert kv.prefix_hit_tokens == 8 and kv.prefix_query_tokens == 10 + 11

    kv.free(a)  # only block 2 drops to zero
    assert free_order(kv.pool) == [4, 5, 2]
    kv.free(b)  # tail first: 3, then 1 and 0
    assert free_order(kv.pool) == [4, 5, 2, 3, 1, 0]

    # a hit on free cached blocks takes them out of the free queue
    c = request("c", list(range(12)))
    hits = kv.find_cached_prefix(c)
    assert [h.block_id for h in hits] == [0, 1]
    assert kv.allocate_slots(c, 4, hits)
    assert kv.block_table("c") == [0, 1, 4]
    assert free_order(kv.pool) == [5, 2, 3]
    kv.free(c)
    assert free_order(kv.pool) == [5, 2, 3, 4, 1, 0]

    # handing out every block evicts the cached hashes
    d = request("d", [7] * 24)
    assert kv.find_cached_prefix(d) == []
    assert kv.allocate_slots(d, 24)
    assert kv.block_table("d") == [5, 2, 3, 4, 1, 0]
    assert kv.find_cached_prefix(request("e", list(range(12)))) == []


def test_the_last_prompt_token_is_always_computed():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = request("a", list(range(8)))
    kv.allocate_slots(a, 8)
    # the same 8 tokens: both blocks are cached, but only the first may be used
    assert [h.block_id for h in kv.find_cached_prefix(request("b", list(range(8))))] == [0]


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    assert kv.allocate_slots(request("a", list(range(8))), 8)
    big = request("b", list(range(100, 109)))
    assert not kv.allocate_slots(big, 9)
    assert kv.block_table("b") == [] and free_order(kv.pool) == [2]


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    kv.allocate_slots(request("a", list(range(9))), 9)
    assert kv.find_cached_prefix(request("b", list(range(9)))) == []
    assert kv.pool.cached == {}
